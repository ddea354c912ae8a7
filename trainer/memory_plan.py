"""Will a LoRA run of a DiT family fit on the device, and with which memory options?

One estimate, from the family's table entry (block structure and the activation bytes one block
keeps for backward, ``MemoryFacts``), the denoiser's config and the files' headers (exact parameter
counts), before any weight is read:

    weights      = P * bytes per weight (bf16 2, fp32 4, fp8 storage 1, plus the largest Linear upcast)
    lora         = P_lora * 16              (fp32 weights + grads + AdamW's two moments)
    activations  = sum_blocks n * k * B * S * H * b    without gradient checkpointing
                 = sum_blocks n * B * S * H * b + max(k) * B * S * H * b    with it
    fp8 without checkpointing also keeps each upcast weight for backward: + 2 * P_blocks
    text encoders on the device while they run, unless their outputs are cached and they are freed

(S = image tokens + text tokens, H = width, b = bytes per activation; /work/research/dit/FINDINGS.md Q7
and Q8 measured k at full width.) ``plan_memory`` resolves ``memory_saving = "auto"``: it turns on
text-embedding caching, gradient checkpointing, fp8 base weights and (on CUDA) block offloading, in
that order, until the estimate fits the device's free memory; a run that cannot fit is refused with
the settings to lower. Offloading keeps one block group on the device: weights = the largest block.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_io import atomic_write_text

GIB = 2**30
ALLOCATOR_SLACK = 1.10  # fragmentation and workspace on top of the tensors themselves
OPTION_ORDER = ("cache_text_embeddings", "gradient_checkpointing", "fp8_base", "offload_blocks")


@dataclass(frozen=True)
class MemoryOptions:
    cache_text_embeddings: bool = False
    gradient_checkpointing: bool = False
    fp8_base: bool = False
    offload_blocks: bool = False

    def turned_on(self) -> list[str]:
        return [name for name in OPTION_ORDER if getattr(self, name)]


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs of the model: parameter counts and the denoiser's shape."""

    denoiser_params: int
    block_params: int  # of the repeated blocks (what fp8 storage and offloading act on)
    largest_block_params: int
    largest_linear_params: int
    lora_params: int
    text_encoder_params: int
    hidden: int
    block_counts: tuple[tuple[int, float], ...]  # (blocks, activation factor k)
    text_tokens: int
    pixel_multiple: int


@dataclass
class MemoryEstimate:
    options: MemoryOptions
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values()) * ALLOCATOR_SLACK

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts.items() if value)
        return f"{self.total / GIB:.2f} GiB ({parts}; +{ALLOCATOR_SLACK - 1:.0%} allocator slack)"


