"""diffusers pipelines over a loaded base model: the sampling side of ``models`` (generation of
candidates, evaluation, ``versat2i mix``), with the family's pipeline class from the architecture
table, named sampling schedulers and LoRA adapters applied for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .architectures import ARCHITECTURES
from .loading import load_base_model
from .lora_files import load_kohya_lora
from .split_files import folder_architecture, inspect_model_files, is_dit_diffusion_model

# Sampling schedulers by name: diffusers class + config overrides. Every one is built from the
# checkpoint's own scheduler config (betas, timestep spacing) with its prediction type kept, so a
# v-prediction or x0-prediction model samples correctly with any of them. "default" is the
# checkpoint's own scheduler class.
SCHEDULERS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "default": (None, {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PipelineAdapter = Callable[[Any], contextlib.AbstractContextManager]
"""``prepare(pipe)`` returns a context manager; the pipeline is adapted inside the ``with`` block
and restored when it exits (also on an error)."""

# -- pipeline ------------------------------------------------------------------------------------

def process_state(device: str | torch.device | None = "auto"):
    """accelerate's ``PartialState`` of this process (one process unless started by ``accelerate
    launch`` / ``torchrun``). An explicit CPU device (or ``ACCELERATE_USE_CPU``) makes a multi-process
    launch split the work between CPU processes (gloo) instead of looking for GPUs."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
        device not in (None, "auto") and torch.device(device).type == "cpu")
    return PartialState(cpu=cpu)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: this process's accelerator under ``accelerate launch`` (else cuda, mps, cpu)."""
    if device is None or device == "auto":
        from accelerate import PartialState

        return torch.device(PartialState().device)
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``auto``/None: float16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def make_scheduler(name: str, config: Mapping[str, Any], *, prediction_type: str | None = None,
                   default_class: str | None = None):
    """A sampling scheduler from a checkpoint's scheduler config, keeping its prediction type."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: use one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    class_name = class_name or default_class or config.get("_class_name") or "DDIMScheduler"
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise ValueError(f"scheduler class {class_name!r} (from the checkpoint config) is not in diffusers")
    updates = dict(overrides)
    if prediction_type is not None:
        updates["prediction_type"] = prediction_type
    return scheduler_class.from_config({**dict(config), **updates})


def _checkpoint_scheduler_config(base) -> tuple[dict[str, Any], str | None]:
    """The checkpoint's sampling scheduler config (class included) from its config folder; the
    training DDPMScheduler's config when that folder has none."""
    config_file = Path(base.config_dir or "") / "scheduler" / "scheduler_config.json"
    config = dict(base.noise_scheduler.config)
    default_class = None
    if base.config_dir and config_file.is_file():
        saved = json.loads(config_file.read_text())
        default_class = saved.get("_class_name")
        # The training scheduler carries what loading decided (prediction type, zero-SNR rescale).
        config = {**saved, **{k: v for k, v in config.items() if k in ("prediction_type", "rescale_betas_zero_snr")}}
    return config, default_class


# The DiT families sample with their flow-matching Euler scheduler (the one their pipelines are built
# for); these names select it.
FLOW_SCHEDULERS = ("default", "euler")


def _flow_scheduler(base, name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name not in FLOW_SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: {base.architecture.label} samples with its flow-matching scheduler; "
                         f"use one of {', '.join(FLOW_SCHEDULERS)}")
    return FlowMatchEulerDiscreteScheduler.from_config(base.noise_scheduler.config)  # a copy: sampling sets timesteps


