"""Train one aspect LoRA on a kohya-style training set. Run under ``accelerate launch``.

    python -m accelerate.commands.launch [accelerate options] trainer/launch_entry.py \\
        --config run.toml [--resume latest]

(``trainer/launcher.py`` builds that command; ``versat2i train-lora`` and the Train Aspect LoRA node
use it.) One loop in the shape of diffusers' ``train_text_to_image_lora(_sdxl).py``: peft LoRA layers
on the UNet attention projections (optionally the feed-forward layers and the text encoders),
AdamW, a diffusers lr schedule, accelerate for devices, mixed precision, gradient accumulation and
checkpoints. What it adds to the example:

* exact resume: the batch order is a function of (seed, epoch) (``BucketBatchSampler``), the noise
  comes from a generator saved in every checkpoint, and the position in the data is saved too, so a
  run killed at any step and resumed with ``--resume latest`` ends with the LoRA an uninterrupted
  run would have written;
* checkpoints appear atomically (written under a hidden name, then renamed), so ``latest`` never
  picks a half-written one;
* progress as JSON-line events (``trainer/events.py``) on stdout and in ``<work_dir>/train_log.jsonl``;
* the final LoRA in kohya keys, written atomically by ``lora_io.save_kohya_lora``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import LoraTrainConfig, resolve_mixed_precision
from .events import EventWriter, read_events

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".train.lock"
LOG_FILE_NAME = "train_log.jsonl"
CHECKPOINT_DIR_NAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_FILE = "progress.json"
# peft target module names (diffusers' attention / feed-forward, transformers' CLIP layers).
UNET_ATTENTION_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_FEED_FORWARD_MODULES = ["ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_FEED_FORWARD_MODULES = ["fc1", "fc2"]
LOSS_CURVE_MAX_POINTS = 256
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


# -- helpers ---------------------------------------------------------------------------------------

def add_lora_adapters(base, config: LoraTrainConfig) -> list[tuple[str, torch.nn.Module]]:
    """Freeze the base model and add peft LoRA layers; returns the (name, module) pairs that train."""
    from peft import LoraConfig, inject_adapter_in_model

    for module in (base.unet, base.vae, *base.text_encoders):
        if module is not None:
            module.requires_grad_(False)
    unet_targets = UNET_ATTENTION_MODULES + (UNET_FEED_FORWARD_MODULES if config.train_feed_forward else [])
    # Gaussian init (as in diffusers' examples): B starts at zero, so the untrained LoRA is a no-op.
    base.unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                     init_lora_weights="gaussian", target_modules=unet_targets))
    trainable = [("unet", base.unet)]
    if config.train_text_encoder:
        te_targets = TEXT_ENCODER_ATTENTION_MODULES + (
            TEXT_ENCODER_FEED_FORWARD_MODULES if config.train_feed_forward else [])
        for index, encoder in enumerate(base.text_encoders):
            # peft directly, not transformers' ``add_adapter``: transformers 5 refuses peft < 0.22 there.
            inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                               init_lora_weights="gaussian", target_modules=te_targets),
                                    encoder, adapter_name="default")
            trainable.append(("text_encoder" if index == 0 else f"text_encoder_{index + 1}", encoder))
    return trainable


def checkpoint_dirs(work_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (hidden ``.checkpoint-N.partial`` folders are ignored)."""
    folder = Path(work_dir) / CHECKPOINT_DIR_NAME
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_resume_checkpoint(work_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if there is none); else the given folder."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(work_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(work_dir) / CHECKPOINT_DIR_NAME / resume
    if not (path / PROGRESS_FILE).is_file():
        raise ValueError(f"--resume {resume}: {path} is not a checkpoint folder of this trainer")
    return path


