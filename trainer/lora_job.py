"""Train a LoRA once: reuse the finished file when nothing changed, else run (or resume) the trainer.

This is the Train Aspect LoRA node's logic without ComfyUI, so it is tested directly (the gate
trainer's ``train_gate_or_reuse`` goes through the same steps, with the helpers below):

* The inputs' fingerprint (settings + base model and dataset identity, ``train_lora.lora_run_fingerprint``)
  is stored in the LoRA's metadata. Re-queuing identical inputs finds the file with the same
  fingerprint and returns it (and its loss curve) without training.
* Each fingerprint gets its own work folder ``<runs_root>/<name>-<fingerprint[:12]>``, so a cancelled
  run resumes from its last checkpoint when queued again, and a changed setting never resumes
  from another run's checkpoints.
* A LoRA of the same name from other inputs is refused (``TargetExistsError``) unless
  ``overwrite``: then it is retrained and replaced.
* Everything that can be checked in-process is checked before the child starts (settings, output
  name, dataset); a failed run that produced no checkpoint leaves no work folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.loading import detect_checkpoint_architecture
from ..models.split_files import inspect_model_files, is_dit_diffusion_model
from ..safe_io import TargetExistsError, confined_path
from ..training_set.folders import scan_training_set
from .config import LoraTrainConfig
from .launcher import TRAIN_LORA_PROGRAM, LaunchOptions, TrainingFailed, run_training
from .memory import check_training_memory, launcher_device
from .train_lora import lora_run_fingerprint
from .training_loop import checkpoint_dirs

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.toml"


@dataclass
class LoraJobResult:
    lora_path: Path
    loss_curve: list[tuple[int, float]]
    reused: bool
    events: list[dict[str, Any]] = field(default_factory=list)


def read_finished_lora(path: Path) -> tuple[str | None, list[tuple[int, float]]]:
    """(fingerprint, loss curve) stored in a LoRA file's metadata; (None, []) if absent or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # not ours / damaged: treated as "not this run's result"
        return None, []
    try:
        curve = [(int(s), float(v)) for s, v in json.loads(metadata.get("versat2i_loss_curve", "[]"))]
    except (ValueError, TypeError):
        curve = []
    return metadata.get("versat2i_fingerprint"), curve