def estimate(sizes: ModelSizes, options: MemoryOptions, *, resolution: int, batch_size: int,
             weight_bytes: int) -> MemoryEstimate:
    """Peak device bytes of one training step with ``options`` (see the module docstring)."""
    tokens = (resolution // sizes.pixel_multiple) ** 2 + sizes.text_tokens
    activation_bytes = weight_bytes if weight_bytes <= 2 else 4  # activations in the compute dtype
    unit = batch_size * tokens * sizes.hidden * activation_bytes
    stored = 1 if options.fp8_base else weight_bytes
    other_params = sizes.denoiser_params - sizes.block_params
    if options.offload_blocks:
        weights = other_params * stored + 2 * sizes.largest_block_params * stored  # one group on, the next arriving
    else:
        weights = sizes.denoiser_params * stored
    if options.fp8_base:
        weights += sizes.largest_linear_params * 2  # one Linear upcast to bf16 at a time
    if options.gradient_checkpointing:
        activations = sum(n for n, _ in sizes.block_counts) * unit + max(k for _, k in sizes.block_counts) * unit
    else:
        activations = sum(n * k for n, k in sizes.block_counts) * unit
        if options.fp8_base:
            activations += 2 * sizes.block_params  # the upcast copies autograd keeps for backward
    text_encoders = 0 if options.cache_text_embeddings else sizes.text_encoder_params * weight_bytes
    return MemoryEstimate(options, {"weights": weights, "lora+optimizer": sizes.lora_params * 16.0,
                                    "activations": activations, "text encoders": text_encoders})


def plan_memory(sizes: ModelSizes, requested: MemoryOptions, *, auto: bool, available: float, resolution: int,
                batch_size: int, weight_bytes: int, offload_possible: bool) -> tuple[MemoryOptions, MemoryEstimate]:
    """The options to train with and their estimate: ``requested`` as given, or with ``auto`` the
    requested ones plus the fewest further options (in ``OPTION_ORDER``) that fit ``available``
    bytes. ``ValueError`` naming the settings to lower when nothing fits."""
    options = requested
    result = estimate(sizes, options, resolution=resolution, batch_size=batch_size, weight_bytes=weight_bytes)
    if auto:
        for name in OPTION_ORDER:
            if result.total <= available:
                break
            if getattr(options, name) or (name == "offload_blocks" and not offload_possible):
                continue
            options = dataclasses.replace(options, **{name: True})
            result = estimate(sizes, options, resolution=resolution, batch_size=batch_size, weight_bytes=weight_bytes)
    if result.total <= available:
        return options, result
    off = [name for name in OPTION_ORDER if not getattr(options, name)
           and (name != "offload_blocks" or offload_possible)]
    advice = []
    if off:
        advice.append("turn on " + ", ".join(off) + (" (or set memory_saving = auto)" if not auto else ""))
    advice.append(f"lower resolution (now {resolution}) or train_batch_size (now {batch_size})")
    if weight_bytes > 2:
        advice.append("train in bf16 (mixed_precision = bf16)")
    raise ValueError(f"this run needs about {result.describe()} but the device has {available / GIB:.2f} GiB free: "
                     + "; ".join(advice))


# -- applying the options (in this order, around adding the LoRA layers: FINDINGS.md Q7) ----------------------

def store_frozen_weights_in_fp8(denoiser, compute_dtype) -> None:
    """Keep the denoiser's weights as float8_e4m3fn, each layer upcast to ``compute_dtype`` while it
    runs (diffusers' layerwise casting; norms and embeddings stay as they are). Call it before the
    LoRA layers exist: afterwards it would cast the LoRA weights too, and the step fails."""
    import torch

    denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def offload_frozen_blocks(denoiser, device) -> None:
    """Keep the denoiser's blocks in CPU RAM, moving each block to ``device`` while it runs
    (diffusers' group offloading, one block per group); after the LoRA layers are added. Not proven
    on a GPU yet: bench/dit_full_size.py --device cuda compares its gradients with a run without it."""
    import torch

    denoiser.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1)


# -- sizes from the files ------------------------------------------------------------------------------

def model_sizes(architecture, denoiser_config: Mapping[str, Any], denoiser_header, text_encoder_headers,
                *, rank: int, targets) -> ModelSizes:
    """``ModelSizes`` from the denoiser's config (its structure, built on the meta device: no
    weights), the files' headers (exact parameter counts) and the LoRA targets."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    cls = getattr(diffusers, architecture.denoiser_class)
    with init_empty_weights():
        model = cls.from_config(dict(denoiser_config))
    facts = architecture.memory
    lora_config = LoraConfig(r=rank, target_modules=targets)
    lora = largest_linear = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            largest_linear = max(largest_linear, module.weight.numel())
            if check_target_module_exists(lora_config, name):
                lora += rank * (module.in_features + module.out_features)
    block_lists = [m for m in model.children() if isinstance(m, torch.nn.ModuleList)]
    block_sizes = [sum(p.numel() for p in block.parameters()) for blocks in block_lists for block in blocks]
    hidden = math.prod(int(denoiser_config[key]) for key in facts.hidden_keys)
    counts = tuple((int(denoiser_config[key]), k) for key, k in facts.blocks)
    return ModelSizes(
        denoiser_params=denoiser_header.num_params if denoiser_header is not None else sum(
            p.numel() for p in model.parameters()),
        block_params=sum(block_sizes), largest_block_params=max(block_sizes, default=0),
        largest_linear_params=largest_linear, lora_params=lora,
        text_encoder_params=sum(h.num_params for h in text_encoder_headers), hidden=hidden,
        block_counts=counts, text_tokens=facts.text_tokens, pixel_multiple=architecture.pixel_multiple)


def device_free_bytes(device) -> float:
    """Free memory of ``device``: CUDA's own count, else the system's available RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


PLAN_FILE = "memory_plan.json"


def load_saved_plan(work_dir: Path) -> MemoryOptions | None:
    """The options a run folder's first start chose (a resumed run keeps them)."""
    path = Path(work_dir) / PLAN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return MemoryOptions(**{name: bool(saved.get(name, False)) for name in OPTION_ORDER})


def save_plan(work_dir: Path, options: MemoryOptions, result: MemoryEstimate) -> None:
    data = {**dataclasses.asdict(options), "estimate_gib": round(result.total / GIB, 3)}
    atomic_write_text(Path(work_dir) / PLAN_FILE, json.dumps(data, indent=1), overwrite=True, what="memory plan")