def loss_curve_points(history: list[tuple[int, float]], max_points: int = LOSS_CURVE_MAX_POINTS) -> list[list[float]]:
    """[[step, mean loss], ...] with at most ``max_points`` rows (means over equal step windows)."""
    if not history:
        return []
    window = max(1, math.ceil(len(history) / max_points))
    points = []
    for start in range(0, len(history), window):
        chunk = [(s, loss) for s, loss in history[start:start + window] if loss is not None]
        if chunk:
            points.append([chunk[-1][0], round(sum(loss for _, loss in chunk) / len(chunk), 6)])
    return points


def loss_history_from_log(log_path: Path, before_step: int) -> list[tuple[int, float]]:
    """Step losses a resumed run already logged (steps <= ``before_step``, last write wins)."""
    if not log_path.is_file():
        return []
    by_step = {e["step"]: e["loss"] for e in read_events(log_path) if e["event"] == "step" and e["step"] <= before_step}
    return sorted(by_step.items())


@dataclass
class TrainingProgress:
    """Where the run is; saved in every checkpoint next to accelerate's state."""

    global_step: int = 0  # optimiser updates done
    batches_seen: int = 0  # micro-batches consumed (locates the position inside an epoch)
    fingerprint: str = ""

    def save(self, folder: Path, accelerator, noise_generator: torch.Generator) -> None:
        """``progress.json`` (main process) and this process's noise generator state."""
        from safetensors.torch import save_file

        if accelerator.is_main_process:
            (folder / PROGRESS_FILE).write_text(json.dumps(self.__dict__))
        # Every process has its own noise stream.
        save_file({"state": noise_generator.get_state()},
                  str(folder / f"noise_rng_{accelerator.process_index}.safetensors"))

    def load(self, folder: Path, accelerator, noise_generator: torch.Generator) -> str:
        """Restore the step counters and the noise generator; returns the fingerprint the
        checkpoint was saved with (compared with this run's by the caller)."""
        from safetensors.torch import load_file

        saved = json.loads((folder / PROGRESS_FILE).read_text())
        self.global_step = int(saved["global_step"])
        self.batches_seen = int(saved["batches_seen"])
        rng_file = folder / f"noise_rng_{accelerator.process_index}.safetensors"
        if not rng_file.is_file():  # resumed on more processes than saved: fall back to process 0's stream
            rng_file = folder / "noise_rng_0.safetensors"
        noise_generator.set_state(load_file(str(rng_file))["state"])
        return saved.get("fingerprint", "")


