"""The CLIP-family scorers (laion-aesthetic-v2, clip-score, clip-iqa, hps-v2.1, pickscore-v1) on tiny
random-weight models written in the published formats (tests/tiny_models/clip.py). Offline.

Scores are checked against references computed independently: open_clip's / transformers' own PIL
preprocessing and model calls, and the published formulas written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_models.clip import (
    AESTHETIC_FILE,
    CLIP_FILE,
    HPS_FILE,
    TINY_CLIP,
    TINY_CLIP_OPTIONS,
    TINY_HPS,
    TINY_HPS_OPTIONS,
    TINY_IMAGE_SIZE,
    random_images,
    register_tiny_open_clip,
    write_tiny_reward_models,
)

from versat2i.rewards import cache
from versat2i.rewards.base import ImageBatchError, score_aspects
from versat2i.rewards.clip_backbone import TensorPreprocess
from versat2i.rewards.registry import get_scorer

SCORER_OPTIONS = {
    "laion-aesthetic-v2": TINY_CLIP_OPTIONS,
    "clip-score": TINY_CLIP_OPTIONS,
    "clip-iqa": TINY_CLIP_OPTIONS,
    "hps-v2.1": TINY_HPS_OPTIONS,
    "pickscore-v1": {},
}
PROMPTS = ["a red cube on a table", "portrait of an old fisherman", "a red cube on a table",
           "a city at night, neon lights", "a bowl of fruit", "portrait of an old fisherman"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    register_tiny_open_clip()
    folder = tmp_path_factory.mktemp("models")
    write_tiny_reward_models(folder)
    return folder


def make_scorer(name, models_dir, **extra):
    return get_scorer(name, search_dirs=[models_dir], **SCORER_OPTIONS[name], **extra)


def quantised_images(count, height, width, seed=0):
    """Images whose pixels are exact multiples of 1/255, so a PIL uint8 round trip is lossless."""
    return (random_images(count, height, width, seed=seed) * 255).round() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.numpy() * 255).round().astype(np.uint8))


# -- batch independence -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCORER_OPTIONS))
def test_score_alone_equals_score_in_any_batch(name, models_dir):
    scorer = make_scorer(name, models_dir)
    images = random_images(6, 40, 56, seed=1)
    batch = scorer.score(images, PROMPTS)
    assert batch.shape == (6,) and batch.dtype == torch.float32
    assert float(batch.max() - batch.min()) > 1e-3, "scores do not vary: the check below would prove nothing"

    alone = torch.cat([scorer.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, batch, rtol=0, atol=1e-5)

    order = [3, 0, 5, 1, 4, 2]
    permuted = scorer.score(images[order], [PROMPTS[i] for i in order])
    torch.testing.assert_close(permuted, batch[order], rtol=0, atol=1e-5)

    chunked = scorer.score(images, PROMPTS, chunk_size=4)
    torch.testing.assert_close(chunked, batch, rtol=0, atol=1e-5)

    others = random_images(5, 40, 56, seed=2)
    mixed_prompts = ["something else"] * 2 + PROMPTS[:3] + ["x y"] * 3
    mixed = scorer.score(torch.cat([others[:2], images[:3], others[2:]]), mixed_prompts)
    torch.testing.assert_close(mixed[2:5], batch[:3], rtol=0, atol=1e-5)


# -- scores follow the published definitions ---------------------------------------------------------

def _open_clip_reference(architecture, weight_file, images, *, resize_mode="shortest"):
    """Normalised image embeddings the way open_clip's own pipeline computes them (PIL)."""
    import open_clip

    model = open_clip.create_model(architecture, pretrained=str(weight_file)).eval()
    transform = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode=resize_mode)
    pixels = torch.stack([transform(to_pil(image)) for image in images])
    tokenizer = open_clip.get_tokenizer(architecture)
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(pixels), dim=-1)
        text = lambda prompts: F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)  # noqa: E731
        return image_features, text


def test_aesthetic_score_is_the_published_mlp_on_the_normalised_clip_embedding(models_dir):
    images = quantised_images(4, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    embeddings, _ = _open_clip_reference(TINY_CLIP, models_dir / CLIP_FILE, images)
    state = torch.load(str(models_dir / AESTHETIC_FILE), weights_only=True)
    hidden = embeddings
    for index in (0, 2, 4, 6, 7):  # Linear layers; the others are Dropout (identity in eval)
        hidden = hidden @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    scores = make_scorer("laion-aesthetic-v2", models_dir).score(images, PROMPTS[:4])
    torch.testing.assert_close(scores, hidden.squeeze(-1), rtol=0, atol=1e-4)


def test_clip_score_is_100_times_the_cosine_floored_at_zero(models_dir):
    images = quantised_images(6, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=3)
    embeddings, text = _open_clip_reference(TINY_CLIP, models_dir / CLIP_FILE, images)
    cosine = (embeddings * text(PROMPTS)).sum(-1)
    scores = make_scorer("clip-score", models_dir).score(images, PROMPTS)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), rtol=0, atol=1e-3)
    assert (cosine < 0).any() and (cosine > 0).any(), "pick seeds that exercise the floor"


