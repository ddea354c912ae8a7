"""Model files as ComfyUI users have them, read for diffusers: the split files of the DiT families
(``diffusion_models/``, ``text_encoders/``, ``vae/``), their fp8 forms, and checkpoints that hold all
three.

* ``read_header`` lists a ``.safetensors`` file's tensors (name, shape, dtype) from its header
  without reading the weights: detection and queue-time checks cost milliseconds even for 20 GB.
* ``dequantize_fp8`` turns the fp8 files ComfyUI loads into plain floats: plain ``float8_e4m3fn`` /
  ``e5m2`` weights, ComfyUI's old "scaled fp8" (a ``scaled_fp8`` marker and ``<layer>.scale_weight``)
  and its new quantisation format (``<layer>.weight_scale`` with the layer's format in
  ``<layer>.comfy_quant`` or the ``_quantization_metadata`` header entry). Both scaled forms store
  ``q = w / scale`` with one scale per tensor (``comfy/quant_ops.py``), so ``w = q * scale``.
* ``convert_denoiser`` maps a diffusion model in ComfyUI's (= the original BFL / Tongyi) layout to
  diffusers' keys with diffusers' own single-file converters, named by the family's table entry.
  diffusers' FLUX.1 converter assumes width 3072 when it splits ``single_blocks.N.linear1``; for
  other widths (tiny test models) that split is done here first.
* ``convert_vae`` does the same for the VAE files (ldm layout, plus FLUX.2's batch-norm latent
  statistics), with diffusers' ``convert_ldm_vae_checkpoint``.
* ``align_keys`` fits a text-encoder file to the transformers class it is loaded into (transformers
  5 dropped the ``text_model.`` level of CLIP; ComfyUI's Qwen3 files carry ``model.``).

Pure torch / safetensors / diffusers: no ComfyUI import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI's full-checkpoint prefix of the diffusion model (also in files saved by its CheckpointSave).
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."
# Quantisation side tensors that dequantising consumes (old and new ComfyUI names).
_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
_DROPPED_SUFFIXES = (".comfy_quant", ".input_scale", ".scale_input", *_SCALE_SUFFIXES)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


# -- headers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype | None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class FileHeader:
    """A ``.safetensors`` file's tensor table and metadata, read without loading the tensors."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: info.shape for key, info in self.tensors.items()}

    @property
    def num_params(self) -> int:
        return sum(info.numel for info in self.tensors.values() if info.dtype is None or info.dtype.is_floating_point)

    def dtypes(self) -> set[torch.dtype]:
        return {info.dtype for info in self.tensors.values() if info.dtype is not None}

    def has_fp8(self) -> bool:
        return bool(self.dtypes() & set(FP8_DTYPES))

    def part(self, prefix: str) -> FileHeader:
        """The tensors under ``prefix`` (a full checkpoint's component), the prefix cut off."""
        if not prefix:
            return self
        return FileHeader(self.path, {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)},
                          self.metadata)

    def with_prefix_removed(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensors under ``prefix`` with the prefix cut off."""
        return {key[len(prefix):]: info.shape for key, info in self.tensors.items() if key.startswith(prefix)}


def read_header(path: str | os.PathLike) -> FileHeader:
    """The tensor table of a ``.safetensors`` file (8-byte length + JSON header, as the format
    defines it; read directly because safetensors' ``safe_open`` maps the whole file to list it).
    ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= 100 * 2**20:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}); it is damaged "
                         "or another format") from exc
    metadata = header.pop("__metadata__", None) or {}
    tensors = {key: TensorInfo(tuple(int(s) for s in entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"]))
               for key, entry in header.items()}
    return FileHeader(path=path, tensors=tensors, metadata=dict(metadata))


def read_tensors(path: str | os.PathLike, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors under ``prefix`` with the prefix removed, file metadata) of a ``.safetensors`` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key[len(prefix):]: handle.get_tensor(key)
                   for key in handle.keys() if key.startswith(prefix)}  # noqa: SIM118 (safe_open is not iterable)
    return tensors, metadata


# -- fp8 -------------------------------------------------------------------------------------------

def quantized_layer_formats(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str,
                                                                                                                str]:
    """layer -> quantisation format named by ComfyUI's new format (header entry or ``.comfy_quant``)."""
    formats: dict[str, str] = {}
    if metadata and "_quantization_metadata" in metadata:
        layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
        formats.update({layer: str(conf.get("format")) for layer, conf in layers.items()})
    for key, tensor in state_dict.items():
        if key.endswith(".comfy_quant"):
            conf = json.loads(bytes(tensor.tolist()).decode())
            formats[key[: -len(".comfy_quant")]] = str(conf.get("format"))
    return formats


def is_quantized(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(t.dtype in FP8_DTYPES for t in state_dict.values()) or any(
        k == "scaled_fp8" or k.endswith(_DROPPED_SUFFIXES) for k in state_dict)


def dequantize_fp8(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
                   metadata: Mapping[str, str] | None = None, *, name: str = "file") -> dict[str, torch.Tensor]:
    """Plain ``dtype`` weights from a state dict with fp8 (plain or ComfyUI-scaled) tensors; other
    tensors pass through. ``ValueError`` for quantisation formats other than fp8 (nvfp4, mxfp8,
    int8: ComfyUI 0.33 reads them, this trainer does not)."""
    other = {layer: fmt for layer, fmt in quantized_layer_formats(state_dict, metadata).items()
             if fmt not in ("float8_e4m3fn", "float8_e5m2")}
    if other:
        sample = ", ".join(f"{layer}: {fmt}" for layer, fmt in list(other.items())[:3])
        raise ValueError(f"{name}: quantised in a format this trainer cannot read ({sample}); use the bf16 / fp16 or "
                         "fp8 (e4m3fn) version of this model")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "scaled_fp8" or key.endswith(_DROPPED_SUFFIXES):
            continue
        if tensor.dtype not in FP8_DTYPES:
            out[key] = tensor
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else key
        scale = next((state_dict[layer + s] for s in _SCALE_SUFFIXES if layer + s in state_dict), None)
        weight = tensor.to(torch.float32)
        if scale is not None:
            scale = scale.to(torch.float32)
            if scale.numel() > 1:  # one scale per output row
                scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
            weight = weight * scale
        out[key] = weight.to(dtype)
    return out


# -- denoiser and VAE conversion -----------------------------------------------------------------------

def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = DIFFUSION_MODEL_PREFIX) -> dict[str,
                                                                                                       torch.Tensor]:
    """The tensors under ``prefix`` (without it) when there are any, else all of them."""
    if any(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return dict(state_dict)


def _flux1_any_width(checkpoint: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    """diffusers' FLUX.1 converter at any width: it splits ``single_blocks.N.linear1`` into
    q | k | v | mlp with a hard-coded width of 3072, so for another width the split is done here and
    the converter gets a meta-device stand-in of the 3072 shape (its pieces are then replaced)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    hidden = checkpoint["img_in.weight"].shape[0]
    if hidden == 3072:
        return convert_flux_transformer_checkpoint_to_diffusers(checkpoint, **kwargs)
    mlp = 4 * hidden  # FLUX.1's mlp_ratio
    pieces: dict[str, torch.Tensor] = {}
    singles = sorted({int(k.split(".")[1]) for k in checkpoint if k.startswith("single_blocks.")})
    for index in singles:
        prefix = f"single_transformer_blocks.{index}."
        for leaf in ("weight", "bias"):
            fused = checkpoint.pop(f"single_blocks.{index}.linear1.{leaf}")
            q, k, v, m = torch.split(fused, (hidden, hidden, hidden, mlp), dim=0)
            pieces.update({f"{prefix}attn.to_q.{leaf}": q, f"{prefix}attn.to_k.{leaf}": k,
                           f"{prefix}attn.to_v.{leaf}": v, f"{prefix}proj_mlp.{leaf}": m})
            checkpoint[f"single_blocks.{index}.linear1.{leaf}"] = torch.empty(
                3 * 3072 + 4 * 3072, *fused.shape[1:], device="meta")
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint, **kwargs)
    converted.update(pieces)
    return converted


def _diffusers_converter(name: str):
    from diffusers.loaders import single_file_utils

    return getattr(single_file_utils, name)


# converter name in the family table -> function(checkpoint) -> diffusers state dict
CONVERTERS = {
    "flux1": lambda: _flux1_any_width,
    "flux2": lambda: _diffusers_converter("convert_flux2_transformer_checkpoint_to_diffusers"),
    "z_image": lambda: _diffusers_converter("convert_z_image_transformer_checkpoint_to_diffusers"),
    "identity": lambda: (lambda checkpoint, **kwargs: checkpoint),
}


def _bfl_norm_names(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL files name the q/k RMSNorm weights ``*_norm.scale``; ComfyUI's own model (and so a file
    it saved) calls them ``*_norm.weight``. diffusers' FLUX converters read ``.scale``."""
    return {(k[: -len(".weight")] + ".scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in checkpoint.items()}


def convert_denoiser(converter: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI-layout diffusion model (full-checkpoint prefix allowed) in diffusers' keys. The
    input is not modified (diffusers' converters pop from the dict they get)."""
    checkpoint = strip_prefix(state_dict)
    if converter in ("flux1", "flux2"):
        checkpoint = _bfl_norm_names(checkpoint)
    return CONVERTERS[converter]()(checkpoint)


def convert_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """An ldm-layout VAE file (``ae.safetensors``, ``flux2-vae.safetensors``, or a checkpoint's
    ``vae.`` / ``first_stage_model.`` part) in diffusers' keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # FLUX.2's file keeps its quant convs inside encoder / decoder; ComfyUI renames them the same way.
    renamed = {}
    for key, value in state_dict.items():
        for old, new in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
            if old in key:
                key = key.replace(old, new)
        renamed[key] = value
    converted = convert_ldm_vae_checkpoint(renamed, dict(config))
    for key, value in renamed.items():  # FLUX.2's batch-norm statistics of the patchified latent
        leaf = key.split(".", 1)[-1] if key.split(".")[0] in ("vae", "first_stage_model") else key
        if leaf.startswith("bn."):
            converted[leaf] = value
    return converted


# -- text encoders ------------------------------------------------------------------------------------

KEY_PREFIX_CANDIDATES = ("text_model.", "model.", "transformer.", "encoder.")


def align_keys(state_dict: Mapping[str, torch.Tensor], model_keys: Iterable[str],
               candidates: Iterable[str] = KEY_PREFIX_CANDIDATES) -> dict[str, torch.Tensor]:
    """``state_dict`` with one prefix added or removed so that the most keys are the model's own
    (transformers 5's CLIPTextModel has no ``text_model.`` level; ComfyUI's Qwen3 files name the
    decoder ``model.`` where ``Qwen3Model`` has none). Keys that fit neither way are kept as they are
    (the strict load then names them)."""
    model_keys = set(model_keys)
    best, best_hits = dict(state_dict), sum(k in model_keys for k in state_dict)
    for prefix in candidates:
        for rename in (lambda k, p=prefix: k[len(p):] if k.startswith(p) else k, lambda k, p=prefix: p + k):
            candidate = {rename(k): v for k, v in state_dict.items()}
            hits = sum(k in model_keys for k in candidate)
            if hits > best_hits:
                best, best_hits = candidate, hits
    return best
