"""The training loop and everything around it that the LoRA and the gate programs share, in the
shape of diffusers' training examples: the program skeleton (config, accelerate, events, a locked
work folder), the data pipeline with its caches, checkpoints that appear atomically and resume
exactly, and one loop over (epoch, batch) with gradient accumulation, logged losses and periodic
checkpoints.

A program (``train_lora.py``, ``train_gate.py``) builds its models, optimiser and schedule, then
hands the loop a ``TrainingStep``: how one micro-batch becomes a loss, which parameters are
clipped, and what it does after the backward pass and after each optimiser update.

Exact resume: the batch order is a function of (seed, epoch) (``BucketBatchSampler``), the noise
comes from a generator saved in every checkpoint, and the position in the data (``batches_seen``)
is saved too, so a run killed at any step and resumed with ``--resume latest`` ends where an
uninterrupted run would have.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models.flow_matching import encode_latents
from ..models.flow_matching import encode_prompts as encode_flow_prompts
from ..models.loading import encode_prompts, load_base_model, model_source_paths
from ..safe_io import (
    WriteFailedError,
    confined_path,
    describe_os_error,
    give_new_file_mode,
    new_file_mode,
    os_error_code,
)
from .config import resolve_mixed_precision
from .events import EventWriter, read_events
from .kohya_dataset import BucketBatchSampler, KohyaDataset, collate_examples
from .memory import MemoryRefusedError, check_training_memory

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".train.lock"
LOG_FILE_NAME = "train_log.jsonl"
CHECKPOINT_DIR_NAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
PROGRESS_FILE = "progress.json"
LOSS_CURVE_MAX_POINTS = 256


# -- checkpoints and resume ------------------------------------------------------------------------

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
class CheckpointHooks:
    """accelerate save/load hooks: a checkpoint holds only what trains (``save_weights`` /
    ``load_weights``, given by each program), the noise generator and the progress.

    (diffusers' examples do the same with closures inside ``main``; a small class keeps ``main`` flat.)
    """

    accelerator: Any
    noise_generator: torch.Generator
    progress: TrainingProgress
    loaded_fingerprint: str = field(default="", init=False)

    def save_weights(self, models: list, weights: list, folder: Path) -> None:
        raise NotImplementedError

    def load_weights(self, models: list, folder: Path) -> None:
        raise NotImplementedError

    def save(self, models, weights, output_dir: str) -> None:
        out = Path(output_dir)
        self.save_weights(models, weights, out)
        self.progress.save(out, self.accelerator, self.noise_generator)

    def load(self, models, input_dir: str) -> None:
        folder = Path(input_dir)
        self.load_weights(models, folder)
        self.loaded_fingerprint = self.progress.load(folder, self.accelerator, self.noise_generator)

    def register(self) -> None:
        self.accelerator.register_save_state_pre_hook(self.save)
        self.accelerator.register_load_state_pre_hook(self.load)


class CheckpointWriteError(WriteFailedError):
    """A checkpoint could not be written (disk full, permission...); nothing of it is left behind."""


def save_checkpoint(accelerator, work_dir: Path, step: int, total_limit: int) -> Path:
    """``accelerator.save_state`` into a hidden folder, then rename it; keep the newest ``total_limit``.

    A checkpoint that cannot be written (a full disk above all: torch reports it as "unexpected
    pos", safetensors as "os error 28") stops the run with ``CheckpointWriteError``, one line saying
    why and where, after removing the half-written folder (it would keep the disk full). Stopping
    rather than training on: a full disk seldom empties itself, so the run would spend the rest of
    its compute only to fail at its final save, while now the last complete checkpoint is kept and
    ``--resume latest`` (or queueing the node again) continues from it once there is space.
    """
    folder = work_dir / CHECKPOINT_DIR_NAME
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f".{CHECKPOINT_PREFIX}{step}.partial"
    failure: BaseException | None = None
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            failure = exc
    accelerator.wait_for_everyone()
    if failure is None:
        try:
            accelerator.save_state(str(partial))
        except Exception as exc:  # torch, safetensors and accelerate each raise their own types
            failure = exc
    if accelerator.num_processes > 1:  # every process stops when one failed
        flag = torch.tensor([0.0 if failure is None else 1.0], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum")) > 0 and failure is None:
            failure = RuntimeError("another training process could not write its part of the checkpoint")
    if failure is not None:
        error = _checkpoint_failed(failure, accelerator, folder, partial, step)
        if error is None:  # not a reason of the system: a bug, shown with its traceback
            raise failure
        raise error from failure
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        give_new_file_mode(partial, new_file_mode(folder))  # safetensors writes 0600 files
        shutil.rmtree(final, ignore_errors=True)  # a stale one from an earlier, diverged run
        os.replace(partial, final)
        if total_limit > 0:
            for old in checkpoint_dirs(work_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoint_failed(exc: BaseException, accelerator, folder: Path, partial: Path, step: int
                       ) -> CheckpointWriteError | None:
    """Remove the partial folder; return the one-line error of a checkpoint the system refused
    (worded first, while the partial still fills the disk: torch's "unexpected pos" is recognised
    as a full disk by the free space), or None when ``exc`` is not such a failure."""
    code = os_error_code(exc, folder)
    reason = describe_os_error(exc, what=f"the checkpoint of step {step}", path=folder, action="could not be written")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    if code is None:
        return None
    kept = checkpoint_dirs(folder.parent)
    resume = (f"the last complete checkpoint ({kept[-1].name}) is kept: run again (--resume latest, or queue the node "
              "again) to continue from it" if kept else "no earlier checkpoint exists: the next run starts over")
    return CheckpointWriteError(code, f"{reason}. Training stopped; {resume}", folder)


# -- data ----------------------------------------------------------------------------------------

def encode_images(base, pixels: torch.Tensor, device, dtype: torch.dtype,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of ``pixels`` [B,3,H,W] in -1..1: a sample of the VAE's posterior (the DiT
    families: normalised as their recipes do, ``models.flow_matching.encode_latents``)."""
    if base.architecture.objective == "flow_matching":
        return encode_latents(base, pixels.to(device, dtype=dtype), generator)
    latent_dist = base.vae.encode(pixels.to(device, dtype=dtype)).latent_dist
    return latent_dist.sample(generator=generator) * base.vae_scaling_factor


def free_text_encoders(base) -> None:
    """Drop the text encoders (their outputs are cached): a DiT family's are 5-10 GB."""
    import gc

    base.text_encoders.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_training_data(config, images, base, device, *, vae_dtype: torch.dtype):
    """(dataset, sampler, dataloader) of a training set, with the caches the config asks for filled
    first (latents, reusing generation latents of this checkpoint; text embeddings). Encoders that
    the cache made unnecessary go back to the CPU. Shared by the LoRA and gate trainers."""

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
    if config.cache_text_embeddings and base.architecture.objective == "flow_matching":
        dataset.cache_text_embeddings(lambda captions: encode_flow_prompts(base, captions, device))
        free_text_encoders(base)
    elif config.cache_text_embeddings:
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




# -- the loop --------------------------------------------------------------------------------------

@dataclass
class TrainingStep:
    """What a program tells the loop about one micro-batch.

    ``forward(batch)`` returns the loss to back-propagate and the values to log (scalar tensors, one
    value for all processes: gather them there); every logged value is averaged over the micro-batches
    of an optimiser step and goes into that step's event (``loss`` also into the loss curve).
    ``parameters()`` are what gradient clipping clips. ``after_backward()`` runs before clipping
    (e.g. averaging gradients of a module that is not accelerate-prepared), ``after_update(batches_seen)``
    after the optimiser and schedule stepped, and ``event_fields()`` adds fields to each step event.
    """

    forward: Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    parameters: Callable[[], Iterable[torch.Tensor]]
    models: Sequence[torch.nn.Module] = ()  # accelerate accumulates over these
    after_backward: Callable[[], None] | None = None
    after_update: Callable[[int], None] | None = None
    event_fields: Callable[[], dict[str, Any]] | None = None
    after_step: Callable[[int], None] | None = None  # main process, after an optimiser step's event (previews)


@dataclass
class TrainingRun:
    """A started run: where it writes, its progress, and the losses logged so far."""

    config: Any
    accelerator: Any
    events: EventWriter
    work_dir: Path
    progress: TrainingProgress
    history: list[tuple[int, float]] = field(default_factory=list)
    start_step: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def resume(self, hooks: CheckpointHooks, resume_from: Path | None, *, inputs: str = "settings or data") -> None:
        """Register ``hooks``; load ``resume_from`` (refused when saved by a run with other
        ``inputs``) and the losses the earlier run logged before it."""
        hooks.register()
        if resume_from is not None:
            self.accelerator.load_state(str(resume_from))
            if hooks.loaded_fingerprint and hooks.loaded_fingerprint != self.progress.fingerprint:
                raise ValueError(f"--resume: {resume_from} was saved by a run with other {inputs}; use another "
                                 f"work_dir, or delete {self.work_dir / CHECKPOINT_DIR_NAME} to start over")
            logger.info("resumed from %s at step %d", resume_from, self.progress.global_step)
        self.start_step = self.progress.global_step
        # The steps logged before the resume point, read from the file this run's events go to
        # (``--log_file`` or the work folder's log); only the main process writes, keeps and saves them.
        if resume_from and self.events.log_path:
            self.history = loss_history_from_log(self.events.log_path, self.start_step)

    def emit_start(self, *, num_examples: int, output: Path, resumed_from: Path | None, **extra: Any) -> None:
        if self.accelerator.is_main_process:
            self.events.emit("start", total_steps=self.config.max_train_steps, start_step=self.start_step,
                             num_examples=num_examples, output=str(output),
                             resumed_from=str(resumed_from) if resumed_from else None,
                             num_processes=self.accelerator.num_processes, device=str(self.accelerator.device),
                             mixed_precision=self.accelerator.mixed_precision, **extra)

    def train(self, step: TrainingStep, *, dataloader, sampler, optimizer, lr_scheduler) -> None:
        """Optimiser steps until ``max_train_steps``: epochs of batches (skipping those a resumed run
        already saw), ``gradient_accumulation_steps`` micro-batches per step, a ``step`` event per
        step and a checkpoint every ``checkpointing_steps`` (none at the last step: the program
        writes its result then)."""
        from accelerate import skip_first_batches

        config, accelerator, progress = self.config, self.accelerator, self.progress
        batches_per_epoch = len(dataloader)
        self.started_at = time.monotonic()
        logged: dict[str, list[torch.Tensor]] = {}
        while progress.global_step < config.max_train_steps:
            epoch, skip = divmod(progress.batches_seen, batches_per_epoch)
            dataloader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            epoch_loader = skip_first_batches(dataloader, skip) if skip else dataloader
            for batch in epoch_loader:
                with accelerator.accumulate(*step.models):
                    loss, values = step.forward(batch)
                    for name, value in values.items():
                        logged.setdefault(name, []).append(value)
                    accelerator.backward(loss)
                    if step.after_backward is not None:
                        step.after_backward()
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(step.parameters(), config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step.after_update is not None:
                        step.after_update(progress.batches_seen)
                progress.batches_seen += 1

                if not accelerator.sync_gradients:
                    continue
                progress.global_step += 1
                means = {name: float(torch.stack(values).mean()) for name, values in logged.items()}
                logged.clear()
                self.history.append((progress.global_step, means["loss"]))
                if accelerator.is_main_process:
                    done_now = progress.global_step - self.start_step
                    eta = ((time.monotonic() - self.started_at) / done_now
                           * (config.max_train_steps - progress.global_step))
                    self.events.emit("step", step=progress.global_step, total=config.max_train_steps,
                                     loss=means.pop("loss"), lr=lr_scheduler.get_last_lr()[0], eta_s=round(eta, 2),
                                     epoch=epoch, **means, **(step.event_fields() if step.event_fields else {}))
                if step.after_step is not None and accelerator.is_main_process:
                    step.after_step(progress.global_step)
                if (progress.global_step % config.checkpointing_steps == 0
                        and progress.global_step < config.max_train_steps):
                    path = save_checkpoint(accelerator, self.work_dir, progress.global_step,
                                           config.checkpoints_total_limit)
                    if accelerator.is_main_process:
                        self.events.emit("checkpoint", step=progress.global_step, path=str(path))
                if progress.global_step >= config.max_train_steps:
                    break

    def finish(self, write_result: Callable[[], dict[str, Any]]) -> None:
        """On the main process: ``write_result()`` (the program's output; returns the ``done`` event's
        paths), then the checkpoints go unless ``keep_checkpoints``; then accelerate ends."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            paths = write_result()
            if not self.config.keep_checkpoints:
                shutil.rmtree(self.work_dir / CHECKPOINT_DIR_NAME, ignore_errors=True)
            self.events.emit("done", step=self.progress.global_step, **paths,
                             elapsed_s=round(time.monotonic() - self.started_at, 2))
        self.accelerator.end_training()


def run_output_path(config) -> Path:
    """The run's final file, confined to its output folder (``output_name`` may hold sub-folders)."""
    return confined_path(config.output_dir, config.output_path.relative_to(config.output_dir).as_posix(),
                         what="output_name")


def load_run_base_model(config, *, torch_dtype: torch.dtype = torch.float32):
    """The base model a run trains on (``models.loading.load_base_model`` with the run's settings),
    with how its family and prediction type were decided in the log."""
    base = load_base_model(config.base_model, arch=config.arch, prediction_type=config.prediction_type,
                           config_dir=config.model_config_dir or None, torch_dtype=torch_dtype,
                           text_encoders=config.text_encoders, vae=config.vae or None)
    for note in base.notes:
        logger.info("base model: %s", note)
    return base


def loss_gathered(accelerator, loss: torch.Tensor, images: int) -> torch.Tensor:
    """The mean of ``loss`` over every process's images. Bucket batches differ in size across
    processes and all_gather needs one shape everywhere, so each process sends
    [loss * images, images] rather than one entry per image."""
    count = torch.tensor(float(images), device=loss.device)
    gathered = accelerator.gather(torch.stack([loss.detach().float() * count, count])[None])
    return gathered[:, 0].sum() / gathered[:, 1].sum()


# -- identity of a run's inputs ---------------------------------------------------------------------

def base_model_identity(config) -> dict[str, list]:
    """Fingerprint entries for what loading the base model reads: the checkpoint and, for a single
    file, its config folder (``model_config_dir`` or the ``<stem>.configs/`` sidecar: an edited
    config builds another model from the same weights). No entry when there is no config folder,
    so fingerprints of plain checkpoints are what they were."""

    checkpoint, *config_dirs = model_source_paths(config.base_model, config.model_config_dir or None)
    identity = {"base_model": tree_identity(checkpoint)}
    if config_dirs:
        identity["model_configs"] = tree_identity(config_dirs[0])
    if config.text_encoders:  # a DiT family's other files
        identity["text_encoders"] = [tree_identity(Path(path)) for path in config.text_encoders]
    if config.vae:
        identity["vae"] = tree_identity(Path(config.vae))
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



# -- the program skeleton ---------------------------------------------------------------------------

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


@dataclass(frozen=True)
class TrainingProgram:
    """A training program as ``launch_entry.py`` runs it: ``main(parse_args(argv))``."""

    description: str
    config_class: type
    train: Callable  # train(config, accelerator, events, resume_from) -> the written file

    def parse_args(self, input_args: list[str] | None = None) -> argparse.Namespace:
        return parse_args(self.description, input_args)

    def main(self, args: argparse.Namespace) -> Path | None:
        return run_training_program(self.config_class, args, self.train)


def parse_args(description: str, input_args: list[str] | None = None) -> argparse.Namespace:
    """The command line every training program takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="the run's settings as .toml or .json")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest checkpoint in work_dir, or a fresh start if there is none) "
                             "or a checkpoint folder")
    parser.add_argument("--log_file", default=None, help=f"JSON-lines events (default: <work_dir>/{LOG_FILE_NAME})")
    return parser.parse_args(input_args)


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
        # On the device this process trains on (the launcher could only check RAM, or a GPU it
        # already used), before the model loads.
        check_training_memory(config, device=str(accelerator.device), cpu=accelerator.device.type == "cpu")
        with work_dir_lock(work_dir, enabled=accelerator.is_main_process):
            return train(config, accelerator, events, resume_from)
    except BaseException as exc:
        if accelerator.is_main_process and not isinstance(exc, KeyboardInterrupt):
            # A refusal or what the system refused (disk full...) is one line for the user; anything
            # else comes with the output's last lines (the launcher decides from user_error).
            user_error = isinstance(exc, (MemoryRefusedError, WriteFailedError))
            events.emit("error", message=str(exc) if user_error else f"{type(exc).__name__}: {exc}",
                        error_type=type(exc).__name__, user_error=user_error)
        raise
    finally:
        events.close()