def test_clip_iqa_is_a_per_image_softmax_over_good_and_bad_photo(models_dir):
    images = quantised_images(5, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=4)
    embeddings, text = _open_clip_reference(TINY_CLIP, models_dir / CLIP_FILE, images)
    pair = text(["Good photo.", "Bad photo."])
    expected = (100 * embeddings @ pair.T).softmax(dim=-1)[:, 0]
    scores = make_scorer("clip-iqa", models_dir).score(images, PROMPTS[:5])
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_clip_iqa_custom_prompt_pairs_average_and_get_their_own_id(models_dir):
    images = quantised_images(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=5)
    pairs = [["Sharp photo.", "Blurry photo."], ["Clean photo.", "Noisy photo."]]
    embeddings, text = _open_clip_reference(TINY_CLIP, models_dir / CLIP_FILE, images)
    expected = torch.stack([(100 * embeddings @ text(list(p)).T).softmax(-1)[:, 0] for p in pairs]).mean(0)
    scorer = make_scorer("clip-iqa", models_dir, prompt_pairs=pairs)
    torch.testing.assert_close(scorer.score(images, PROMPTS[:3]), expected, rtol=0, atol=1e-4)
    assert scorer.scorer_id.startswith("clip-iqa:prompts-") and scorer.scorer_id != "clip-iqa"
    with pytest.raises(ValueError, match="prompt_pairs"):
        make_scorer("clip-iqa", models_dir, prompt_pairs=[["only one"]])


def test_hps_is_the_cosine_with_longest_side_padding(models_dir):
    images = quantised_images(4, 24, 40, seed=6)  # not square: exercises the padding
    embeddings, text = _open_clip_reference(TINY_HPS, models_dir / HPS_FILE, images, resize_mode="longest")
    expected = (embeddings * text(PROMPTS[:4])).sum(-1)
    scores = make_scorer("hps-v2.1", models_dir).score(images, PROMPTS[:4])
    torch.testing.assert_close(scores, expected, rtol=0, atol=2e-3)  # PIL's uint8 resize vs float


def test_pickscore_matches_the_reference_transformers_pipeline(models_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    images = quantised_images(4, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=7)
    model = CLIPModel.from_pretrained(str(models_dir / "pickscore/PickScore_v1")).eval()
    processor_dir = str(models_dir / "pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K")
    image_processor = CLIPImageProcessor.from_pretrained(processor_dir)
    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    expected = []
    with torch.no_grad():
        # As in PickScore's reference code: one prompt with its image(s) at a time.
        for image, prompt in zip(images, PROMPTS[:4], strict=True):
            pixels = image_processor(images=[to_pil(image)], return_tensors="pt").pixel_values
            tokens = tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embeds = model.get_image_features(pixel_values=pixels)
            text_embeds = model.get_text_features(input_ids=tokens["input_ids"],
                                                  attention_mask=tokens["attention_mask"])
            image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
            cosine = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)
            expected.append(model.logit_scale.exp() * cosine)
    scores = make_scorer("pickscore-v1", models_dir).score(images, PROMPTS[:4])
    torch.testing.assert_close(scores, torch.cat(expected), rtol=0, atol=1e-3)


@pytest.mark.parametrize("size", [(40, 56), (56, 40), (20, 24), (97, 33)])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest"])
def test_tensor_preprocessing_matches_open_clips_pil_transform(size, resize_mode):
    import open_clip

    images = quantised_images(3, *size, seed=8)
    ours = TensorPreprocess((32, 32), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                            resize_mode=resize_mode)(images)
    transform = open_clip.image_transform(32, is_train=False, resize_mode=resize_mode)
    reference = torch.stack([transform(to_pil(image)) for image in images])
    # PIL rounds its resized image to uint8: allow 1.5 grey levels in normalised units.
    quantum = (1 / 255) / min(open_clip.OPENAI_DATASET_STD)
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    assert float((ours - reference).abs().max()) < 1.5 * quantum


# -- one backbone, one image pass per chunk ---------------------------------------------------------