@dataclass
class LoraCheckpointHooks:
    """accelerate save/load hooks: store only the LoRA weights, the noise generator and the progress.

    (diffusers' examples do the same with closures inside ``main``; a small class keeps ``main`` flat.)
    """

    accelerator: Any
    trainable_names: list[str]
    noise_generator: torch.Generator
    progress: TrainingProgress
    loaded_fingerprint: str = field(default="", init=False)

    def save(self, models, weights, output_dir: str) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        out = Path(output_dir)
        if self.accelerator.is_main_process:
            for name, model in zip(self.trainable_names, models, strict=True):
                state = get_peft_model_state_dict(self.accelerator.unwrap_model(model))
                save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                          str(out / f"{name}.lora.safetensors"))
        while weights:  # the frozen base weights are not part of a checkpoint
            weights.pop()
        self.progress.save(out, self.accelerator, self.noise_generator)

    def load(self, models, input_dir: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(input_dir)
        for name in self.trainable_names:
            model = self.accelerator.unwrap_model(models.pop(0))
            state = load_file(str(folder / f"{name}.lora.safetensors"))
            result = set_peft_model_state_dict(model, state)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint {folder}: unexpected LoRA keys for {name} ({unexpected[:3]}...)")
        self.loaded_fingerprint = self.progress.load(folder, self.accelerator, self.noise_generator)


def save_checkpoint(accelerator, work_dir: Path, step: int, total_limit: int) -> Path:
    """``accelerator.save_state`` into a hidden folder, then rename it; keep the newest ``total_limit``."""
    folder = work_dir / CHECKPOINT_DIR_NAME
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f".{CHECKPOINT_PREFIX}{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # a stale one from an earlier, diverged run
        os.replace(partial, final)
        if total_limit > 0:
            for old in checkpoint_dirs(work_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def encode_images(base, pixels: torch.Tensor, device, dtype: torch.dtype,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of ``pixels`` [B,3,H,W] in -1..1: a sample of the VAE's posterior."""
    latent_dist = base.vae.encode(pixels.to(device, dtype=dtype)).latent_dist
    return latent_dist.sample(generator=generator) * base.vae_scaling_factor


def prepare_training_data(config, images, base, device, *, vae_dtype: torch.dtype):
    """(dataset, sampler, dataloader) of a training set, with the caches the config asks for filled
    first (latents, reusing generation latents of this checkpoint; text embeddings). Encoders that
    the cache made unnecessary go back to the CPU. Shared by the LoRA and gate trainers."""
    from .kohya_dataset import BucketBatchSampler, KohyaDataset, collate_examples
    from .model_loading import encode_prompts

    dataset = KohyaDataset(images, resolution=config.resolution, bucketing=config.bucketing,
                           bucket_step=config.bucket_step, bucket_max_aspect=config.bucket_max_aspect,
                           latent_scale=base.vae_scale_factor)
    if config.cache_latents:
        cache_generator = torch.Generator(device=device).manual_seed(config.seed)
        reused = dataset.cache_latents(lambda px: encode_images(base, px, device, vae_dtype, cache_generator),
                                       vae_sha256=base.source_sha256 or None)
        logger.info("cached latents for %d images (%d reused from generation)", len(dataset), reused)
        if base.vae is not None:
            base.vae.to("cpu")  # not needed on the device any more
    if config.cache_text_embeddings:
        def encode_captions(captions: list[str]) -> dict[str, torch.Tensor]:
            hidden, added = encode_prompts(base, captions, device)
            out = {"encoder_hidden_states": hidden}
            if added is not None:
                out["pooled_text_embeds"] = added["text_embeds"]
            return out

        dataset.cache_text_embeddings(encode_captions)
        for encoder in base.text_encoders:
            encoder.to("cpu")
    sampler = BucketBatchSampler(dataset.bucket_of, [im.repeats for im in images], config.train_batch_size,
                                 seed=config.seed, random_flip=config.random_flip)
    # Own generator: creating a DataLoader iterator draws a seed, which must not consume the global RNG
    # (the resumed run would otherwise see a different random stream).
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_examples, num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed))
    return dataset, sampler, dataloader


def noised_latents(batch: dict, base, device, *, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                   noise_generator: torch.Generator, noise_offset: float = 0.0):
    """(latents, noise, timesteps, noisy latents) of one batch: cached latents or the VAE's, noise
    and uniform timesteps, all drawn from ``noise_generator`` (saved in checkpoints: exact resume)."""
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        with torch.no_grad():
            latents = encode_images(base, batch["pixel_values"], device, vae_dtype, noise_generator)
    latents = latents.to(weight_dtype)
    noise = torch.randn(latents.shape, generator=noise_generator, device=device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=noise_generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=noise_generator, device=device).long()
    return latents, noise, timesteps, base.noise_scheduler.add_noise(latents, noise, timesteps)


def unet_conditioning(batch: dict, base, device, *, weight_dtype: torch.dtype, text_grad: bool):
    """(encoder_hidden_states, added_cond_kwargs) of one batch: cached embeddings or the text
    encoders' (with gradients when ``text_grad``), plus SDXL's size / crop micro-conditioning."""
    from .model_loading import encode_prompts

    if "encoder_hidden_states" in batch:
        hidden = batch["encoder_hidden_states"].to(device, dtype=weight_dtype)
        added = None
        if base.arch == "sdxl":
            added = {"text_embeds": batch["pooled_text_embeds"].to(device, dtype=weight_dtype)}
    else:
        with torch.set_grad_enabled(text_grad):
            hidden, added = encode_prompts(base, batch["caption"], device)
    if base.arch == "sdxl":
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        added = {"text_embeds": added["text_embeds"], "time_ids": time_ids.to(device=device, dtype=hidden.dtype)}
    return hidden, added


def compute_loss(model_pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 noise_scheduler, prediction_type: str, snr_gamma: float) -> torch.Tensor:
    """MSE against the target of ``prediction_type``, optionally min-SNR-gamma weighted
    (https://arxiv.org/abs/2303.09556; weights as in diffusers' examples)."""
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    if not snr_gamma:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:  # an x0 loss is already snr-times an epsilon loss: min(snr, gamma) / snr * snr
        weights = clipped
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim))) * weights
    return loss.mean()


