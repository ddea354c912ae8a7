"""The CLIP-family scorers read the published weight formats and fail clearly on missing or corrupt
files, before computing anything. Offline, tiny random weights (tests/tiny_models/clip.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models.clip import (
    AESTHETIC_FILE,
    CLIP_FILE,
    HPS_FILE,
    LAION_MLP_SHAPES,
    PICKSCORE_MODEL_DIR,
    PICKSCORE_PROCESSOR_DIR,
    TINY_CLIP,
    TINY_CLIP_OPTIONS,
    TINY_HPS,
    TINY_HPS_OPTIONS,
    build_open_clip,
    laion_mlp_state_dict,
    random_images,
    register_tiny_open_clip,
    write_laion_mlp,
    write_open_clip_weights,
    write_tiny_reward_models,
)

from versat2i.rewards import cache
from versat2i.rewards.aesthetic_laion import AestheticMLP, load_aesthetic_mlp
from versat2i.rewards.registry import get_scorer
from versat2i.rewards.weights import MissingWeightsError, WeightsFormatError

PROMPTS = ["a lighthouse in a storm", "a bowl of ramen", "a red bicycle"]

OPTIONS = {
    "laion-aesthetic-v2": TINY_CLIP_OPTIONS,
    "clip-score": TINY_CLIP_OPTIONS,
    "clip-iqa": TINY_CLIP_OPTIONS,
    "hps-v2.1": TINY_HPS_OPTIONS,
    "pickscore-v1": {},
}
# The file (or folder) each scorer names when it is missing, and its sub-folder.
FIRST_MISSING = {
    "laion-aesthetic-v2": ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic"),
    "clip-score": ("open_clip_model.safetensors", "clip"),  # the name it is published under (issue 14)
    "clip-iqa": ("open_clip_model.safetensors", "clip"),
    "hps-v2.1": ("HPS_v2.1_compressed.pt", "hps"),
    "pickscore-v1": ("PickScore_v1", "pickscore"),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    register_tiny_open_clip()
    folder = tmp_path_factory.mktemp("models")
    write_tiny_reward_models(folder)
    return folder


@pytest.fixture
def copy_of_models(models_dir, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(models_dir, folder)
    return folder


def build(name, folder, *, cache_scorer=False, **extra):
    return get_scorer(name, search_dirs=[folder], cache=cache_scorer, **{**OPTIONS[name], **extra})


# -- formats ------------------------------------------------------------------------------------------

def test_open_clip_weights_load_from_safetensors_and_from_pt(models_dir, tmp_path):
    model = build_open_clip(TINY_CLIP, seed=0)  # the same weights write_tiny_reward_models wrote
    write_open_clip_weights(tmp_path / "clip" / "ViT-L-14-openai.pt", model)
    write_open_clip_weights(tmp_path / "clip" / "wrapped.pt", model, wrap_state_dict=True)
    images = random_images(3, seed=1)
    from_safetensors = build("clip-score", models_dir).score(images, PROMPTS)
    from_pt = build("clip-score", tmp_path, clip_weights="clip/ViT-L-14-openai.pt").score(images, PROMPTS)
    wrapped = str(tmp_path / "clip" / "wrapped.pt")  # an absolute path, outside the search dirs' layout
    from_wrapped = build("clip-score", tmp_path, clip_weights=wrapped).score(images, PROMPTS)
    torch.testing.assert_close(from_pt, from_safetensors, rtol=0, atol=0)
    torch.testing.assert_close(from_wrapped, from_safetensors, rtol=0, atol=0)


def test_open_clip_file_keeps_open_clips_key_names(models_dir):
    from safetensors import safe_open

    with safe_open(str(models_dir / CLIP_FILE), "pt") as handle:
        keys = set(handle.keys())
    expected = set(build_open_clip(TINY_CLIP).state_dict())
    assert keys == expected
    assert {"visual.conv1.weight", "token_embedding.weight", "text_projection", "logit_scale"} <= keys


def test_hps_checkpoint_wrapped_in_state_dict_loads(models_dir):
    raw = torch.load(str(models_dir / HPS_FILE), weights_only=True)
    assert set(raw) == {"state_dict"}
    scorer = build("hps-v2.1", models_dir)
    reference = build_open_clip(TINY_HPS, seed=1).state_dict()
    loaded = scorer.backbone.model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_laion_mlp_loads_the_published_keys_and_full_shapes(models_dir):
    mlp = load_aesthetic_mlp(models_dir / AESTHETIC_FILE)
    assert isinstance(mlp, AestheticMLP)
    state = mlp.state_dict()
    assert list(state) == list(LAION_MLP_SHAPES)
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(LAION_MLP_SHAPES)
    published = laion_mlp_state_dict(seed=0)
    assert all(torch.equal(state[k], published[k]) for k in published)


@pytest.mark.parametrize("damage", ["missing key", "wrong shape", "renamed keys"])
def test_a_mlp_file_that_is_not_the_predictor_is_refused_naming_it(tmp_path, damage):
    state = laion_mlp_state_dict(seed=0)
    if damage == "missing key":
        del state["layers.7.bias"]
    elif damage == "wrong shape":
        state["layers.2.weight"] = torch.zeros(64, 1024)
    else:
        state = {k.replace("layers.", "mlp."): v for k, v in state.items()}
    path = write_laion_mlp(tmp_path / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", state=state)
    with pytest.raises(WeightsFormatError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        load_aesthetic_mlp(path)


def test_clip_weights_of_another_architecture_are_refused_naming_the_file(copy_of_models):
    write_open_clip_weights(copy_of_models / CLIP_FILE, build_open_clip(TINY_HPS))
    with pytest.raises(WeightsFormatError) as info:
        build("clip-score", copy_of_models)
    assert str(copy_of_models / CLIP_FILE) in str(info.value)
    assert "does not match" in str(info.value)


def test_pickscore_reads_a_save_pretrained_folder_and_its_processor(models_dir):
    scorer = build("pickscore-v1", models_dir)
    config = json.loads((models_dir / PICKSCORE_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    assert scorer.pick.preprocess.size == (32, 32)
    assert scorer.pick.tokenizer("a photo")["input_ids"][0] == 49406  # the real CLIP BPE ids
    assert (models_dir / PICKSCORE_MODEL_DIR / "model.safetensors").is_file()


def test_pickscore_processor_files_may_live_in_the_model_folder(copy_of_models):
    model_dir, processor_dir = copy_of_models / PICKSCORE_MODEL_DIR, copy_of_models / PICKSCORE_PROCESSOR_DIR
    for entry in processor_dir.iterdir():
        shutil.move(str(entry), model_dir / entry.name)
    processor_dir.rmdir()
    scorer = build("pickscore-v1", copy_of_models)
    assert scorer.pick.processor_dir == model_dir


# -- missing weights ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OPTIONS))
def test_missing_weights_name_the_file_and_the_folders_and_load_nothing(name, tmp_path):
    empty_a, empty_b = tmp_path / "a", tmp_path / "b"
    loads = cache.MODELS.loads
    with pytest.raises(MissingWeightsError) as info:
        get_scorer(name, search_dirs=[empty_a, empty_b], **OPTIONS[name])
    file_name, subfolder = FIRST_MISSING[name]
    message = str(info.value)
    assert repr(file_name) in message and f"'{subfolder}' sub-folder" in message
    assert str(empty_a / subfolder) in message and str(empty_b / subfolder) in message
    assert "Get it from https://" in message
    assert cache.MODELS.loads == loads


def test_aesthetics_without_its_mlp_names_the_mlp_before_loading_clip(copy_of_models):
    (copy_of_models / AESTHETIC_FILE).unlink()
    loads = cache.MODELS.loads
    with pytest.raises(MissingWeightsError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        build("laion-aesthetic-v2", copy_of_models)
    assert cache.MODELS.loads == loads


def test_pickscore_without_processor_or_weights_names_what_is_missing(copy_of_models):
    shutil.rmtree(copy_of_models / PICKSCORE_PROCESSOR_DIR)
    with pytest.raises(MissingWeightsError, match="'CLIP-ViT-H-14-laion2B-s32B-b79K'"):
        build("pickscore-v1", copy_of_models)
    (copy_of_models / PICKSCORE_MODEL_DIR / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        build("pickscore-v1", copy_of_models)


# -- corrupt weights ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, relative", [
    ("clip-score", CLIP_FILE),
    ("laion-aesthetic-v2", AESTHETIC_FILE),
    ("hps-v2.1", HPS_FILE),
    ("pickscore-v1", PICKSCORE_MODEL_DIR + "/model.safetensors"),
])
def test_truncated_weights_are_a_clear_error_naming_the_file(name, relative, copy_of_models):
    path = copy_of_models / relative
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsFormatError) as info:
        build(name, copy_of_models)
    target = path.parent if name == "pickscore-v1" else path
    assert str(target) in str(info.value)
    assert "download it again" in str(info.value) or "truncated" in str(info.value)


def test_a_replaced_weight_file_is_loaded_again(copy_of_models):
    first = get_scorer("clip-score", search_dirs=[copy_of_models], **TINY_CLIP_OPTIONS)
    images = random_images(2, seed=3)
    before = first.score(images, PROMPTS[:2])
    write_open_clip_weights(copy_of_models / CLIP_FILE, build_open_clip(TINY_CLIP, seed=5))
    second = get_scorer("clip-score", search_dirs=[copy_of_models], **TINY_CLIP_OPTIONS)
    assert second is not first and second.backbone is not first.backbone
    assert not torch.allclose(second.score(images, PROMPTS[:2]), before)
    assert second.weights_hash != first.weights_hash


def test_an_open_clip_without_weights_only_is_a_clear_error(copy_of_models, monkeypatch):
    # open_clip 2.x's create_model has no weights_only (2.29-2.32 call it load_weights_only) and
    # hands unknown keywords to the model's constructor, which fails with a TypeError.
    import open_clip

    def create_model_2_24(model_name, pretrained=None, precision="fp32", device="cpu", jit=False, **model_kwargs):
        raise TypeError(f"CLIP.__init__() got an unexpected keyword argument {next(iter(model_kwargs))!r}")

    monkeypatch.setattr(open_clip, "create_model", create_model_2_24)
    monkeypatch.setattr(open_clip, "__version__", "2.24.0")
    with pytest.raises(ImportError, match=r"open_clip_torch 2\.24\.0 is too old.*pip install 'open_clip_torch>=3\.0'"):
        build("clip-score", copy_of_models)
