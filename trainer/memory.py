"""How much memory a training run needs, estimated before it starts, and the check that refuses a
run that cannot fit the machine.

A run the machine cannot hold is not only lost: on a CPU it grows until the kernel's OOM killer
ends it, or another process on a shared machine (``resolution = 100000`` grew a child to 15 GB).
So the launcher estimates the run's peak from the model's file headers and the settings, and
refuses it when the estimate exceeds what is free (RAM for a CPU run, free memory of the GPU for a
CUDA run), naming the settings to lower.

The estimate is deliberately simple, and meant to err low (a refused run that would have fit is
worse than one that fails later, which the limits of ``config.SETTING_RANGES`` bound anyway):

* the frozen model: its parameters (every weight the run loads) x the bytes of its dtype;
* what trains: its parameters x 16 bytes (fp32 weight, gradient and AdamW's two moments), plus
  frozen extras (a gate's LoRAs);
* activations: batch x resolution^2 x the family's ``activation_bytes_per_pixel`` (the table in
  ``models/architectures.py``, measured per family), scaled by the compute dtype and, with
  gradient checkpointing, by the family's ``checkpointed_activation_share``;
* the process itself (``PROCESS_OVERHEAD_BYTES``).

A new model family adds its numbers to the table; nothing here names a family.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import psutil  # a dependency of accelerate (and of ComfyUI)

from ..models.loading import ModelSize, read_model_size
from .config import resolve_mixed_precision

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
TRAINED_BYTES_PER_PARAMETER = 4 + 4 + 8  # fp32 weight, its gradient, AdamW's two moments
# The training process itself: Python, torch and the libraries (about 1 GiB of RSS measured on a CPU
# run: SD1.5's peak less its weights and activations), or a CUDA context; counted low.
PROCESS_OVERHEAD_BYTES = 512 << 20
SKIP_ENV = "VERSAT2I_SKIP_MEMORY_CHECK"  # "1": start a run whatever the estimate says
GIB = 1 << 30


class MemoryRefusedError(ValueError):
    """The run's memory estimate exceeds what the machine has free; the message names the settings
    to lower."""


@dataclass(frozen=True)
class MemoryEstimate:
    frozen_model: int  # bytes
    trained: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen_model + self.trained + self.activations + PROCESS_OVERHEAD_BYTES


def estimate_training_memory(size: ModelSize, *, resolution: int, batch_size: int, mixed_precision: str,
                             gradient_checkpointing: bool, trained_parameters: int = 0,
                             frozen_extra_bytes: int = 0) -> MemoryEstimate:
    """The peak memory of one training process, in bytes (see the module docstring)."""
    dtype_bytes = DTYPE_BYTES.get(mixed_precision, 4)
    family = size.architecture
    activations = batch_size * resolution * resolution * family.activation_bytes_per_pixel * dtype_bytes / 4
    if gradient_checkpointing:
        activations *= family.checkpointed_activation_share
    return MemoryEstimate(frozen_model=size.parameters * dtype_bytes + frozen_extra_bytes,
                          trained=trained_parameters * TRAINED_BYTES_PER_PARAMETER, activations=int(activations))


def estimate_run_memory(config, *, cpu: bool | None = None) -> MemoryEstimate | None:
    """The estimate for a run's config (``config.memory_needs`` says what trains), or None when
    the base model's size cannot be read from headers (a legacy ``.ckpt``)."""
    size = read_model_size(config.base_model)
    if size is None:
        logger.info("%s: its size cannot be read from safetensors headers; the run's memory is not estimated",
                    config.base_model)
        return None
    trained, frozen_extra = config.memory_needs(size)
    return estimate_training_memory(
        size, resolution=config.resolution, batch_size=config.train_batch_size,
        mixed_precision=resolve_mixed_precision(config.mixed_precision, cpu=cpu),
        gradient_checkpointing=config.gradient_checkpointing, trained_parameters=trained,
        frozen_extra_bytes=frozen_extra)


def free_memory(device: str) -> tuple[int, str] | None:
    """(bytes free, what) on ``device`` ("cpu", "cuda", "cuda:1"): RAM, or the GPU's free memory
    (only where this process already uses CUDA, or is the training process: asking creates a CUDA
    context, which a launcher would then hold for the whole run). None when it cannot be known."""
    if not device.startswith("cuda"):
        return psutil.virtual_memory().available, "free RAM"
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free, f"free memory on {device}"


def launcher_device(cpu: bool) -> str | None:
    """The device a launcher can check for a run it is about to start: "cpu" for a CPU run (forced,
    or no CUDA), "cuda" when this process uses CUDA already (ComfyUI); None when only the training
    process can ask (it checks its device itself before loading the model)."""
    if cpu:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if torch.cuda.is_initialized() else None


def memory_problem(config, *, device: str, cpu: bool | None = None) -> str | None:
    """Why the run of ``config`` cannot start on ``device`` (its estimate exceeds the free memory),
    naming the settings to lower; None when it fits, cannot be estimated, or ``SKIP_ENV`` is set."""
    if os.environ.get(SKIP_ENV, "").strip() in ("1", "true", "yes"):
        return None
    estimate = estimate_run_memory(config, cpu=cpu if cpu is not None else not device.startswith("cuda"))
    if estimate is None:
        return None
    available = free_memory(device)
    if available is None or estimate.total <= available[0]:
        return None
    free, what = available
    lower = ["resolution", "train_batch_size (the node's batch_size)"]
    if hasattr(config, "rank"):
        lower.append("rank")
    hints = [] if config.gradient_checkpointing else ["turn on gradient_checkpointing"]
    if device.startswith("cuda") and config.mixed_precision == "no":
        hints.append("use mixed_precision bf16 or fp16")
    return (f"{Path(config.base_model).name}: this run needs about {estimate.total / GIB:.1f} GiB (model "
            f"{estimate.frozen_model / GIB:.1f} GiB, activations {estimate.activations / GIB:.1f} GiB at resolution "
            f"{config.resolution} x batch {config.train_batch_size}, trained weights and optimiser "
            f"{estimate.trained / GIB:.2f} GiB) but {what} is {free / GIB:.1f} GiB; lower {', '.join(lower)}"
            + (f", or {' or '.join(hints)}" if hints else "")
            + f" (if the estimate is wrong for this model, set {SKIP_ENV}=1 to start anyway)")


def check_training_memory(config, *, device: str, cpu: bool | None = None) -> None:
    """``MemoryRefusedError`` when ``memory_problem`` finds one."""
    problem = memory_problem(config, device=device, cpu=cpu)
    if problem:
        raise MemoryRefusedError(problem)