def build_pipeline(base, *, scheduler: str = "default", device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None):
    """A diffusers pipeline over ``base``'s modules (shared, not copied: moving / casting the
    pipeline moves / casts ``base``'s modules). ``base`` is a ``models.loading.BaseModel``. Text
    encoders a training run has freed (after caching the text embeddings) are None in the pipeline:
    pass ``prompt_embeds`` then."""
    import diffusers

    if base.vae is None:
        raise ValueError(
            f"{base.source_path}: the checkpoint has no VAE (first_stage_model.*), so images can't be decoded; "
            "use a checkpoint with a baked-in VAE"
        )
    architecture = base.architecture
    if architecture.objective == "flow_matching":
        sampler = _flow_scheduler(base, scheduler)
        options = {**architecture.pipeline_options, **(base.variant.pipeline_options if base.variant else {})}
    else:
        config, default_class = _checkpoint_scheduler_config(base)
        sampler = make_scheduler(scheduler, config, prediction_type=base.prediction_type, default_class=default_class)
        options = dict(architecture.pipeline_options)
    components = {architecture.denoiser_component: base.denoiser, "vae": base.vae, "scheduler": sampler}
    encoders = list(base.text_encoders) or [None] * len(architecture.text_encoders)
    for spec, encoder, tokenizer in zip(architecture.text_encoders, encoders, base.tokenizers, strict=True):
        components[spec.component], components[spec.tokenizer] = encoder, tokenizer
    pipe = getattr(diffusers, architecture.pipeline_class)(**components, **options)
    pipe.set_progress_bar_config(disable=True)  # our own bar counts images across the whole grid
    if dtype is not None and all(module.dtype == dtype for module in _torch_modules(pipe)):
        # Nothing to cast: diffusers warns on every to(dtype) of its models ("should be kept in
        # float32: []"), even one that changes nothing, as on a CPU where everything is float32.
        dtype = None
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def _torch_modules(pipe) -> list[torch.nn.Module]:
    return [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]


def pipeline_denoiser(pipe):
    """The denoiser of a diffusers pipeline of any family in the table (``pipe.unet`` for the SD
    families); None when the pipeline has none the table knows."""
    for architecture in ARCHITECTURES.values():
        denoiser = getattr(pipe, architecture.denoiser_component, None)
        if denoiser is not None:
            return denoiser
    return None


def load_pipeline(checkpoint: str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
                  scheduler: str = "default", device: str | torch.device | None = "auto",
                  dtype: str | torch.dtype | None = "auto", prediction_type: str = "auto",
                  compute_hash: bool = True, text_encoders: Sequence[str | os.PathLike] = (),
                  vae: str | os.PathLike | None = None):
    """``(pipeline, base)`` for a checkpoint file, a DiT family's split files (``text_encoders``,
    ``vae``) or a diffusers folder, on ``device`` in ``dtype``."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    base = load_base_model(checkpoint, config_dir=config_dir, prediction_type=prediction_type,
                           torch_dtype=torch_dtype, compute_hash=compute_hash, text_encoders=text_encoders, vae=vae)
    return build_pipeline(base, scheduler=scheduler, device=device), base


# What an SD pipeline samples with unless told otherwise (the DiT variants carry theirs in the table).
SD_SAMPLING = {"num_inference_steps": 30, "guidance_scale": 7.5}


def sampling_defaults(model: str | os.PathLike, *, text_encoders: Sequence[str | os.PathLike] = (),
                      vae: str | os.PathLike | None = None, config_dir: str | os.PathLike | None = None
                      ) -> dict[str, Any]:
    """Steps and guidance the model samples with by default, from its files' headers (a DiT
    variant's own: FLUX.2-klein 4 steps at guidance 1...; SD: 30 at 7.5)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        found = folder_architecture(json.loads(index.read_text()), path) if index.is_file() else None
        return dict(found[1].sampling) if found else dict(SD_SAMPLING)
    if text_encoders or vae or is_dit_diffusion_model(path):
        return dict(inspect_model_files(path, text_encoders, vae, config_dir=config_dir).variant.sampling)
    return dict(SD_SAMPLING)


# -- adapters ------------------------------------------------------------------------------------

def _adapter_name(index: int, path: Path) -> str:
    # peft adapter names become attribute keys: no '.'.
    return f"versat2i_{index}_" + re.sub(r"[^A-Za-z0-9_]", "_", path.stem)[:40]


