"""The LoRA training program under ``accelerate launch`` on a tiny SD1.5-shaped model (CPU, offline).

One uninterrupted run is shared by several tests (it is the reference for the resume test). The
resume test kills the child with SIGKILL part-way, resumes with ``--resume latest`` and compares the
final LoRA with the uninterrupted one; meanwhile a thread polls the loras folder to check that the
final name never holds a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config
from tiny_models.sd import build_tiny_sd15

from versat2i.trainer import train_lora, training_loop
from versat2i.trainer.events import read_events
from versat2i.trainer.launcher import (
    LaunchOptions,
    TrainingFailed,
    run_command,
    run_training,
)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="kills process groups with POSIX signals")

STEPS = 16
# The training set: 3 images x 3 repeats in batches of 2 -> 5 batches per epoch (the last of one image).
# An odd count, so with 2 micro-batches per optimiser step the accumulation groups run across epoch
# ends (steps 3, 8, 13: batches 4+5, 14+15, 24+25).
IMAGES, REPEATS = 3, 3
KILL_AFTER_CHECKPOINT = 6  # step 6 = 12 batches: the resumed run starts mid-epoch (epoch 2, batch 2)
# A config that exercises what resume must restore: lr schedule with warm-up, accumulation across
# epoch ends, LoRA dropout (global RNG), noise offset and min-SNR (noise generator).
RESUME_SETTINGS = dict(max_train_steps=STEPS, checkpointing_steps=3, checkpoints_total_limit=2,
                       gradient_accumulation_steps=2, learning_rate=2e-2, lr_scheduler="constant_with_warmup",
                       lr_warmup_steps=2,
                       dropout=0.1, noise_offset=0.05, snr_gamma=5.0)


class FolderWatcher:
    """Polls a folder every few ms and records every time ``name`` is seen, and whether it was complete."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self.sightings: list[bool] = []  # True: a complete, loadable safetensors file
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            path = self.folder / self.name
            if path.exists():
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        for key in handle.keys():
                            handle.get_tensor(key)
                    self.sightings.append(True)
                except Exception:
                    self.sightings.append(False)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def launch(config_path: Path, **kwargs):
    return run_training(["--config", str(config_path), "--resume", "latest"], options=LaunchOptions(cpu=True), **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd15")
    return build_tiny_sd15(root), make_kohya_dataset(root / "dataset", aspects={"aesthetics": REPEATS},
                                                     images_per_aspect=IMAGES)


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted run from the diffusers folder."""
    model, dataset = tiny
    tmp = tmp_path_factory.mktemp("reference")
    config = tiny_lora_config(tmp, model.folder, dataset, **RESUME_SETTINGS)
    config_path = config.save(tmp / "config.toml")
    with FolderWatcher(config.output_path.parent, config.output_path.name) as watcher:
        result = launch(config_path)
    return config, result, watcher


@pytest.mark.slow
def test_training_writes_a_kohya_lora_with_metadata(reference_run):
    config, result, watcher = reference_run
    assert result.lora_path == config.output_path
    tensors = load_file(str(config.output_path))
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    suffixes = {key.split(".", 1)[1] for key in tensors}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(float(v) == 4.0 for k, v in tensors.items() if k.endswith(".alpha"))
    assert any("attn2_to_q" in key for key in tensors) and not any("_ff_" in key for key in tensors)
    with safe_open(str(config.output_path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["versat2i_fingerprint"] == train_lora.lora_run_fingerprint(config)
    assert "ss_sd_model_hash" not in metadata  # a diffusers folder has no A1111 short hash
    assert metadata["versat2i_aspect"] == "aesthetics" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_steps"] == str(STEPS) and len(metadata["versat2i_base_model_sha256"]) == 64
    stored = json.loads(metadata["versat2i_config"])
    assert stored["rank"] == 4 and stored["dataset_dir"] == "dataset"  # settings kept, local paths cut
    assert str(config.dataset_dir) not in str(metadata)
    assert watcher.sightings and all(watcher.sightings)  # the final name only ever held a complete file
    assert not [p for p in config.output_path.parent.iterdir() if p.name != config.output_path.name]  # no temp left


def test_progress_events_and_log(reference_run):
    config, result, _ = reference_run
    kinds = [e["event"] for e in result.events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    steps = [e for e in result.events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(e["total"] == STEPS and e["eta_s"] >= 0 and e["lr"] >= 0 for e in steps)
    assert steps[0]["lr"] < steps[2]["lr"]  # warm-up
    checkpoints = [e["step"] for e in result.events if e["event"] == "checkpoint"]
    assert checkpoints == [3, 6, 9, 12, 15]
    assert [p.name for p in training_loop.checkpoint_dirs(config.work_dir)] == ["checkpoint-12", "checkpoint-15"]
    assert read_events(Path(config.work_dir) / training_loop.LOG_FILE_NAME) == result.events


def test_loss_falls_on_an_overfit_set(reference_run, tiny):
    """The logged loss falls, and the LoRA (loaded by diffusers from the kohya file) lowers the loss on
    the training images at fixed noise and timesteps."""
    from diffusers import StableDiffusionPipeline

    from versat2i.trainer.kohya_dataset import KohyaDataset
    from versat2i.training_set.folders import scan_training_set

    config, result, _ = reference_run
    model, dataset_dir = tiny
    losses = [loss for _, loss in result.losses]
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) / quarter < 0.9 * sum(losses[:quarter]) / quarter

    pipe = StableDiffusionPipeline.from_pretrained(str(model.folder), safety_checker=None)
    pipe.load_lora_weights(str(config.output_path))
    images = scan_training_set(dataset_dir, "aesthetics")
    data = KohyaDataset(images, resolution=64)
    pixels = torch.stack([data.load_pixels(i)[0] for i in range(len(data))])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([im.caption for im in images], padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        totals = {"lora": 0.0, "base": 0.0}
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            for which in totals:
                pipe.enable_lora() if which == "lora" else pipe.disable_lora()
                prediction = pipe.unet(noisy, timesteps, hidden).sample
                totals[which] += torch.nn.functional.mse_loss(prediction, noise).item()
    assert totals["lora"] < 0.9 * totals["base"]


def test_batches_per_epoch_are_odd_so_accumulation_spans_epoch_ends(tiny):
    from versat2i.trainer.kohya_dataset import BucketBatchSampler
    from versat2i.training_set.folders import scan_training_set

    images = scan_training_set(tiny[1], "aesthetics")
    sampler = BucketBatchSampler([(64, 64)] * len(images), [im.repeats for im in images], 2)
    assert len(sampler) % 2 == 1 and RESUME_SETTINGS["gradient_accumulation_steps"] == 2


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_lora(reference_run, tiny, tmp_path):
    reference_config, _, _ = reference_run
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.folder, dataset, **RESUME_SETTINGS)
    config_path = config.save(tmp_path / "config.toml")
    started, killed = {}, {}

    def kill_after_checkpoint(event):
        # SIGKILL (no clean-up of any kind) as soon as the step-6 checkpoint is complete (the event
        # follows its rename). The child trains on meanwhile, so on a loaded machine a later
        # checkpoint may complete before the signal lands: what resumes is read from disk below.
        if event["event"] == "checkpoint" and event["step"] == KILL_AFTER_CHECKPOINT:
            os.killpg(started["child"].pgid, signal.SIGKILL)
            killed["at"] = event["step"]

    with FolderWatcher(config.output_path.parent, config.output_path.name) as watcher:
        with pytest.raises(TrainingFailed) as err:
            launch(config_path, on_event=kill_after_checkpoint, on_start=lambda c: started.setdefault("child", c))
        assert killed == {"at": KILL_AFTER_CHECKPOINT} and err.value.returncode == -signal.SIGKILL
        assert not config.output_path.exists() and watcher.sightings == []
        left = [int(p.name.removeprefix("checkpoint-")) for p in training_loop.checkpoint_dirs(config.work_dir)]
        assert left and left[-1] in range(KILL_AFTER_CHECKPOINT, STEPS, 3)
        if left[-1] == KILL_AFTER_CHECKPOINT:  # the usual case: the kill landed before checkpoint 9
            assert left == [3, 6]
        logged = [e["step"] for e in read_events(Path(config.work_dir) / training_loop.LOG_FILE_NAME)
                  if e["event"] == "step"]
        assert logged == list(range(1, logged[-1] + 1)) and left[-1] <= logged[-1] < STEPS

        result = launch(config_path)
    resumed_from = left[-1]
    start = next(e for e in result.events if e["event"] == "start")
    assert start["start_step"] == resumed_from and start["resumed_from"].endswith(f"checkpoint-{resumed_from}")
    assert [e["step"] for e in result.events if e["event"] == "step"] == list(range(resumed_from + 1, STEPS + 1))
    assert all(watcher.sightings)

    resumed, reference = load_file(str(config.output_path)), load_file(str(reference_config.output_path))
    assert resumed.keys() == reference.keys()
    worst = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-6
    # the metadata loss curve spans the whole run, both processes
    with safe_open(str(config.output_path), framework="pt") as handle:
        curve = handle.metadata()["versat2i_loss_curve"]
    assert [step for step, _ in json.loads(curve)] == list(range(1, STEPS + 1))


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a disk that really fills up (mounting needs root; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_at_a_checkpoint_stops_the_run_in_one_line_and_resume_works(reference_run, tiny, tmp_path,
                                                                                small_disk):
    """The disk fills up right after checkpoint 3 (a file takes all but 4 KiB): checkpoint 6 cannot
    be written. The run stops with one line saying so, leaves no partial checkpoint behind (it would
    keep the disk full), and once there is space again the run resumes from checkpoint 3 to the same
    LoRA as an uninterrupted run."""
    reference_config, _, _ = reference_run
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.folder, dataset, work_dir=str(small_disk / "run"), **RESUME_SETTINGS)
    config_path = config.save(tmp_path / "config.toml")
    filler = small_disk / "filler"

    def fill_the_disk_after_checkpoint_3(event):
        if event["event"] == "checkpoint" and event["step"] == 3:
            with open(filler, "wb") as handle:
                handle.write(bytes(shutil.disk_usage(small_disk).free - 4096))

    with pytest.raises(TrainingFailed) as err:
        launch(config_path, on_event=fill_the_disk_after_checkpoint_3)
    message = str(err.value)
    checkpoints = small_disk / "run" / training_loop.CHECKPOINT_DIR_NAME
    assert message.startswith(f"training stopped: the checkpoint of step 6 {str(checkpoints)!r}: could not be "
                              "written: no space left on the disk; free space on it"), message
    assert "the last complete checkpoint (checkpoint-3) is kept" in message and "\n" not in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3"]

    filler.unlink()
    result = launch(config_path)
    start = next(e for e in result.events if e["event"] == "start")
    assert start["start_step"] == 3
    resumed, reference = load_file(str(config.output_path)), load_file(str(reference_config.output_path))
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6


def test_the_longest_accepted_lora_name_trains_to_its_final_save_and_one_byte_more_is_refused_first(tiny, tmp_path):
    """A LoRA name is valid only if everything written under it fits: the file, its temporary name
    (14 bytes longer) and the run folder with its checkpoints. Before, a 242-255-byte name trained
    to the last step and then failed to save."""
    from versat2i.trainer.lora_job import train_or_reuse

    model, dataset = tiny
    name = "x" * (241 - len(".safetensors"))
    config = tiny_lora_config(tmp_path, model.folder, dataset, output_name=f"versat2i/{name}", max_train_steps=3,
                              checkpointing_steps=1, keep_checkpoints=True)
    with pytest.raises(ValueError, match="output_name: 'xxx.*' is 242 bytes long"):
        train_or_reuse(config.replace(output_name=f"versat2i/{name}x"), runs_root=tmp_path / "runs",
                       options=LaunchOptions(cpu=True))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "loras").exists()
    result = train_or_reuse(config, runs_root=tmp_path / "runs", options=LaunchOptions(cpu=True))
    assert result.lora_path.name == f"{name}.safetensors" and result.lora_path.is_file()
    (run,) = (tmp_path / "runs" / "versat2i").iterdir()
    assert run.name.startswith(f"{name}-") and len(run.name) == len(name) + 13
    assert [p.name for p in training_loop.checkpoint_dirs(run)] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow
def test_trains_from_a_single_file_checkpoint(tiny, tmp_path):
    """The ComfyUI-layout single file (model.diffusion_model.* ...) trains like the folder: a few
    dozen optimiser steps, and the loss falls on the overfit set."""
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.checkpoint, dataset, max_train_steps=STEPS, checkpointing_steps=100,
                              gradient_accumulation_steps=2, learning_rate=2e-2,
                              model_config_dir=str(model.folder), cache_latents=True, cache_text_embeddings=True,
                              train_feed_forward=True)
    result = launch(config.save(tmp_path / "config.toml"))
    losses = [loss for _, loss in result.losses]
    quarter = len(losses) // 4
    print(f"single file: loss {sum(losses[:quarter]) / quarter:.4f} -> {sum(losses[-quarter:]) / quarter:.4f}")
    assert len(losses) == STEPS and sum(losses[-quarter:]) / quarter < 0.9 * sum(losses[:quarter]) / quarter
    tensors = load_file(str(result.lora_path))
    assert any("_ff_net_" in key for key in tensors)
    with safe_open(str(result.lora_path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["versat2i_arch"] == "sd15" and metadata["ss_steps"] == str(STEPS)
    # kohya's / A1111's short model hash: SHA-256 of the 64 KiB at 1 MiB into the checkpoint, 8 digits
    data = model.checkpoint.read_bytes()
    assert len(data) > 0x110000
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()


def test_a_crash_in_the_child_surfaces_its_error(tiny, tmp_path):
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, tmp_path / "model-deleted-after-queueing", dataset)
    with pytest.raises(TrainingFailed) as err:
        launch(config.save(tmp_path / "config.toml"))
    assert err.value.returncode != 0
    assert "base_model=" in str(err.value) and "no such file or folder" in str(err.value)  # the child's traceback
    assert not config.output_path.exists()


# -- other architectures, in-process (``main`` is what the child runs; no launch overhead) -------

@pytest.mark.parametrize("arch, settings, key_prefixes", [
    # SDXL: both text encoders trained, non-square buckets (crop / size micro-conditioning), flips
    ("sdxl", dict(train_text_encoder=True, random_flip=True, bucket_step=8),
     {"lora_unet_", "lora_te1_", "lora_te2_"}),
    # SD2 v-prediction: cached latents and text embeddings, min-SNR for v
    ("sd2", dict(cache_latents=True, cache_text_embeddings=True, snr_gamma=5.0), {"lora_unet_"}),
])
def test_other_architectures_train_in_process(tmp_path, capsys, arch, settings, key_prefixes):
    from tiny_models.sd import build_tiny_model

    model = build_tiny_model(arch, tmp_path / "model")
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=2, sizes=[(80, 48), (64, 64)])
    config = tiny_lora_config(tmp_path, model.folder, dataset, max_train_steps=2, checkpointing_steps=100, **settings)
    output = train_lora.main(train_lora.parse_args(["--config", str(config.save(tmp_path / "c.toml"))]))
    tensors = load_file(str(output))
    assert {prefix for prefix in key_prefixes if any(k.startswith(prefix) for k in tensors)} == key_prefixes
    with safe_open(str(output), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["versat2i_arch"] == arch
    assert metadata["versat2i_prediction_type"] == ("v_prediction" if arch == "sd2" else "epsilon")
    events = read_events(Path(config.work_dir) / training_loop.LOG_FILE_NAME)
    assert [e["event"] for e in events] == ["start", "step", "step", "done"]
    assert all(e["loss"] is not None and e["loss"] > 0 for e in events if e["event"] == "step")


def test_a_resumed_run_reads_its_loss_history_from_the_log_file_it_writes(tiny, tmp_path, capsys):
    """With --log_file the events go there, not to the work folder: the loss history a resumed run
    puts in the LoRA's curve must come from that same file."""
    model, dataset = tiny
    config = tiny_lora_config(tmp_path, model.folder, dataset, max_train_steps=4, checkpointing_steps=2,
                              overwrite=True)
    log_file = tmp_path / "elsewhere" / "events.jsonl"
    args = ["--config", str(config.save(tmp_path / "c.toml")), "--log_file", str(log_file)]
    train_lora.main(train_lora.parse_args(args))
    first_run = {e["step"]: e["loss"] for e in read_events(log_file) if e["event"] == "step"}
    assert sorted(first_run) == [1, 2, 3, 4] and not (Path(config.work_dir) / training_loop.LOG_FILE_NAME).exists()

    output = train_lora.main(train_lora.parse_args([*args, "--resume", "checkpoint-2"]))  # steps 3 and 4 again
    with safe_open(str(output), framework="pt") as handle:
        curve = json.loads(handle.metadata()["versat2i_loss_curve"])
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert curve[:2] == [[1, round(first_run[1], 6)], [2, round(first_run[2], 6)]]  # read back from the file


def test_gradient_checkpointing_runs_and_leaves_the_result_unchanged(tiny, tmp_path, monkeypatch, capsys):
    """Recomputing activations in the backward pass must not change the maths: same seed, same LoRA."""
    import torch.utils.checkpoint

    model, dataset = tiny
    recomputed = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        recomputed.append(getattr(function, "__qualname__", repr(function)))
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    loras = {}
    for enabled in (False, True):
        run = tmp_path / f"checkpointing-{enabled}"
        config = tiny_lora_config(run, model.folder, dataset, max_train_steps=3, checkpointing_steps=100,
                                  gradient_checkpointing=enabled, dropout=0.1, train_text_encoder=True)
        output = train_lora.main(train_lora.parse_args(["--config", str(config.save(run / "c.toml"))]))
        loras[enabled] = load_file(str(output))
        assert bool(recomputed) == enabled  # diffusers' UNet blocks went through activation checkpointing
    assert loras[True].keys() == loras[False].keys()
    assert any(k.startswith("lora_te_") for k in loras[True])
    worst = max((loras[True][k] - loras[False][k]).abs().max().item() for k in loras[False])
    assert worst <= 1e-6
    changed = max((loras[True][k]).abs().max().item() for k in loras[True] if "lora_up" in k)
    assert changed > 0  # the LoRA trained (lora_up starts at zero)


# -- several processes ---------------------------------------------------------------------------------

TWO_PROCESS_SCRIPT = """
import json, os, sys
from pathlib import Path
from versat2i.trainer import train_lora

sizes = []
compute_loss = train_lora.compute_loss

def recording_compute_loss(model_pred, latents, *args, **kwargs):  # the images this process trains per batch
    sizes.append(latents.shape[0])
    return compute_loss(model_pred, latents, *args, **kwargs)

train_lora.compute_loss = recording_compute_loss
try:
    train_lora.main(train_lora.parse_args(["--config", sys.argv[1]]))
finally:
    Path(sys.argv[2] + ".rank" + os.environ["RANK"]).write_text(json.dumps(sizes))
"""


@pytest.mark.slow
def test_two_processes_with_uneven_bucket_batches_finish(tiny, tmp_path):
    """Two CPU processes (gloo, as torchrun starts them under accelerate): one bucket of two images
    and one of a single image, batch 2, so the processes train batches of different sizes at the
    same step (gathering one loss per image would give all_gather tensors of different shapes)."""
    model, _ = tiny
    dataset = make_kohya_dataset(tmp_path / "ds", aspects={"aesthetics": 1}, images_per_aspect=3,
                                 sizes=[(80, 48), (64, 64)])
    steps = 4
    config = tiny_lora_config(tmp_path, model.folder, dataset, max_train_steps=steps, checkpointing_steps=2,
                              bucket_step=8)
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    deadline = time.monotonic() + 300  # a collective that waits forever must fail the test, not hang it
    result = run_command(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(config.save(tmp_path / "config.toml")), str(tmp_path / "sizes")],
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
        check_cancel=lambda: time.monotonic() > deadline)
    sizes = [json.loads((tmp_path / f"sizes.rank{rank}").read_text()) for rank in (0, 1)]
    assert len(sizes[0]) == len(sizes[1]) == steps  # both processes ran every step
    assert any(a != b for a, b in zip(*sizes))  # and some step had batches of different sizes
    assert set(sizes[0]) | set(sizes[1]) == {1, 2}  # a bucket's short batch is trained as it is
    assert [e["step"] for e in result.events if e["event"] == "step"] == list(range(1, steps + 1))
    assert all(e["loss"] is not None and e["loss"] > 0 for e in result.events if e["event"] == "step")
    assert result.lora_path == config.output_path
    keys = set(load_file(str(result.lora_path)))  # one kohya LoRA, written once by the main process
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert modules and all(m.startswith("lora_unet_") for m in modules)
    assert keys == {f"{m}.{suffix}" for m in modules for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
