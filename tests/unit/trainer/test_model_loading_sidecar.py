"""The ``<checkpoint stem>.configs/`` sidecar of models.loading (offline, tiny models).

The nodes name a checkpoint by its file in models/checkpoints and cannot pass ``config_dir``; a
checkpoint whose shapes are not the standard ones (here: a tiny SD1.5-shaped file, which the
shipped full-size SD1.5 configs do not fit) is described by a configs-only diffusers folder next to
it, and loads exactly as with an explicit ``config_dir``.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models.sd import build_tiny_sd15

from versat2i.models.loading import load_base_model, sidecar_config_dir


@pytest.fixture
def tiny(tmp_path):
    return build_tiny_sd15(tmp_path / "build")


def place_checkpoint(tiny, folder, *, sidecar: bool):
    """The tiny checkpoint in its own folder (as in models/checkpoints), with or without the sidecar."""
    folder.mkdir()
    checkpoint = folder / "tiny.safetensors"
    shutil.copy(tiny.checkpoint, checkpoint)
    if sidecar:  # configs only: weights there would show up in ComfyUI's checkpoint list
        shutil.copytree(tiny.folder, folder / "tiny.configs", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return checkpoint


def test_without_a_sidecar_the_shipped_configs_do_not_fit_the_tiny_file(tiny, tmp_path):
    checkpoint = place_checkpoint(tiny, tmp_path / "plain", sidecar=False)
    assert sidecar_config_dir(checkpoint) is None
    with pytest.raises(ValueError, match="do not fit the sd15 config"):
        load_base_model(checkpoint, compute_hash=False)


def test_the_sidecar_folder_describes_the_checkpoint(tiny, tmp_path):
    checkpoint = place_checkpoint(tiny, tmp_path / "with", sidecar=True)
    sidecar = tmp_path / "with" / "tiny.configs"
    assert sidecar_config_dir(checkpoint) == sidecar
    assert not list(sidecar.rglob("*.safetensors"))

    base = load_base_model(checkpoint, compute_hash=False)
    explicit = load_base_model(tiny.checkpoint, config_dir=tiny.folder, compute_hash=False)
    assert base.config_dir == str(sidecar)
    assert any("sidecar" in note for note in base.notes)
    assert (base.arch, base.prediction_type, base.resolution) == (explicit.arch, explicit.prediction_type,
                                                                  explicit.resolution)
    for mine, theirs in ((base.denoiser, explicit.denoiser), (base.vae, explicit.vae),
                         (base.text_encoders[0], explicit.text_encoders[0])):
        ours, reference = mine.state_dict(), theirs.state_dict()
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert base.tokenizers[0]("a red cube").input_ids == explicit.tokenizers[0]("a red cube").input_ids


def test_an_explicit_config_dir_wins_and_a_broken_sidecar_is_an_error(tiny, tmp_path):
    checkpoint = place_checkpoint(tiny, tmp_path / "broken", sidecar=False)
    broken = tmp_path / "broken" / "tiny.configs"
    (broken / "vae").mkdir(parents=True)  # no unet/config.json
    with pytest.raises(FileNotFoundError, match=r"tiny\.configs.*unet/config\.json"):
        load_base_model(checkpoint, compute_hash=False)
    base = load_base_model(checkpoint, config_dir=tiny.folder, compute_hash=False)
    assert base.config_dir == str(tiny.folder)