def legacy_model_hash(path: str | os.PathLike) -> str | None:
    """A1111's old short model hash, which kohya's sd-scripts store as ``ss_sd_model_hash``: the first
    8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB of the file (``train_util.model_hash``;
    written here because no library we use exports it). None for a diffusers folder, which has no
    such hash."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def lora_metadata(config: LoraTrainConfig, base, *, fingerprint: str, steps: int, num_examples: int,
                  loss_curve: list[list[float]], manifest_sha256: str) -> dict[str, str]:
    """safetensors metadata: kohya ``ss_*`` fields other tools read, plus ``versat2i_*`` fields."""
    from .. import __version__

    dataset = Path(config.dataset_dir)
    legacy_hash = legacy_model_hash(base.source_path)
    return {
        **({"ss_sd_model_hash": legacy_hash} if legacy_hash else {}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_dropout": str(config.dropout),
        "ss_base_model_version": BASE_MODEL_VERSION.get(base.arch, base.arch),
        "ss_v2": str(base.arch == "sd2"),
        "ss_v_parameterization": str(base.prediction_type == "v_prediction"),
        "ss_new_sd_model_hash": base.source_sha256,
        "ss_sd_model_name": Path(base.source_path).name,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.bucketing),
        "ss_learning_rate": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr or config.learning_rate if config.train_text_encoder else 0),
        "ss_unet_lr": str(config.learning_rate),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_train_steps": str(config.max_train_steps),
        "ss_steps": str(steps),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": resolve_mixed_precision(config.mixed_precision),
        "ss_seed": str(config.seed),
        "ss_noise_offset": str(config.noise_offset),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_num_train_images": str(num_examples),
        "ss_output_name": Path(config.output_name).name,
        "ss_dataset_dirs": json.dumps({dataset.name: {"aspect": config.aspect}}),
        "versat2i_version": __version__,
        "versat2i_aspect": config.aspect,
        "versat2i_dataset": dataset.name,
        "versat2i_dataset_manifest_sha256": manifest_sha256,
        "versat2i_base_model_sha256": base.source_sha256,
        "versat2i_arch": base.arch,
        "versat2i_prediction_type": base.prediction_type,
        "versat2i_fingerprint": fingerprint,
        "versat2i_config": json.dumps(shareable_settings(config), sort_keys=True),
        "versat2i_loss_curve": json.dumps(loss_curve),
    }


def shareable_settings(config: LoraTrainConfig) -> dict[str, Any]:
    """The settings for the LoRA's metadata, with local paths cut to their last part: LoRA files get
    shared, and a full path would publish the user's folder layout (and often their user name)."""
    settings = config.to_dict()
    for name in ("base_model", "dataset_dir", "output_dir", "work_dir", "model_config_dir"):
        settings[name] = Path(settings[name]).name if settings[name] else ""
    return settings


def lora_run_fingerprint(config: LoraTrainConfig, *, cpu: bool | None = None) -> str:
    """What decides the trained result: the settings (``mixed_precision`` as it will be used, see
    ``resolve_mixed_precision``; ``cpu`` as there) plus the identity of the base model and data.

    File identity is (relative path, size, mtime) rather than a content hash so that the node can
    recompute it on every queue in milliseconds even for a 7 GB checkpoint.
    """
    return config.with_resolved_precision(cpu=cpu).fingerprint(
        **base_model_identity(config), dataset=tree_identity(Path(config.dataset_dir)))


