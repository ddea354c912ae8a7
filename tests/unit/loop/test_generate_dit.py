"""``versat2i generate`` with a DiT family's split files (tiny FLUX.2-klein in ComfyUI's layout, CPU):
the family's diffusers pipeline samples with the variant's own defaults, the same seed gives the
same image, and a trained LoRA changes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models.dit import write_tiny_dit
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config

from versat2i.cli import main
from versat2i.trainer import train_lora

pytestmark = [pytest.mark.family, pytest.mark.usefixtures("t5_tokenizer_for_flux1")]


def test_generate_samples_a_dit_with_its_defaults_and_loras(tmp_path):
    tiny = write_tiny_dit("flux2-klein", tmp_path / "models")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    files = ["--checkpoint", str(tiny.diffusion_model), "--text-encoder", str(tiny.text_encoders[0]),
             "--vae", str(tiny.vae), "--prompts", str(prompts), "--width", "64", "--height", "64", "--device", "cpu",
             "--quiet"]

    assert main(["generate", *files, "--k", "2", "--out", str(tmp_path / "plain")]) == 0
    summary = json.loads((tmp_path / "plain" / "generation.json").read_text())
    assert summary["model"]["arch"] == "flux2_klein" and summary["model"]["variant"] == "flux2-klein-4b"
    assert summary["settings"]["steps"] == 4 and summary["settings"]["guidance_scale"] == 1.0  # klein's defaults
    records = [json.loads(line) for line in (tmp_path / "plain" / "candidates.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    images = {r["seed"]: np.asarray(Image.open(tmp_path / "plain" / r["file"])) for r in records}
    assert all(image.shape == (64, 64, 3) for image in images.values())
    assert not np.array_equal(images[0], images[1])

    assert main(["generate", *files, "--k", "1", "--seeds", "1", "--out", str(tmp_path / "again")]) == 0
    again = [json.loads(line) for line in (tmp_path / "again" / "candidates.jsonl").read_text().splitlines()]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / again[0]["file"])), images[1])

    dataset = make_kohya_dataset(tmp_path / "dataset", aspects={"aesthetics": 2}, images_per_aspect=2)
    config = tiny_lora_config(tmp_path, tiny.diffusion_model, dataset, text_encoders=(str(tiny.text_encoders[0]),),
                              vae=str(tiny.vae), max_train_steps=3, learning_rate=5e-2, checkpointing_steps=100)
    lora = train_lora.main(train_lora.parse_args(["--config", str(config.save(tmp_path / "lora.toml"))]))
    assert main(["generate", *files, "--k", "1", "--seeds", "1", "--lora", str(lora), "--out",
                 str(tmp_path / "lora")]) == 0
    with_lora = [json.loads(line) for line in (tmp_path / "lora" / "candidates.jsonl").read_text().splitlines()]
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "lora" / with_lora[0]["file"])), images[1])