class LoraAdapters:
    """Apply LoRA files (kohya keys, as our trainer writes them) to a diffusers pipeline for the
    duration of a ``with`` block, with diffusers' ``load_lora_weights`` + ``set_adapters``.

    ``LoraAdapters([a])``: one LoRA at weight 1; ``LoraAdapters([a, b, c], weights=[...])``: a
    weighted merge; ``equal_weight_merge(paths)``: weights 1/n each. ``fuse=True`` merges the
    weights into the base layers while sampling (an unmerged LoRA costs ~40 % more time per step)
    and unmerges them on exit.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, *,
                 fuse: bool = True, label: str | None = None):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("LoRA adapters: no LoRA file given")
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"LoRA file {str(path)!r} not found")
        self.weights = [1.0] * len(self.paths) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.paths):
            raise ValueError(f"LoRA weights: {len(self.weights)} weights for {len(self.paths)} LoRA files")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"LoRA weights must be finite numbers, got {self.weights}")
        self.fuse = fuse
        self.label = label

    def describe(self) -> dict[str, Any]:
        return {"kind": "lora", "label": self.label, "fuse": self.fuse,
                "loras": [{"path": str(p), "weight": w} for p, w in zip(self.paths, self.weights)]}

    @contextlib.contextmanager
    def __call__(self, pipe) -> Iterator[Any]:
        had_adapters = bool(_list_adapters(pipe))
        previously_active = list(pipe.get_active_adapters()) if had_adapters else []
        names = [_adapter_name(i, path) for i, path in enumerate(self.paths)]
        loaded: list[str] = []
        fused = False
        try:
            for name, path in zip(names, self.paths):
                state_dict, _metadata = load_kohya_lora(path)
                try:
                    _load_lora_into_pipeline(pipe, state_dict, name, first=not loaded and not had_adapters)
                except ValueError as exc:
                    hint = ""
                    if "infer state dict type" in str(exc):
                        # diffusers recognises a kohya text-encoder LoRA by its out_proj keys.
                        hint = ("; its text-encoder part must include the attention out_proj layers (train the "
                                "text encoder on q/k/v/out_proj + fc1/fc2, as our trainer does)")
                    raise ValueError(f"LoRA file {str(path)!r}: diffusers can't load it ({exc}){hint}") from exc
                loaded.append(name)
            pipe.set_adapters(names, adapter_weights=self.weights)
            if self.fuse:
                pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
                fused = True
            yield pipe
        finally:
            if fused:
                pipe.unfuse_lora()
            if loaded:
                if had_adapters:
                    pipe.delete_adapters(loaded)
                    if previously_active:
                        pipe.set_adapters(previously_active)
                else:
                    pipe.unload_lora_weights()  # back to the plain modules (no peft wrappers left)


def _load_lora_into_pipeline(pipe, state_dict: dict, name: str, *, first: bool) -> None:
    """diffusers' ``load_lora_weights``, minus two notices that say nothing about these LoRAs:

    - a LoRA without text-encoder keys (``lora_te*``: our trainer's default) goes into the
      denoiser only, as ``load_lora_weights`` does with its denoiser half; offered to each text
      encoder too, diffusers warns "No LoRA keys associated to CLIPTextModel" for each;
    - peft warns "Already found a `peft_config` attribute" whenever a model gets a second
      adapter, which is what a weighted merge of LoRAs is: silenced for this call only.
    """
    with warnings.catch_warnings():
        if not first:
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        # A DiT family's LoRA (diffusers' ``transformer.`` keys, models/lora_files.py) goes through the
        # family pipeline's own loader; so does a kohya LoRA with text-encoder layers.
        if any(key.startswith(("lora_te", "transformer.")) for key in state_dict):
            pipe.load_lora_weights(dict(state_dict), adapter_name=name)
            return
        converted, alphas = pipe.lora_state_dict(dict(state_dict))
        pipe.load_lora_into_unet(converted, network_alphas=alphas, unet=pipeline_denoiser(pipe), adapter_name=name,
                                 _pipeline=pipe)


def _list_adapters(pipe) -> list[str]:
    try:
        return sorted({name for names in pipe.get_list_adapters().values() for name in names})
    except (AttributeError, ValueError):
        return []


def single_lora(path: str | os.PathLike, weight: float = 1.0, *, fuse: bool = True) -> LoraAdapters:
    return LoraAdapters([path], [weight], fuse=fuse, label=Path(path).stem)


def equal_weight_merge(paths: Sequence[str | os.PathLike], *, fuse: bool = True) -> LoraAdapters:
    """The naive baseline of VersaT2I's mixture: every LoRA at weight 1/n (so the weights sum to 1,
    like the gate's)."""
    paths = list(paths)
    return LoraAdapters(paths, [1.0 / max(len(paths), 1)] * len(paths), fuse=fuse, label="equal-weight merge")


def describe_adapters(adapters: PipelineAdapter | None) -> Any:
    if adapters is None:
        return None
    describe = getattr(adapters, "describe", None)
    return describe() if callable(describe) else {"kind": "custom", "repr": repr(adapters)}
