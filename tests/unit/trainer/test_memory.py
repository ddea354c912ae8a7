"""A training run whose memory estimate exceeds what the machine has free is refused before it starts
(trainer/memory.py), naming the settings to lower; nothing is written and no process starts.

Offline, CPU: the tiny SD1.5-shaped model of ``tiny_models``; the free memory is the machine's own,
except where a test says otherwise.
"""

from __future__ import annotations

import psutil
import pytest
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config
from tiny_models.sd import build_tiny_sd15

from versat2i.cli import main as cli_main
from versat2i.models.architectures import ARCHITECTURES
from versat2i.models.loading import load_base_model, read_model_size
from versat2i.trainer import memory
from versat2i.trainer.lora_job import train_or_reuse
from versat2i.trainer.memory import (
    GIB,
    MemoryRefusedError,
    estimate_training_memory,
    memory_problem,
)

# No machine has this much: 256 images of 4096 px, the largest batch and resolution the nodes offer.
HUGE = dict(resolution=4096, train_batch_size=256, bucket_step=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd15")
    return build_tiny_sd15(root), make_kohya_dataset(root / "dataset", aspects={"aesthetics": 1}, images_per_aspect=2)


def test_model_size_is_read_from_headers_alike_for_the_folder_and_the_single_file(tiny):
    model, _ = tiny
    folder, single = read_model_size(model.folder), read_model_size(model.checkpoint)
    assert folder.architecture.name == single.architecture.name == "sd15"
    base = load_base_model(model.folder)
    loaded = sum(p.numel() for m in (base.denoiser, base.vae, *base.text_encoders) for p in m.parameters())
    assert folder.parameters == loaded
    assert abs(single.parameters - loaded) / loaded < 1e-3  # the single file adds a few buffers (position ids)
    assert folder.lora_target_features == single.lora_target_features
    to_q = [m for name, m in base.denoiser.named_modules() if name.endswith(".to_q")]
    assert folder.lora_target_features["to_q"] == sum(m.in_features + m.out_features for m in to_q)


def test_the_estimate_adds_the_model_what_trains_and_the_activations():
    size = read_model_size_stub(parameters=1_000_000)
    family = size.architecture
    fp32 = estimate_training_memory(size, resolution=512, batch_size=2, mixed_precision="no",
                                    gradient_checkpointing=False, trained_parameters=1000)
    assert fp32.frozen_model == 4_000_000 and fp32.trained == 16_000
    assert fp32.activations == int(2 * 512 * 512 * family.activation_bytes_per_pixel)
    half = estimate_training_memory(size, resolution=512, batch_size=2, mixed_precision="bf16",
                                    gradient_checkpointing=True, trained_parameters=1000)
    assert half.frozen_model == 2_000_000 and half.trained == 16_000  # LoRA weights train in fp32
    assert half.activations == int(fp32.activations / 2 * family.checkpointed_activation_share)
    assert fp32.total == fp32.frozen_model + fp32.trained + fp32.activations + memory.PROCESS_OVERHEAD_BYTES


def read_model_size_stub(parameters: int):
    from versat2i.models.loading import ModelSize

    return ModelSize(architecture=ARCHITECTURES["sd15"], parameters=parameters, lora_target_features={})


def test_every_family_has_its_memory_numbers():
    """The UNet families: per-pixel numbers for this estimate. The DiT families: block facts for the
    estimate their trainer makes before it loads a weight (trainer/memory_plan.py)."""
    for family in ARCHITECTURES.values():
        if family.memory is not None:
            assert family.memory.blocks and family.memory.text_tokens > 0, family.name
        else:
            assert family.activation_bytes_per_pixel > 0 and 0 < family.checkpointed_activation_share <= 1, family.name


def test_a_run_that_fits_passes_and_one_that_does_not_is_refused_naming_what_to_lower(tiny, tmp_path):
    model, dataset = tiny
    assert memory_problem(tiny_lora_config(tmp_path, model.folder, dataset), device="cpu") is None
    problem = memory_problem(tiny_lora_config(tmp_path, model.folder, dataset, **HUGE), device="cpu")
    free = psutil.virtual_memory().available / GIB
    assert problem.startswith("tiny-sd15: this run needs about ") and "resolution 4096 x batch 256" in problem
    assert f"free RAM is {free:.0f}." in problem or f"free RAM is {free:.1f}" in problem
    assert "lower resolution, train_batch_size (the node's batch_size), rank" in problem
    assert "turn on gradient_checkpointing" in problem and memory.SKIP_ENV in problem


def test_a_run_just_over_the_free_memory_is_refused(tiny, tmp_path, monkeypatch):
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.folder, dataset)
    needed = memory.estimate_run_memory(config).total
    monkeypatch.setattr(memory, "free_memory", lambda device: (needed, "free RAM"))
    assert memory_problem(config, device="cpu") is None
    monkeypatch.setattr(memory, "free_memory", lambda device: (needed - 1, "free RAM"))
    assert "this run needs about" in memory_problem(config, device="cpu")
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert memory_problem(config, device="cpu") is None


def test_the_command_refuses_before_starting_anything(tiny, tmp_path, capsys):
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.folder, dataset, **HUGE)
    path = config.save(tmp_path / "run.toml")
    assert cli_main(["train-lora", "--config", str(path), "--cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("versat2i train-lora: error: tiny-sd15: this run needs about ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "loras").exists()


def test_the_node_and_loop_path_refuses_before_writing_its_run_folder(tiny, tmp_path):
    from versat2i.trainer.launcher import LaunchOptions

    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.folder, dataset, **HUGE)
    launched = []
    with pytest.raises(MemoryRefusedError, match="this run needs about"):
        train_or_reuse(config, runs_root=tmp_path / "runs", options=LaunchOptions(cpu=True),
                       on_start=launched.append)
    assert launched == [] and not (tmp_path / "runs").exists()