class _LazyStateDict(Mapping):
    """Keys of a .safetensors file, tensors read only when asked for (architecture detection needs the
    key names and one or two small tensors, not 2-7 GB of weights)."""

    def __init__(self, handle):
        self._handle, self._keys = handle, list(handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._key_set:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __contains__(self, key) -> bool:
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def check_base_model(config: LoraTrainConfig) -> None:
    """Refuse an unsupported single-file checkpoint, or DiT files that do not belong together,
    in-process, before a child is started."""
    path = Path(config.base_model)
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return  # diffusers folders and legacy .ckpt files are checked by the loader in the child
    if config.text_encoders or config.vae or is_dit_diffusion_model(path):
        inspect_model_files(path, config.text_encoders, config.vae or None, config_dir=config.model_config_dir or None,
                            arch=config.arch)
        return
    from safetensors import safe_open


    try:
        handle_context = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own types for a damaged header
        raise ValueError(f"base_model {path}: cannot read this checkpoint ({type(exc).__name__}: {exc}); "
                         "the file is damaged or not a .safetensors model") from exc
    with handle_context as handle:
        detected = detect_checkpoint_architecture(_LazyStateDict(handle), name=str(path)).name
    if config.arch not in ("auto", detected):
        raise ValueError(f"base_model {path}: arch={config.arch!r} was requested but the checkpoint is {detected}")


def reuse_finished(output: Path, fingerprint: str, read_finished) -> tuple[Path, list[tuple[int, float]]] | None:
    """``(output, loss curve)`` when ``output`` exists and records ``fingerprint`` (``read_finished``
    reads a file's ``(fingerprint, curve)``), else None."""
    if not output.is_file():
        return None
    stored, curve = read_finished(output)
    if stored != fingerprint:
        return None
    logger.info("%s was trained from these inputs already; not training again", output)
    return output, curve


def refuse_other_result(config, what: str) -> None:
    """``TargetExistsError`` when ``config``'s output exists (and was not reused: other inputs made
    it) and ``overwrite`` is off. Raised before anything starts; front ends word the fix."""
    output = Path(config.output_path)
    if not config.overwrite and os.path.lexists(output):
        raise TargetExistsError(
            f"{what} {str(output)!r} already exists and was trained from other inputs (another training set, "
            "base model or settings)", path=output,
            fix="choose another output_name, or set overwrite = true to retrain and replace it")


def with_run_folder(config, runs_root: str | Path, run_name: str, fingerprint: str, *, what: str):
    """``config`` with its work folder ``<runs_root>/<run_name>-<fingerprint[:12]>``: one per set of
    inputs, so a cancelled run resumes when queued again and a changed setting never resumes another
    run's checkpoints."""

    # Made in place (no temporary name): 13 bytes longer than the run's name, which is shorter than
    # its final file's name by at least its suffix, so any output name that fits gives a folder that fits.
    return config.replace(work_dir=str(confined_path(runs_root, f"{run_name}-{fingerprint[:12]}", what=what,
                                                     atomic=False)))


def launch_in_work_dir(config, *, program: str, options: LaunchOptions | None = None,
                       env: Mapping[str, str] | None = None, on_event: Callable[[dict], None] | None = None,
                       check_cancel: Callable[[], bool] | None = None, before_launch: Callable[[], None] | None = None,
                       on_start=None):
    """Save ``config`` into its work folder and run ``program`` on it in a child process, resuming the
    folder's latest checkpoint. A run whose memory estimate exceeds the free memory is refused first
    (``trainer/memory.py``), with nothing written. A failed run that produced no checkpoint leaves no
    work folder behind (a folder with checkpoints is kept: the next run resumes from it)."""

    work_dir = Path(config.work_dir)
    if before_launch is not None:
        before_launch()
    # After before_launch (ComfyUI's models unloaded), before anything is written.
    device = launcher_device(bool(options and options.cpu))
    if device is not None:
        check_training_memory(config, device=device, cpu=True if device == "cpu" else None)
    created = [folder for folder in (work_dir, *work_dir.parents) if not folder.exists()]  # deepest first
    try:
        # Rewritten on every launch: a folder is one fingerprint, so a resumed run gets the same settings.
        config_path = config.save(work_dir / CONFIG_FILE_NAME, overwrite=True)
        return run_training(["--config", str(config_path), "--resume", "latest"], program=program,
                            options=options or LaunchOptions(), env=env, on_event=on_event, check_cancel=check_cancel,
                            output_log=work_dir / "train_output.log", on_start=on_start)
    except BaseException:
        if created and not checkpoint_dirs(work_dir):
            shutil.rmtree(work_dir, ignore_errors=True)
            for folder in created[1:]:  # the runs folder and others made for it, when left empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def prepare_lora_job(config: LoraTrainConfig, runs_root: str | Path | None = None, *, cpu: bool | None = None
                     ) -> tuple[LoraTrainConfig, str, LoraJobResult | None]:
    """(config with its work folder and ``mixed_precision`` resolved, fingerprint, finished result or
    None). ``cpu``: the child will be forced onto the CPU (``LaunchOptions.cpu``). Raises ValueError
    for bad settings or data, and when the output exists from other inputs without ``overwrite``."""

    config.validate(check_paths=False)
    # Resolved here, where the launch options are known, and handed to the child as given: both
    # sides then fingerprint the precision the run really uses.
    config = config.with_resolved_precision(cpu=cpu)
    fingerprint = lora_run_fingerprint(config)
    finished = reuse_finished(config.output_path, fingerprint, read_finished_lora)
    if finished is not None:
        return config, fingerprint, LoraJobResult(*finished, reused=True)
    refuse_other_result(config, "LoRA")
    if runs_root is not None:
        name = config.output_name.removesuffix(".safetensors")
        config = with_run_folder(config, runs_root, name, fingerprint, what="LoRA name")
    config.validate()
    scan_training_set(config.dataset_dir, config.aspect)  # empty / unreadable data: error now, nothing written
    check_base_model(config)
    return config, fingerprint, None


def train_or_reuse(config: LoraTrainConfig, *, runs_root: str | Path | None = None,
                   options: LaunchOptions | None = None, env: Mapping[str, str] | None = None,
                   on_event: Callable[[dict], None] | None = None, check_cancel: Callable[[], bool] | None = None,
                   before_launch: Callable[[], None] | None = None, on_start=None) -> LoraJobResult:
    """The finished LoRA for ``config``: reused when its fingerprint matches, else trained (resuming
    the latest checkpoint of an earlier, interrupted run with the same inputs)."""

    config, _fingerprint, finished = prepare_lora_job(config, runs_root, cpu=True if options and options.cpu else None)
    if finished is not None:
        return finished
    result = launch_in_work_dir(config, program=TRAIN_LORA_PROGRAM, options=options, env=env, on_event=on_event,
                                check_cancel=check_cancel, before_launch=before_launch, on_start=on_start)
    return LoraJobResult(lora_path=result.lora_path, loss_curve=result.losses, reused=False, events=result.events)


__all__ = ["LoraJobResult", "TrainingFailed", "launch_in_work_dir", "prepare_lora_job", "read_finished_lora",
           "refuse_other_result", "reuse_finished", "train_or_reuse", "with_run_folder"]
