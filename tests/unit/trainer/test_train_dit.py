"""Training LoRAs for the DiT families (tiny models in ComfyUI's file layout, CPU, offline).

* every family trains in-process from its three files, with each flow-matching option, previews
  and cached text embeddings (the encoders are then freed);
* FLUX.2-klein under ``accelerate launch``: a run killed with SIGKILL part-way and resumed with
  ``--resume latest`` writes a LoRA bitwise equal to an uninterrupted run's;
* settings that do not apply to a family are refused before any weight is read, naming the fix;
* the memory estimate refuses a run that cannot fit and ``memory_saving = auto`` turns options on.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models.dit import MODELS
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config

from versat2i.trainer import train_lora, training_loop
from versat2i.trainer.events import read_events
from versat2i.trainer.launcher import LaunchOptions, TrainingFailed, run_training

pytestmark = [pytest.mark.family, pytest.mark.usefixtures("t5_tokenizer_for_flux1")]


@pytest.fixture(scope="module")
def tiny(tiny_dits):
    return tiny_dits  # tests/conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_kohya_dataset(tmp_path_factory.mktemp("dit-data") / "set", aspects={"aesthetics": 2},
                              images_per_aspect=3)


def dit_config(root: Path, model, dataset: Path, **settings):
    return tiny_lora_config(root, model.diffusion_model, dataset, text_encoders=tuple(map(str, model.text_encoders)),
                            vae=str(model.vae), **settings)


def train_in_process(config, root: Path) -> Path:
    return train_lora.main(train_lora.parse_args(["--config", str(config.save(root / "lora.toml"))]))


@pytest.mark.slow
@pytest.mark.parametrize("name, settings", [
    ("flux1-dev", {"weighting_scheme": "logit_normal", "cache_text_embeddings": True, "cache_latents": True}),
    ("flux1-schnell", {"weighting_scheme": "mode", "train_feed_forward": True}),
    ("flux2-klein", {"weighting_scheme": "cosmap", "sample_every_n_steps": 2, "sample_steps": 2}),
    ("zimage", {"cache_text_embeddings": True, "gradient_checkpointing": True, "train_batch_size": 2}),
])
def test_each_family_trains_from_its_files(tiny, dataset, tmp_path, capsys, name, settings):
    model = tiny(name)
    config = dit_config(tmp_path, model, dataset, max_train_steps=4, checkpointing_steps=100, learning_rate=1e-2,
                        **settings)
    path = train_in_process(config, tmp_path)
    state = load_file(str(path))
    assert state and all(k.startswith("transformer.") for k in state)
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if ".lora_B." in k)  # B starts at 0: it trained
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["versat2i_arch"] == MODELS[name][0] and metadata["versat2i_variant"] == MODELS[name][1]
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == config.rank
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"event"')]
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 4 and all(loss is not None and loss > 0 for loss in losses)
    samples = [e for e in events if e["event"] == "sample"]
    if settings.get("sample_every_n_steps"):
        assert [e["step"] for e in samples] == [2, 4]
        from PIL import Image

        for event in samples:
            assert [Path(p).parent.name for p in event["paths"]] == [f"step-{event['step']:06d}"] * 2
            assert all(Image.open(p).size == (config.resolution, config.resolution) for p in event["paths"])
    else:
        assert samples == []


def test_previews_change_nothing_about_the_lora(tiny, dataset, tmp_path):
    """Preview sampling uses its own generator and the eval-mode denoiser: the LoRA trained with
    previews is bitwise the one trained without."""
    model = tiny("flux2-klein")
    results = []
    for label, every in (("plain", 0), ("previews", 1)):
        root = tmp_path / label
        config = dit_config(root, model, dataset, max_train_steps=3, checkpointing_steps=100, dropout=0.1,
                            weighting_scheme="logit_normal", sample_every_n_steps=every, sample_steps=1)
        results.append(load_file(str(train_in_process(config, root))))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_settings_that_do_not_apply_are_refused_before_loading(tiny, dataset, tmp_path, monkeypatch):
    model = tiny("flux2-klein")
    loaded = []
    monkeypatch.setattr(training_loop, "load_base_model", lambda *a, **k: loaded.append(a))
    config = dit_config(tmp_path, model, dataset, snr_gamma=5.0, resolution=72, bucket_step=72)
    with pytest.raises(ValueError) as err:
        train_in_process(config, tmp_path)
    message = str(err.value)
    assert "snr_gamma" in message and "resolution=72: must be a multiple of 16" in message and "bucket_step" in message
    assert loaded == []


def test_a_run_that_cannot_fit_is_refused_naming_what_to_lower(tiny, dataset, tmp_path, monkeypatch):
    from versat2i.trainer import memory_plan as memory

    model = tiny("flux2-klein")
    monkeypatch.setattr(train_lora, "device_free_bytes", lambda device: 1e5)  # 100 kB free
    config = dit_config(tmp_path, model, dataset)
    with pytest.raises(ValueError) as err:
        train_in_process(config, tmp_path)
    message = str(err.value)
    assert "GiB free" in message and "gradient_checkpointing" in message and "memory_saving = auto" in message
    assert "lower resolution" in message

    # auto: just enough room for the estimate with caching and checkpointing
    sizes_seen = {}
    real_plan = memory.plan_memory

    def record(sizes, requested, **kwargs):
        sizes_seen["sizes"] = sizes
        return real_plan(sizes, requested, **kwargs)

    monkeypatch.setattr(train_lora, "plan_memory", record)
    monkeypatch.setattr(train_lora, "device_free_bytes", lambda device: 1e12)
    root = tmp_path / "fits"
    train_in_process(dit_config(root, model, dataset, max_train_steps=1), root)
    sizes = sizes_seen["sizes"]
    needed = {name: memory.estimate(sizes, memory.MemoryOptions(**{name: True}), resolution=64, batch_size=2,
                                    weight_bytes=4).total for name in memory.OPTION_ORDER}
    plain = memory.estimate(sizes, memory.MemoryOptions(), resolution=64, batch_size=2, weight_bytes=4).total
    assert needed["cache_text_embeddings"] < plain and needed["gradient_checkpointing"] < plain
    both = memory.estimate(sizes, memory.MemoryOptions(cache_text_embeddings=True, gradient_checkpointing=True),
                           resolution=64, batch_size=2, weight_bytes=4).total
    monkeypatch.setattr(train_lora, "device_free_bytes", lambda device: both + 1)
    root = tmp_path / "auto"
    train_in_process(dit_config(root, model, dataset, max_train_steps=1, memory_saving="auto"), root)
    plan = json.loads((Path(root / "run") / memory.PLAN_FILE).read_text())
    assert plan["cache_text_embeddings"] and plan["gradient_checkpointing"] and not plan["fp8_base"]


def test_fp8_base_weights_train(tiny, dataset, tmp_path, capsys):
    """Frozen weights stored as float8_e4m3fn (diffusers' layerwise casting, set before the LoRA
    layers exist) with the LoRA in fp32: the run trains; its losses are the full-precision run's up to
    fp8 rounding of the frozen weights, and the LoRA learns the same direction."""
    model = tiny("flux2-klein")
    lora, losses = {}, {}
    for label, fp8 in (("full", False), ("fp8", True)):
        root = tmp_path / label
        config = dit_config(root, model, dataset, max_train_steps=3, checkpointing_steps=100, fp8_base=fp8,
                            gradient_checkpointing=True, learning_rate=1e-3)
        lora[label] = load_file(str(train_in_process(config, root)))
        losses[label] = [json.loads(line)["loss"] for line in capsys.readouterr().out.splitlines()
                         if line.startswith('{"event":"step"')]
    ups = [k for k in lora["full"] if ".lora_B." in k]
    assert any(not torch.equal(lora["fp8"][k], lora["full"][k]) for k in ups)  # fp8 storage was in effect
    assert all(abs(a - b) <= 0.01 * abs(b) for a, b in zip(losses["fp8"], losses["full"], strict=True))
    full = torch.cat([lora["full"][k].flatten() for k in ups])
    fp8 = torch.cat([lora["fp8"][k].flatten() for k in ups])
    assert float(torch.nn.functional.cosine_similarity(full, fp8, dim=0)) > 0.8


# -- kill -9 and resume ----------------------------------------------------------------------------------------

STEPS, KILL_AFTER_CHECKPOINT = 9, 3
RESUME_SETTINGS = dict(max_train_steps=STEPS, checkpointing_steps=3, checkpoints_total_limit=2,
                       gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler="constant_with_warmup",
                       lr_warmup_steps=2, dropout=0.1, weighting_scheme="logit_normal")


def launch(config_path: Path, **kwargs):
    return run_training(["--config", str(config_path), "--resume", "latest"], options=LaunchOptions(cpu=True), **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="kills process groups with POSIX signals")
def test_a_killed_dit_run_resumes_to_a_bitwise_equal_lora(tiny, dataset, tmp_path):
    model = tiny("flux2-klein")
    reference = dit_config(tmp_path / "reference", model, dataset, **RESUME_SETTINGS)
    launch(reference.save(tmp_path / "reference.toml"))

    config = dit_config(tmp_path / "killed", model, dataset, **RESUME_SETTINGS)
    config_path = config.save(tmp_path / "killed.toml")
    started, killed = {}, {}

    def kill_after_checkpoint(event):
        if event["event"] == "checkpoint" and event["step"] == KILL_AFTER_CHECKPOINT:
            os.killpg(started["child"].pgid, signal.SIGKILL)  # no clean-up of any kind
            killed["at"] = event["step"]

    with pytest.raises(TrainingFailed) as err:
        launch(config_path, on_event=kill_after_checkpoint, on_start=lambda child: started.setdefault("child", child))
    assert killed == {"at": KILL_AFTER_CHECKPOINT} and err.value.returncode == -signal.SIGKILL
    assert not config.output_path.exists()
    left = [int(p.name.removeprefix("checkpoint-")) for p in training_loop.checkpoint_dirs(config.work_dir)]
    assert left and left[-1] < STEPS
    result = launch(config_path)
    start = next(e for e in result.events if e["event"] == "start")
    assert start["start_step"] == left[-1] and start["resumed_from"].endswith(f"checkpoint-{left[-1]}")
    logged = [e["step"] for e in read_events(Path(config.work_dir) / training_loop.LOG_FILE_NAME)
              if e["event"] == "step"]
    assert logged[-1] == STEPS

    resumed, uninterrupted = load_file(str(config.output_path)), load_file(str(reference.output_path))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # bitwise
