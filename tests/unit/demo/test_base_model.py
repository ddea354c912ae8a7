"""The shipped demo base model: a diffusers StableDiffusion folder that the stock pipeline loads
offline and samples from, with an identity VAE, the demo tokenizer, and trained (not random)
weights; and the script that trains it runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from versat2i.demo import model, rewards, train_base, world


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model.BASE_MODEL_DIR, dtype=torch.float32, safety_checker=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_folder_is_a_small_stable_diffusion_folder():
    folder = model.BASE_MODEL_DIR
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 8 * 2 ** 20
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "sample"


def test_the_stock_pipeline_generates_images_of_the_world_size(pipe):
    assert pipe.vae_scale_factor == 1
    images = pipe(["a red circle on a white background", "a blue square on a black background"],
                  height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert bool(torch.isfinite(images).all())


def test_the_trained_model_draws_the_named_colours(pipe):
    # Random weights score ~1/6 on colour match; the shipped model ~0.95. A loose bound: it catches
    # shipping untrained or mismatched weights, not small quality changes.
    captions = [scene.caption for scene in world.all_scenes()][::6]
    images = pipe(captions, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, num_inference_steps=10,
                  guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    parts = rewards.components(images.permute(0, 2, 3, 1), captions)
    assert float(parts["colour_match"].mean()) > 0.7


def test_the_vae_is_nearly_the_identity(pipe):
    captions = [scene.caption for scene in world.all_scenes()][:16]
    images = world.render_batch(captions, range(16)).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mode()
        decoded = pipe.vae.decode(latents).sample
    assert (latents[:, :3] - images).abs().mean() < 0.05
    assert (decoded - images).abs().mean() < 0.05
    assert pipe.vae.config.scaling_factor == 1.0


def test_the_shipped_tokenizer_is_the_one_the_builder_makes(pipe):
    built = model.build_tokenizer()
    captions = [scene.caption for scene in world.all_scenes()] + ["", "a purple hexagon, in the rain"]
    for caption in captions:
        assert pipe.tokenizer(caption).input_ids == built(caption).input_ids
    assert pipe.tokenizer.model_max_length == model.MAX_TOKENS
    # The classic vocab.json + merges.txt pair (transformers 4's slow tokenizer reads only these)
    # tokenizes the same.
    from transformers import CLIPTokenizer

    folder = model.BASE_MODEL_DIR / "tokenizer"
    classic = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    for caption in captions:
        assert classic(caption).input_ids == built(caption).input_ids
    # Grammar words are single tokens, as in the full CLIP vocabulary.
    assert len(built("an orange triangle on a white background").input_ids) == 2 + 7


def test_train_base_runs_end_to_end_and_writes_a_loadable_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "base"
    args = train_base.parse_args(["--output", str(output), "--vae-steps", "2", "--steps", "2",
                                  "--batch-size", "4", "--warmup-steps", "1"])
    info = train_base.main(args)
    assert info["steps"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temporary folder left behind
    pipe = StableDiffusionPipeline.from_pretrained(output, safety_checker=None, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "sample"
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_base.main(args)
