"""Pieces of the training program that need no child process: loss targets and min-SNR weights,
checkpoint discovery, LoRA layer placement, loss curves, run fingerprints, the CLI wiring."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config

from versat2i.models.architectures import ARCHITECTURES
from versat2i.trainer import objective, train_lora, training_loop
from versat2i.trainer.config import LoraTrainConfig


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents, noise, pred = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    return pred, latents, noise, torch.tensor([5, 400, 990])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_targets(scheduler, prediction_type):
    pred, latents, noise, timesteps = _inputs()
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(latents, noise, timesteps),
              "sample": latents}[prediction_type]
    loss = objective.compute_loss(pred, latents, noise, timesteps, scheduler, prediction_type, 0.0)
    assert torch.allclose(loss, ((pred - target) ** 2).mean())
    assert objective.compute_loss(target, latents, noise, timesteps, scheduler, prediction_type, 0.0) == 0


def test_min_snr_weights_follow_the_paper(scheduler):
    pred, latents, noise, timesteps = _inputs()
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.clamp(snr, max=5.0) / snr).mean()
    loss = objective.compute_loss(pred, latents, noise, timesteps, scheduler, "epsilon", 5.0)
    assert torch.allclose(loss, expected, rtol=1e-5)
    # v-prediction divides by snr + 1; x0 keeps min(snr, gamma)
    v_target = scheduler.get_velocity(latents, noise, timesteps)
    v_expected = (((pred - v_target) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    assert torch.allclose(objective.compute_loss(pred, latents, noise, timesteps, scheduler, "v_prediction", 5.0),
                          v_expected, rtol=1e-5)


def test_unknown_prediction_type_is_an_error(scheduler):
    with pytest.raises(ValueError, match="unknown prediction type"):
        objective.compute_loss(*_inputs(), scheduler, "flow", 0.0)


def test_checkpoint_discovery_ignores_partial_ones(tmp_path):
    folder = tmp_path / training_loop.CHECKPOINT_DIR_NAME
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.partial", "checkpoint-x", "notes"):
        (folder / name).mkdir(parents=True)
    (folder / "checkpoint-10" / training_loop.PROGRESS_FILE).write_text("{}")
    assert [p.name for p in training_loop.checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert training_loop.find_resume_checkpoint(tmp_path, "latest").name == "checkpoint-10"
    assert training_loop.find_resume_checkpoint(tmp_path, None) is None
    assert training_loop.find_resume_checkpoint(tmp_path / "empty", "latest") is None  # fresh start
    assert training_loop.find_resume_checkpoint(tmp_path, "checkpoint-10").name == "checkpoint-10"
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        training_loop.find_resume_checkpoint(tmp_path, "checkpoint-2")


class CheckpointAccelerator:
    """What save_checkpoint asks of accelerate: one process, and a save_state that writes part of a
    checkpoint (safetensors, as the hooks do) and then meets ``error`` (None: completes)."""

    is_main_process, num_processes = True, 1

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({"w": torch.zeros(64)}, os.path.join(folder, "denoiser.lora.safetensors"))
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("error, free", [
    (OSError(28, "No space left on device"), None),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 37760 vs 37652"), 0),  # torch
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), None),  # safetensors
])
def test_a_checkpoint_the_disk_refuses_leaves_nothing_and_says_why_in_one_line(tmp_path, monkeypatch, error, free):
    from versat2i import safe_io

    kept = training_loop.save_checkpoint(CheckpointAccelerator(), tmp_path, 3, total_limit=2)
    if free is not None:  # the disk as it is when torch's short write happens
        monkeypatch.setattr(safe_io, "_free_bytes", lambda folder: free)
    with pytest.raises(training_loop.CheckpointWriteError) as info:
        training_loop.save_checkpoint(CheckpointAccelerator(error), tmp_path, 6, total_limit=2)
    message = str(info.value)
    folder = tmp_path / training_loop.CHECKPOINT_DIR_NAME
    assert message.startswith(f"the checkpoint of step 6 {str(folder)!r}: could not be written: no space left on "
                              "the disk; free space on it"), message
    assert "Training stopped; the last complete checkpoint (checkpoint-3) is kept" in message and "\n" not in message
    assert info.value.errno == 28
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3"]  # no .checkpoint-6.partial left
    assert training_loop.find_resume_checkpoint(tmp_path, "latest") == kept


def test_a_checkpoint_that_fails_for_a_bug_is_not_reported_as_a_disk_problem(tmp_path):
    with pytest.raises(KeyError):
        training_loop.save_checkpoint(CheckpointAccelerator(KeyError("bug")), tmp_path, 6, total_limit=2)
    assert list((tmp_path / training_loop.CHECKPOINT_DIR_NAME).iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_checkpoint_files_get_the_umask_mode(tmp_path):
    final = training_loop.save_checkpoint(CheckpointAccelerator(), tmp_path, 3, total_limit=2)
    mode = 0o666 & ~_umask()
    assert [oct(p.stat().st_mode & 0o777) for p in final.iterdir()] == [oct(mode)]  # safetensors wrote 0600


def _umask() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)


def test_loss_curve_points_are_thinned_means():
    history = [(step, float(step)) for step in range(1, 1001)]
    points = training_loop.loss_curve_points(history, max_points=100)
    assert len(points) == 100 and points[0] == [10, 5.5] and points[-1][0] == 1000
    assert training_loop.loss_curve_points([(1, None), (2, 2.0)]) == [[2, 2.0]]
    assert training_loop.loss_curve_points([]) == []


def test_lora_layers_go_where_asked(tmp_path):
    from tiny_models.sd import tiny_sd15_components

    class Base:  # the fields add_lora_adapters uses
        def __init__(self):
            parts = tiny_sd15_components()
            self.architecture = ARCHITECTURES["sd15"]
            self.denoiser, self.vae, self.text_encoders = parts["unet"], parts["vae"], [parts["text_encoder"]]

    def lora_modules(module):
        return {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A" in n}

    config = LoraTrainConfig(base_model="m", dataset_dir="d", output_dir="o", output_name="x", work_dir="w", rank=2)
    base = Base()
    trainable = train_lora.add_lora_adapters(base, config)
    assert [name for name, _ in trainable] == ["unet"]
    denoiser_layers = lora_modules(base.denoiser)
    assert denoiser_layers and all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for n in denoiser_layers)
    assert not lora_modules(base.text_encoders[0])
    trainable_params = {n for n, p in base.denoiser.named_parameters() if p.requires_grad}
    assert trainable_params and all("lora_" in n for n in trainable_params)
    assert not any(p.requires_grad for p in base.vae.parameters())

    base = Base()
    full = config.replace(train_text_encoder=True, train_feed_forward=True)
    assert [name for name, _ in train_lora.add_lora_adapters(base, full)] == ["unet", "text_encoder"]
    assert any(n.endswith("ff.net.2") for n in lora_modules(base.denoiser))
    assert {n.split(".")[-1] for n in lora_modules(base.text_encoders[0])} == {"q_proj", "k_proj", "v_proj",
                                                                              "out_proj", "fc1", "fc2"}


def test_run_fingerprint_sees_data_and_model_changes(tmp_path):
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=2)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    config = tiny_lora_config(tmp_path, model, dataset)
    first = train_lora.lora_run_fingerprint(config)
    assert train_lora.lora_run_fingerprint(config.replace(work_dir="elsewhere")) == first
    caption = dataset / "5_aesthetics" / "p00000_c000.txt"
    caption.write_text("an edited caption")
    os.utime(caption, ns=(1, 1))
    second = train_lora.lora_run_fingerprint(config)
    assert second != first
    model.write_bytes(b"other weights")
    third = train_lora.lora_run_fingerprint(config)
    assert third != second
    # The config folder of a single file builds the model too: a sidecar appearing or being edited,
    # or an edited model_config_dir, is another base model.
    sidecar = tmp_path / "model.configs" / "unet" / "config.json"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text('{"sample_size": 8}')
    fourth = train_lora.lora_run_fingerprint(config)
    assert fourth != third
    sidecar.write_text('{"sample_size": 16}')
    os.utime(sidecar, ns=(2, 2))  # (a write within the file system's clock tick may keep the mtime)
    assert train_lora.lora_run_fingerprint(config) != fourth
    explicit = config.replace(model_config_dir=str(tmp_path / "model.configs"))
    fifth = train_lora.lora_run_fingerprint(explicit)
    sidecar.write_text('{"sample_size": 32}')
    os.utime(sidecar, ns=(3, 3))
    assert train_lora.lora_run_fingerprint(explicit) != fifth


def test_mixed_precision_auto_is_full_precision_without_cuda(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_lora.resolve_mixed_precision("auto") == "no"
    assert train_lora.resolve_mixed_precision("bf16") == "bf16"


def test_mixed_precision_auto_follows_the_device_the_run_uses(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train_lora.resolve_mixed_precision("auto") == "bf16"
    assert train_lora.resolve_mixed_precision("auto", cpu=True) == "no"  # accelerate launch --cpu
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what accelerate launch --cpu tells the child
    assert train_lora.resolve_mixed_precision("auto") == "no"
    assert train_lora.resolve_mixed_precision("fp16") == "fp16"


def test_run_fingerprint_uses_the_resolved_precision_and_cached_latents(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=1)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    auto = tiny_lora_config(tmp_path, model, dataset, mixed_precision="auto")
    fingerprint = train_lora.lora_run_fingerprint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = fingerprint(auto)
    assert on_cpu == fingerprint(auto.replace(mixed_precision="no"))  # the same run
    assert on_cpu == fingerprint(auto, cpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    on_gpu = fingerprint(auto)
    assert on_gpu != on_cpu  # bf16 on the GPU is another result than fp32 on the CPU
    assert on_gpu == fingerprint(auto.replace(mixed_precision="bf16"))
    assert fingerprint(auto, cpu=True) == on_cpu  # ComfyUI --cpu on a machine with a GPU
    assert fingerprint(auto.replace(cache_latents=True)) != on_gpu


def test_parse_args():
    args = train_lora.parse_args(["--config", "c.toml", "--resume", "latest"])
    assert (args.config, args.resume, args.log_file) == ("c.toml", "latest", None)


# -- the `versat2i train-lora` command ------------------------------------------------------------

def _cli(argv):
    from versat2i.cli import main

    return main(argv)


def test_cli_prints_a_config_that_loads(capsys):
    assert _cli(["train-lora", "--print-config"]) == 0
    text = capsys.readouterr().out
    loaded = LoraTrainConfig.from_toml(text)
    assert loaded.rank == LoraTrainConfig.__dataclass_fields__["rank"].default
    assert loaded.output_name == "versat2i/aesthetics"


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=1)
    config = tiny_lora_config(tmp_path, dataset, dataset, resolution=100)
    path = config.save(tmp_path / "c.toml")
    assert _cli(["train-lora", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "resolution=100: must be a multiple of 8" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "loras").exists()


def test_cli_reports_an_empty_dataset_before_starting(tmp_path, capsys):
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=1)
    (dataset / "5_aesthetics" / "p00000_c000.png").unlink()
    path = tiny_lora_config(tmp_path, dataset, dataset).save(tmp_path / "c.toml")
    assert _cli(["train-lora", "--config", str(path)]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_subcommand_is_registered():
    from versat2i.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train-lora", "--config", "x.toml", "--resume", "latest", "--cpu"])
    assert isinstance(args, argparse.Namespace) and args.resume == "latest" and args.cpu


def test_a_second_run_on_a_locked_work_dir_fails_at_once(tmp_path):
    """An orphaned training child (its parent was SIGKILLed) keeps the work folder locked; a re-run
    must refuse it instead of writing checkpoints into the same folder."""
    from versat2i.trainer.training_loop import work_dir_lock

    work_dir = tmp_path / "run"
    with work_dir_lock(work_dir):
        with pytest.raises(RuntimeError, match="another training run .* is using this folder"):
            with work_dir_lock(work_dir):
                pass
    with work_dir_lock(work_dir):  # released: the next run goes ahead
        pass


def test_legacy_model_hash_is_kohyas_short_hash(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000  # 1.2 MiB: the hashed window is bytes 1 MiB .. 1 MiB + 64 KiB
    (tmp_path / "model.safetensors").write_bytes(data)
    expected = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert train_lora.legacy_model_hash(tmp_path / "model.safetensors") == expected
    (tmp_path / "small.safetensors").write_bytes(b"x" * 1000)  # shorter than 1 MiB: the hash of nothing
    assert train_lora.legacy_model_hash(tmp_path / "small.safetensors") == hashlib.sha256(b"").hexdigest()[:8]
    assert train_lora.legacy_model_hash(tmp_path) is None  # a diffusers folder