def test_aesthetics_alignment_and_lowlevel_share_one_backbone_and_one_image_pass(models_dir, monkeypatch):
    cache.clear()
    loads_before = cache.MODELS.loads
    scorers = {aspect: make_scorer(name, models_dir) for aspect, name in
               (("aesthetics", "laion-aesthetic-v2"), ("alignment", "clip-score"), ("lowlevel", "clip-iqa"))}
    backbone = scorers["aesthetics"].backbone
    assert scorers["alignment"].backbone is backbone and scorers["lowlevel"].backbone is backbone
    assert cache.MODELS.loads - loads_before == 2  # the CLIP model + the aesthetic MLP, nothing else

    image_passes = []
    real_encode_image = backbone.model.encode_image
    monkeypatch.setattr(backbone.model, "encode_image",
                        lambda pixels, **kw: image_passes.append(len(pixels)) or real_encode_image(pixels, **kw))
    images = random_images(7, 40, 56, seed=9)
    prompts = [f"prompt {i % 3}" for i in range(7)]
    together = score_aspects(scorers, images, prompts, chunk_size=3)
    assert image_passes == [3, 3, 1]  # one image-tower pass per chunk for all three aspects

    for aspect, scorer in scorers.items():  # sharing changes no score
        torch.testing.assert_close(together[aspect], scorer.score(images, prompts, chunk_size=3), rtol=0, atol=0)


def test_text_embeddings_are_computed_once_per_prompt(models_dir, monkeypatch):
    scorer = make_scorer("clip-score", models_dir)
    backbone = scorer.backbone
    backbone._text_cache.clear()
    encoded = []
    real_encode_text = backbone.model.encode_text
    monkeypatch.setattr(backbone.model, "encode_text",
                        lambda tokens, **kw: encoded.append(tokens.shape[0]) or real_encode_text(tokens, **kw))
    scorer.score(random_images(6, seed=10), PROMPTS)
    assert encoded == [1, 1, 1, 1]  # four distinct prompts, each encoded alone
    scorer.score(random_images(6, seed=11), PROMPTS)
    assert len(encoded) == 4


@pytest.mark.parametrize("case", ["empty", "count", "nan", "rgba", "grayscale"])
def test_bad_inputs_are_refused_before_the_model_runs(models_dir, monkeypatch, case):
    scorer = make_scorer("laion-aesthetic-v2", models_dir)
    calls = []
    monkeypatch.setattr(scorer.backbone.model, "encode_image", lambda *a, **k: calls.append(1))
    images = {
        "empty": torch.rand(0, 32, 32, 3),
        "count": torch.rand(2, 32, 32, 3),
        "nan": torch.rand(2, 32, 32, 3).index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
        "rgba": torch.rand(2, 32, 32, 4),
        "grayscale": torch.rand(2, 32, 32, 1),
    }[case]
    prompts = ["p"] * (3 if case == "count" else images.shape[0])
    with pytest.raises(ImageBatchError):
        scorer.score(images, prompts)
    assert calls == []


def test_alignment_scorers_refuse_empty_prompts(models_dir):
    with pytest.raises(ImageBatchError, match="empty"):
        make_scorer("clip-score", models_dir).score(random_images(2), ["a cat", ""])


# -- cache ------------------------------------------------------------------------------------------

def test_get_scorer_returns_the_cached_scorer_and_offload_keeps_working(models_dir):
    first = make_scorer("clip-score", models_dir)
    assert make_scorer("clip-score", models_dir) is first
    images = random_images(3, seed=12)
    before = first.score(images, PROMPTS[:3])
    cache.offload()
    assert first.backbone.device.type == "cpu"
    torch.testing.assert_close(first.score(images, PROMPTS[:3]), before, rtol=0, atol=0)


def test_scorers_report_id_aspect_and_the_sha256_of_their_files(models_dir):
    from versat2i.rewards.weights import combine_hashes
    from versat2i.safe_io import sha256_file

    clip_hash = sha256_file(models_dir / CLIP_FILE)
    described = {name: make_scorer(name, models_dir).describe() for name in SCORER_OPTIONS}
    assert described["clip-score"] == {"id": "clip-score", "aspect": "alignment", "weights_hash": clip_hash}
    assert described["clip-iqa"] == {"id": "clip-iqa", "aspect": "lowlevel", "weights_hash": clip_hash}
    assert described["laion-aesthetic-v2"]["weights_hash"] == combine_hashes({
        "ViT-L-14-openai.safetensors": clip_hash,
        "sac+logos+ava1-l14-linearMSE.pth": sha256_file(models_dir / AESTHETIC_FILE),
    })
    assert described["hps-v2.1"]["weights_hash"] == sha256_file(models_dir / HPS_FILE)
    assert described["hps-v2.1"]["aspect"] == "alignment" and described["pickscore-v1"]["aspect"] == "alignment"
    assert len({d["weights_hash"] for d in described.values()}) == 4  # clip-score and clip-iqa share
    assert all(len(d["weights_hash"]) == 64 for d in described.values())