def base_model_identity(config) -> dict[str, list]:
    """Fingerprint entries for what loading the base model reads: the checkpoint and, for a single
    file, its config folder (``model_config_dir`` or the ``<stem>.configs/`` sidecar: an edited
    config builds another model from the same weights). No entry when there is no config folder,
    so fingerprints of plain checkpoints are what they were."""
    from .model_loading import model_source_paths

    checkpoint, *config_dirs = model_source_paths(config.base_model, config.model_config_dir or None)
    identity = {"base_model": tree_identity(checkpoint)}
    if config_dirs:
        identity["model_configs"] = tree_identity(config_dirs[0])
    return identity


def tree_identity(path: Path) -> list:
    """[name, size, mtime_ns] of a file, or those rows for every (non-hidden) file under a folder."""
    if path.is_file():
        stat = path.stat()
        return [path.name, stat.st_size, stat.st_mtime_ns]
    if not path.is_dir():
        return []
    rows = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if relative.startswith(".") or "/." in relative:  # hidden temp files of writers
            continue
        stat = file.stat()
        rows.append([relative, stat.st_size, stat.st_mtime_ns])
    return rows


# -- the program -----------------------------------------------------------------------------------

def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train one aspect LoRA (kohya keys) with accelerate + diffusers + peft.")
    parser.add_argument("--config", required=True, help="LoraTrainConfig as .toml or .json")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest checkpoint in work_dir, or a fresh start if there is none) "
                             "or a checkpoint folder")
    parser.add_argument("--log_file", default=None, help=f"JSON-lines events (default: <work_dir>/{LOG_FILE_NAME})")
    return parser.parse_args(input_args)


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, *, enabled: bool = True):
    """Hold an exclusive lock on ``work_dir`` while training: a second run on the same folder (e.g.
    a re-run started while an orphaned child of a killed parent still trains) fails at once instead
    of interleaving checkpoints. POSIX only (fcntl); elsewhere no lock is taken."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if not enabled or fcntl is None:
        yield
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / LOCK_FILE_NAME, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(f"work_dir {work_dir}: another training run (pid {holder}) is using this folder; "
                               "wait for it to finish or stop it, then resume") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_training_program(config_class, args: argparse.Namespace, train) -> Path | None:
    """Phase 1 of every training program (LoRA and gate): read and check the config (and the
    ``--resume`` folder), start accelerate, open the event log, lock the work folder, then
    ``train(config, accelerator, events, resume_from)``; an exception is logged as an ``error``
    event (the launcher shows it) before it propagates."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    config = config_class.load(args.config)
    resume_from = find_resume_checkpoint(config.work_dir, args.resume) if args.resume else None
    # The final file may only pre-exist when overwriting; checked before any work (nothing is written).
    config.validate()
    work_dir = Path(config.work_dir)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        # Accumulation groups run across epoch ends, so the position in the data is just a batch
        # count (resume needs no knowledge of where epochs cut a group).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False),
    )
    events = EventWriter(args.log_file or work_dir / LOG_FILE_NAME if accelerator.is_main_process else None,
                         stream=sys.stdout if accelerator.is_main_process else None)
    try:
        with work_dir_lock(work_dir, enabled=accelerator.is_main_process):
            return train(config, accelerator, events, resume_from)
    except BaseException as exc:
        if accelerator.is_main_process and not isinstance(exc, KeyboardInterrupt):
            events.emit("error", message=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__)
        raise
    finally:
        events.close()


def main(args: argparse.Namespace) -> Path | None:
    # ---- 1. configuration, accelerator, events (shared with the gate trainer) --------------------
    return run_training_program(LoraTrainConfig, args, _train)


def _train(config: LoraTrainConfig, accelerator, events: EventWriter, resume_from: Path | None) -> Path:
    from accelerate import skip_first_batches
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    from ..safe_io import confined_path
    from .kohya_dataset import scan_training_set
    from .lora_io import save_kohya_lora
    from .model_loading import file_sha256, load_base_model

    work_dir = Path(config.work_dir)
    output_path = confined_path(config.output_dir, config.output_path.relative_to(config.output_dir).as_posix(),
                                what="output_name")
    fingerprint = lora_run_fingerprint(config)
    device = accelerator.device

    # ---- 2. data (first: a bad training set fails before the model is loaded) ---------------------
    images = scan_training_set(config.dataset_dir, config.aspect)

    # ---- 3. base model and LoRA layers --------------------------------------------------------------
    base = load_base_model(config.base_model, arch=config.arch, prediction_type=config.prediction_type,
                           config_dir=config.model_config_dir or None)
    for note in base.notes:
        logger.info("base model: %s", note)
    if base.vae is None and not config.cache_latents:
        raise ValueError(f"base_model {config.base_model}: has no VAE; set cache_latents = true with "
                         "generation-time latents, or use a checkpoint that includes its VAE")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Seeded right before the LoRA init, so the initial LoRA does not depend on how the base model
    # was loaded (a loader that draws random numbers would otherwise shift it).
    set_seed(config.seed)
    trainable = add_lora_adapters(base, config)
    for module in (base.unet, *base.text_encoders):
        module.to(device, dtype=weight_dtype if weight_dtype != torch.float32 else None)
    # The VAE only encodes: half precision as in diffusers' examples, except SDXL's VAE in fp16,
    # which overflows (bf16 has float32's range).
    vae_dtype = torch.float32 if (base.arch == "sdxl" and weight_dtype == torch.float16) else weight_dtype
    if base.vae is not None:
        base.vae.to(device, dtype=vae_dtype if vae_dtype != torch.float32 else None)
    cast_training_params([m for _, m in trainable], dtype=torch.float32)  # LoRA weights train in fp32
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in base.text_encoders:
                # transformers 5 renamed it (the old name warns, and goes in v6); 4.x has only the old one.
                enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
                enable()

    # ---- 4. dataset, caches (latents, text embeddings) ---------------------------------------------
    dataset, sampler, dataloader = prepare_training_data(config, images, base, device, vae_dtype=vae_dtype)

    # ---- 5. optimiser and schedule -----------------------------------------------------------------
    param_groups = []
    for name, module in trainable:
        params = [p for p in module.parameters() if p.requires_grad]
        lr = config.learning_rate if name == "unet" else (config.text_encoder_lr or config.learning_rate)
        param_groups.append({"params": params, "lr": lr})
    optimizer = torch.optim.AdamW(param_groups, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    # As in diffusers' examples: the prepared scheduler steps once per process per update.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)

    # ---- 6. accelerate: prepare, checkpoint hooks, resume ---------------------------------------------
    prepared = accelerator.prepare(*[m for _, m in trainable], optimizer, dataloader, lr_scheduler)
    models = list(prepared[:len(trainable)])
    optimizer, dataloader, lr_scheduler = prepared[len(trainable):]
    unet = models[0]
    if config.train_text_encoder:
        # encode_prompts must call the prepared (e.g. DDP-wrapped) encoders so their gradients sync.
        base.text_encoders = models[1:]
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + accelerator.process_index)
    progress = TrainingProgress(fingerprint=fingerprint)
    hooks = LoraCheckpointHooks(accelerator, [n for n, _ in trainable], noise_generator, progress)
    accelerator.register_save_state_pre_hook(hooks.save)
    accelerator.register_load_state_pre_hook(hooks.load)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if hooks.loaded_fingerprint and hooks.loaded_fingerprint != fingerprint:
            raise ValueError(f"--resume: {resume_from} was saved by a run with other settings or data; "
                             f"use another work_dir, or delete {work_dir / CHECKPOINT_DIR_NAME} to start over")
        logger.info("resumed from %s at step %d", resume_from, progress.global_step)
    start_step = progress.global_step
    # The steps logged before the resume point, read from the file this run's events go to
    # (``--log_file`` or the work folder's log); only the main process writes, keeps and saves them.
    history = loss_history_from_log(events.log_path, start_step) if resume_from and events.log_path else []
    if accelerator.is_main_process:
        events.emit("start", total_steps=config.max_train_steps, start_step=start_step,
                    num_examples=dataset.num_examples, output=str(output_path),
                    resumed_from=str(resume_from) if resume_from else None,
                    num_processes=accelerator.num_processes, device=str(device),
                    mixed_precision=accelerator.mixed_precision)

    # ---- 7. training loop ------------------------------------------------------------------------------
    batches_per_epoch = len(dataloader)
    prediction_type = base.prediction_type
    started_at = time.monotonic()
    micro_losses: list[torch.Tensor] = []
    for module in models:
        module.train()
    while progress.global_step < config.max_train_steps:
        epoch, skip = divmod(progress.batches_seen, batches_per_epoch)
        dataloader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        epoch_loader = skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in epoch_loader:
            with accelerator.accumulate(*models):
                latents, noise, timesteps, noisy_latents = noised_latents(
                    batch, base, device, weight_dtype=weight_dtype, vae_dtype=vae_dtype,
                    noise_generator=noise_generator, noise_offset=config.noise_offset)
                hidden, added = unet_conditioning(batch, base, device, weight_dtype=weight_dtype,
                                                  text_grad=config.train_text_encoder)
                model_pred = unet(noisy_latents, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
                loss = compute_loss(model_pred, latents, noise, timesteps, base.noise_scheduler,
                                    prediction_type, config.snr_gamma)
                # The logged loss is the mean over every process's images. Bucket batches differ in size
                # across processes and all_gather needs one shape everywhere, so each process sends
                # [loss * images, images] rather than one entry per image.
                batch_images = torch.tensor(float(latents.shape[0]), device=loss.device)
                gathered = accelerator.gather(torch.stack([loss.detach().float() * batch_images, batch_images])[None])
                micro_losses.append(gathered[:, 0].sum() / gathered[:, 1].sum())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for m in models for p in m.parameters() if p.requires_grad],
                                                config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batches_seen += 1

            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            step_loss = float(torch.stack(micro_losses).mean())
            micro_losses.clear()
            history.append((progress.global_step, step_loss))
            if accelerator.is_main_process:
                done_now = progress.global_step - start_step
                eta = (time.monotonic() - started_at) / done_now * (config.max_train_steps - progress.global_step)
                events.emit("step", step=progress.global_step, total=config.max_train_steps, loss=step_loss,
                            lr=lr_scheduler.get_last_lr()[0], eta_s=round(eta, 2), epoch=epoch)
            if progress.global_step % config.checkpointing_steps == 0 and progress.global_step < config.max_train_steps:
                path = save_checkpoint(accelerator, work_dir, progress.global_step, config.checkpoints_total_limit)
                if accelerator.is_main_process:
                    events.emit("checkpoint", step=progress.global_step, path=str(path))
            if progress.global_step >= config.max_train_steps:
                break

    # ---- 8. the LoRA file --------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = [accelerator.unwrap_model(m) for m in models]
        manifest = Path(config.dataset_dir) / "manifest.jsonl"
        metadata = lora_metadata(config, base, fingerprint=fingerprint, steps=progress.global_step,
                                 num_examples=dataset.num_examples, loss_curve=loss_curve_points(history),
                                 manifest_sha256=file_sha256(manifest) if manifest.is_file() else "")
        save_kohya_lora(output_path, unet=unwrapped[0], text_encoders=unwrapped[1:],
                        metadata=metadata, overwrite=config.overwrite)
        if not config.keep_checkpoints:
            shutil.rmtree(work_dir / CHECKPOINT_DIR_NAME, ignore_errors=True)
        events.emit("done", step=progress.global_step, lora_path=str(output_path),
                    elapsed_s=round(time.monotonic() - started_at, 2))
    accelerator.end_training()
    return output_path


if __name__ == "__main__":
    main(parse_args())
