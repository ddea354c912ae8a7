"""Read and write LoRA files: kohya format for the SD families, diffusers' format for the DiT families
(the formats ComfyUI, A1111/Forge and diffusers all load for each).

**DiT families** (``lora_format = "diffusers"`` in the table): keys ``transformer.<diffusers module>.lora_A.weight``
/ ``.lora_B.weight``, as diffusers' ``save_lora_weights`` writes them, with the adapter config under the
safetensors metadata key ``lora_adapter_metadata``. ComfyUI 0.33 maps these keys for FLUX.1, FLUX.2 and
Z-Image (q / k / v onto its fused weights). The two readers disagree on alpha: ComfyUI uses a
``.alpha`` tensor (scale 1 without one) and ignores the metadata, diffusers reads the metadata's
``lora_alpha`` and refuses ``.alpha`` tensors. So the scale is baked in: ``lora_B *= alpha / r`` and
the metadata says ``lora_alpha = r``; both then apply exactly the trained delta, and so does any tool
that assumes alpha = rank (FINDINGS.md Q5, format "S"). The real alpha stays in our own metadata.

**SD families**, kohya format:

Keys: ``lora_unet_<diffusers module path with _>``, ``lora_te_<...>`` (SD1.x / SD2.x text encoder) or
``lora_te1_`` / ``lora_te2_`` (SDXL's two encoders), each with ``.lora_down.weight`` (peft's A),
``.lora_up.weight`` (peft's B) and ``.alpha`` (scale = alpha / rank, as kohya defines it).

Writing goes peft state dict -> diffusers' ``convert_state_dict_to_kohya`` (the library converter),
plus three fixes the converter does not make, each explained where it happens:
1. ``.alpha``: the converter writes alpha = rank (scale 1); we write the alpha that reproduces the
   layer's real peft scaling (lora_alpha, or per-module alpha_pattern / rsLoRA).
2. transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level), so peft keys lack the
   ``text_model.`` that every kohya reader expects; we put it back.
3. SD1.x / SD2.x have one text encoder, which kohya names ``lora_te_`` (the converter always writes
   ``lora_te1_``, the SDXL spelling).

Reading goes through diffusers' kohya -> diffusers -> peft converters (``lora_state_dict``,
``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``), then each module path is
checked against the loaded base model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..safe_io import TargetExistsError, atomic_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
# The SD kohya format names the denoiser "unet" (diffusers' converter turns "unet." into "lora_unet_").
KOHYA_DENOISER = "unet"
_COMPONENT_PREFIXES = (KOHYA_DENOISER + ".", "text_encoder_2.", "text_encoder.")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# --------------------------------------------------------------------------------------------
# peft -> kohya


def _lora_layers(model: torch.nn.Module, adapter_name: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})}


def _canonical_text_encoder_path(encoder: torch.nn.Module, path: str) -> str:
    # Fix 2 (module docstring): kohya / ComfyUI / A1111 name CLIP-L modules text_model.encoder...
    if not hasattr(encoder, "text_model") and path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + path
    return path


def _peft_state_dict(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    unsupported = [k for k in state_dict if ".lora_A." not in k and ".lora_B." not in k]
    if unsupported:
        raise ValueError(f"adapter {adapter_name!r} has tensors kohya LoRA files cannot hold "
                         f"(DoRA / bias / embeddings?): {unsupported[:4]}")
    return state_dict


def peft_to_kohya(*, denoiser: torch.nn.Module | None, text_encoders: Iterable[torch.nn.Module] = (),
                  adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Kohya state dict of the peft adapter ``adapter_name`` in ``denoiser`` and ``text_encoders``.

    Returns ``(state_dict, summary)`` where summary has ``rank``, ``alpha`` (the most common
    values) and ``modules`` (count). ``text_encoders`` is ``[te]`` (SD1/2) or ``[te1, te2]`` (SDXL);
    encoders without the adapter are skipped.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    text_encoders = list(text_encoders)
    if len(text_encoders) > 2:
        raise ValueError(f"text_encoders: at most 2 (SDXL), got {len(text_encoders)}")
    components = []
    if denoiser is not None:
        components.append((KOHYA_DENOISER, denoiser, lambda path: path))
    te_names = ["text_encoder"] if len(text_encoders) == 1 else ["text_encoder", "text_encoder_2"]
    for name, encoder in zip(te_names, text_encoders):
        components.append((name, encoder, lambda path, encoder=encoder: _canonical_text_encoder_path(encoder, path)))

    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}   # prefixed peft module path -> alpha that reproduces peft's scaling
    ranks: list[int] = []
    for name, model, canonical in components:
        layers = _lora_layers(model, adapter_name)
        if not layers:
            continue
        for key, tensor in _peft_state_dict(model, adapter_name).items():
            module_path, leaf = key.split(".lora_", 1)
            peft_sd[f"{name}.{canonical(module_path)}.lora_{leaf}"] = (
                tensor.detach().to("cpu", torch.float32).contiguous())
        for path, layer in layers.items():
            rank = int(layer.r[adapter_name])
            # Fix 1: kohya scale = alpha / rank, so alpha = peft scaling * rank (covers lora_alpha,
            # alpha_pattern / rank_pattern and rsLoRA's alpha / sqrt(rank)).
            alphas[f"{name}.{canonical(path)}"] = float(layer.scaling[adapter_name]) * rank
            ranks.append(rank)
    if not peft_sd:
        raise ValueError(f"no LoRA adapter named {adapter_name!r} in the given modules (inject one with peft first)")

    kohya = convert_state_dict_to_kohya(peft_sd)
    # The converter turns every '.' of the module path into '_': map each peft module to its kohya name
    # by converting its own key (same function, so the names always agree).
    fixed: dict[str, torch.Tensor] = {}
    single_encoder = len(text_encoders) == 1
    for module, alpha in alphas.items():
        down_key = next(iter(convert_state_dict_to_kohya({f"{module}.lora_A.weight": torch.zeros(1, 1)})))
        kohya_name = down_key.split(".")[0]
        if f"{kohya_name}.lora_down.weight" not in kohya:
            raise RuntimeError(f"kohya conversion lost module {module}")
        kohya[f"{kohya_name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    for key, tensor in kohya.items():
        if single_encoder and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]  # Fix 3
        fixed[key] = tensor.contiguous()
    summary = {"modules": len(alphas), "rank": _most_common(ranks),
               "alpha": _most_common([round(a, 6) for a in alphas.values()])}
    return fixed, summary


def _most_common(values: list):
    return max(set(values), key=values.count) if values else None


def _string_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: other values are JSON-encoded."""
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata key {key!r} is not a string (safetensors metadata is str -> str)")
        out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return out


def save_kohya_lora(
    path: str | os.PathLike,
    *,
    denoiser: torch.nn.Module | None,
    text_encoders: Iterable[torch.nn.Module] = (),
    adapter_name: str = "default",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the peft LoRA ``adapter_name`` of ``denoiser`` (and text encoders) as a kohya ``.safetensors``.

    ``metadata`` (base model hash, dataset, aspect, steps, hyperparameters...) is stored as
    safetensors metadata; non-string values are JSON-encoded. Added automatically:
    ``ss_network_module``, ``ss_network_dim`` (rank), ``ss_network_alpha``,
    ``versat2i_lora_format``, ``versat2i_modules`` — explicit values in ``metadata`` win.
    The write is atomic (``safe_io.atomic_file``: hidden temp name, fsync, rename); an existing file
    raises ``safe_io.TargetExistsError`` (a ``FileExistsError`` and ``ValueError``) unless
    ``overwrite=True``. ``path`` is used as given: confine user-supplied names with
    ``safe_io.confined_path`` first. Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if os.path.lexists(path) and not overwrite:  # fail before converting; atomic_file checks again
        raise TargetExistsError(f"LoRA file {str(path)!r} already exists; choose another name or pass overwrite=True")
    state_dict, summary = peft_to_kohya(denoiser=denoiser, text_encoders=text_encoders, adapter_name=adapter_name)
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(summary["rank"]),
        "ss_network_alpha": str(summary["alpha"]),
        "versat2i_lora_format": FORMAT_VERSION,
        "versat2i_modules": str(summary["modules"]),
    }
    header.update(_string_metadata(metadata or {}))
    with atomic_file(path, overwrite=overwrite, what="LoRA file") as temp:
        save_file(state_dict, str(temp), metadata=header)
    logger.info("saved LoRA %s (%d modules, rank %s, alpha %s)", path, summary["modules"], summary["rank"],
                summary["alpha"])
    return path


# --------------------------------------------------------------------------------------------
# peft -> diffusers' format (the DiT families)

DIFFUSERS_LORA_FORMAT = "diffusers-1"


def peft_to_diffusers(denoiser: torch.nn.Module, *, component: str = "transformer", adapter_name: str = "default"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(state_dict, adapter metadata, summary)`` of the peft adapter in ``denoiser``, with each
    layer's scale baked into its ``lora_B`` (module docstring)."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    layers = _lora_layers(denoiser, adapter_name)
    if not layers:
        raise ValueError(f"no LoRA adapter named {adapter_name!r} in the denoiser (inject one with peft first)")
    peft_sd = _peft_state_dict(denoiser, adapter_name)
    state_dict: dict[str, torch.Tensor] = {}
    ranks, alphas = [], []
    for path, layer in layers.items():
        rank = int(layer.r[adapter_name])
        scale = float(layer.scaling[adapter_name])
        down = peft_sd[f"{path}.lora_A.weight"].detach().to("cpu", torch.float32)
        up = peft_sd[f"{path}.lora_B.weight"].detach().to("cpu", torch.float32) * scale
        state_dict[f"{component}.{path}.lora_A.weight"] = down.contiguous()
        state_dict[f"{component}.{path}.lora_B.weight"] = up.contiguous()
        ranks.append(rank)
        alphas.append(round(scale * rank, 6))
    config = denoiser.peft_config[adapter_name].to_dict()
    rank = _most_common(ranks)
    other_ranks = {path: r for path, r in zip(layers, ranks) if r != rank}
    # alpha = rank everywhere (scale 1: the scale is in lora_B), also for layers of another rank
    config.update({"r": rank, "lora_alpha": rank, "alpha_pattern": dict(other_ranks), "rank_pattern": other_ranks,
                   "use_rslora": False})
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    summary = {"modules": len(layers), "rank": rank, "alpha": _most_common(alphas)}
    return state_dict, _pack_dict_with_prefix(config, component), summary


def save_diffusers_lora(path: str | os.PathLike, *, denoiser: torch.nn.Module, component: str = "transformer",
                        adapter_name: str = "default", metadata: Mapping[str, Any] | None = None,
                        overwrite: bool = False) -> Path:
    """Save the peft LoRA of a DiT denoiser in diffusers' keys with the scale baked in (module
    docstring), atomically; ``metadata`` as in ``save_kohya_lora``."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if os.path.lexists(path) and not overwrite:
        raise TargetExistsError(f"LoRA file {str(path)!r} already exists; choose another name or pass overwrite=True")
    state_dict, adapter_metadata, summary = peft_to_diffusers(denoiser, component=component, adapter_name=adapter_name)
    # What the tensors mean is fixed here and wins over ``metadata``: the scale is baked in (alpha = rank).
    header = {"ss_network_module": "networks.lora", **_string_metadata(metadata or {}), "format": "pt",
              LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True),
              "ss_network_dim": str(summary["rank"]), "ss_network_alpha": str(summary["rank"]),
              "versat2i_lora_format": DIFFUSERS_LORA_FORMAT,
              "versat2i_lora_alpha": str(summary["alpha"]),  # the alpha it was trained with (baked into lora_B)
              "versat2i_modules": str(summary["modules"])}
    with atomic_file(path, overwrite=overwrite, what="LoRA file") as temp:
        save_file(state_dict, str(temp), metadata=header)
    logger.info("saved LoRA %s (%d modules, rank %s, alpha %s baked in)", path, summary["modules"], summary["rank"],
                summary["alpha"])
    return path


def save_lora(path: str | os.PathLike, *, architecture, denoiser: torch.nn.Module,
              text_encoders: Iterable[torch.nn.Module] = (), metadata: Mapping[str, Any] | None = None,
              overwrite: bool = False) -> Path:
    """Save a trained LoRA in the file format of the family (``architecture.lora_format``)."""
    if architecture.lora_format == "diffusers":
        if list(text_encoders):
            raise ValueError(f"{architecture.label}: LoRA files hold the denoiser's layers only (no text encoder)")
        return save_diffusers_lora(path, denoiser=denoiser, component=architecture.denoiser_component,
                                   metadata=metadata, overwrite=overwrite)
    return save_kohya_lora(path, denoiser=denoiser, text_encoders=text_encoders, metadata=metadata,
                           overwrite=overwrite)


def diffusers_to_peft(state_dict: Mapping[str, torch.Tensor], base,
                      metadata: Mapping[str, str] | None = None) -> dict[str, LoraWeights]:
    """Per-module LoRA weights of a diffusers-format file, keyed ``<denoiser component>.<module>``,
    each checked against the loaded base model (the analogue of ``kohya_to_peft``). The scale comes
    from the metadata's ``lora_alpha`` (files written here: alpha = rank, scale 1)."""
    component = base.architecture.denoiser_component
    alpha = None
    if metadata and metadata.get("lora_adapter_metadata"):
        alpha = json.loads(metadata["lora_adapter_metadata"]).get(f"{component}.lora_alpha")
    problems: list[str] = []
    out: dict[str, LoraWeights] = {}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state_dict if ".lora_" in k})
    leftovers = [k for k in state_dict if ".lora_A." not in k and ".lora_B." not in k]
    if leftovers:
        problems.append(f"keys that are not diffusers LoRA tensors: {leftovers[:5]}")
    for module in modules:
        down, up = state_dict.get(f"{module}.lora_A.weight"), state_dict.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            problems.append(f"{module}: needs both .lora_A.weight and .lora_B.weight")
            continue
        if not module.startswith(component + "."):
            problems.append(f"{module}: not a {component} module")
            continue
        try:
            target = base.denoiser.get_submodule(module[len(component) + 1:])
        except AttributeError as exc:
            problems.append(f"{module}: no such module in the {base.arch} base model ({exc})")
            continue
        target = getattr(target, "base_layer", target)
        if not (isinstance(target, torch.nn.Linear) and down.shape[1] == target.in_features
                and up.shape[0] == target.out_features and up.shape[1] == down.shape[0]):
            problems.append(f"{module}: shapes A {tuple(down.shape)} / B {tuple(up.shape)} do not fit {target}")
            continue
        out[module] = LoraWeights(down=down, up=up, alpha=float(alpha) if alpha is not None else float(down.shape[0]),
                                  kohya_name=module)
    if problems:
        raise ValueError(f"{len(problems)} LoRA entries do not map onto the {base.arch} base model: "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return out


# --------------------------------------------------------------------------------------------
# kohya -> per-module weights


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, *, what: str = "file", fix: str = "") -> Iterator[Any]:
    """``safetensors.safe_open`` on ``path`` (reading its header only), with a damaged, truncated,
    empty or pickled file reported as one ``ValueError`` naming the file (safetensors' own errors
    name none). ``what``: e.g. "LoRA file"; ``fix``: what to do instead."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    try:
        handle_context = safe_open(str(path), framework="pt")
        handle = handle_context.__enter__()
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{what} {str(path)!r}: cannot be read ({type(exc).__name__}: {exc}); it is damaged, "
                         f"truncated or not a .safetensors file; {fix or 'replace it'}") from exc
    try:
        yield handle
    finally:
        handle_context.__exit__(None, None, None)


def read_safetensors(path: str | os.PathLike, *, what: str = "file", fix: str = ""
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file, errors as ``open_safetensors``'s."""
    with open_safetensors(path, what=what, fix=fix) as handle:
        metadata = dict(handle.metadata() or {})
        try:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
        except Exception as exc:  # a truncated file passes the header and fails here
            raise ValueError(f"{what} {str(path)!r}: cannot be read ({type(exc).__name__}: {exc}); it is damaged or "
                             f"truncated; {fix or 'replace it'}") from exc
    return tensors, metadata


LORA_FIX = "train it again, or replace it with an intact copy"


def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A LoRA file's safetensors metadata (its header only)."""
    with open_safetensors(path, what="LoRA file", fix=LORA_FIX) as handle:
        return dict(handle.metadata() or {})


def load_kohya_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a kohya LoRA ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path} (LoRAs live in ComfyUI's models/loras folder)")
    state_dict, metadata = read_safetensors(path, what="LoRA file", fix=LORA_FIX)
    if not state_dict:
        raise ValueError(f"LoRA file {str(path)!r}: holds no tensors; {LORA_FIX}")
    return state_dict, metadata


@dataclass
class LoraWeights:
    """One module's LoRA: delta W = (alpha / rank) * up @ down (conv: over flattened kernels)."""

    down: torch.Tensor   # peft lora_A weight [rank, in] (conv: [rank, in, kh, kw]); the file's own tensor
    up: torch.Tensor     # peft lora_B weight [out, rank] (conv: [out, rank, 1, 1]); the file's own tensor
    alpha: float
    kohya_name: str = ""  # the module's name in the file, e.g. "lora_unet_down_blocks_0_..._to_q"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _diffusers_lora_loader(architecture):
    """The family's pipeline class: its ``lora_state_dict`` is the kohya -> diffusers converter
    ``load_lora_weights`` uses."""
    import diffusers

    return getattr(diffusers, architecture.pipeline_class)


def _convert_names_with_diffusers(state_dict: Mapping[str, torch.Tensor], base) -> dict[str, str]:
    """kohya module name -> prefixed peft module key, using diffusers' converters (the path
    ``load_lora_weights`` takes: kohya -> diffusers -> peft names).

    The converters rename keys without copying tensors, so each converted key is traced back to
    its kohya name by tensor identity; alphas are attached by kohya name afterwards (diffusers'
    intermediate alpha names are not module paths).
    """
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    weights = {k: v for k, v in state_dict.items() if k.endswith((".lora_down.weight", ".lora_up.weight"))}
    kohya_by_tensor = {id(v): k.split(".", 1)[0] for k, v in weights.items()}
    converted, _ = _diffusers_lora_loader(base.architecture).lora_state_dict(
        dict(weights), unet_config=base.denoiser.config)
    names: dict[str, str] = {}
    for prefix in _COMPONENT_PREFIXES:
        part = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
        if not part:
            continue
        if prefix == KOHYA_DENOISER + ".":
            peft_part = convert_unet_state_dict_to_peft(part)
        else:
            peft_part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        for key, tensor in peft_part.items():
            kohya_name = kohya_by_tensor.get(id(tensor))
            if kohya_name is None:
                raise RuntimeError(f"diffusers copied the tensor of {key}; cannot trace it to its kohya name")
            module = prefix + key.split(".lora_", 1)[0]
            if names.setdefault(kohya_name, module) != module:
                raise ValueError(f"{kohya_name}: diffusers maps its down and up weights to different modules")
    return names


def _component(base, prefix: str) -> torch.nn.Module:
    if prefix == KOHYA_DENOISER + ".":
        return base.denoiser
    index = 1 if prefix == "text_encoder_2." else 0
    if index >= len(base.text_encoders):
        raise ValueError(f"the LoRA has {prefix[:-1]} weights but the {base.arch} base model has "
                         f"{len(base.text_encoders)} text encoder(s)")
    return base.text_encoders[index]


def split_module_key(key: str) -> tuple[str, str]:
    """``"unet.down_blocks.0..."`` -> ``("unet", "down_blocks.0...")``."""
    for prefix in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return prefix[:-1], key[len(prefix):]
    raise ValueError(f"{key!r}: expected a unet. / text_encoder. / text_encoder_2. module key")


def get_lora_target(base, key: str) -> torch.nn.Module:
    """The Linear / Conv2d of ``base`` a ``kohya_to_peft`` key names (peft's wrapped base layer if
    adapters are injected)."""
    component, path = split_module_key(key)
    module = _component(base, component + ".")
    if component != KOHYA_DENOISER and not hasattr(module, "text_model"):
        path = path.removeprefix("text_model.")  # transformers >= 5.6 flattened CLIPTextModel
    target = module.get_submodule(path)
    return getattr(target, "base_layer", target)


def _loaded_module_key(base, key: str) -> str:
    """The key with a module path valid in ``base``'s loaded modules (``get_submodule`` works on it)."""
    component, path = split_module_key(key)
    if component != KOHYA_DENOISER and not hasattr(_component(base, component + "."), "text_model"):
        path = path.removeprefix("text_model.")
    return f"{component}.{path}"


def kohya_to_peft(state_dict: Mapping[str, torch.Tensor], base) -> dict[str, LoraWeights]:
    """Per-module LoRA weights of a kohya state dict, keyed ``unet.<module path>`` /
    ``text_encoder.<path>`` / ``text_encoder_2.<path>``, where the path is the peft module path in
    ``base``'s loaded module (``base.denoiser.get_submodule(path)``; for text encoders it follows the
    installed transformers: no ``text_model.`` level for a flattened ``CLIPTextModel``).
    ``get_lora_target(base, key)`` returns the Linear / Conv2d.

    Names are converted by diffusers' own kohya converters; alpha is taken from each module's
    ``.alpha`` (rank when absent: kohya and ComfyUI then use scale 1). Every key must map onto a
    layer of ``base`` with matching shapes, else ``ValueError`` lists the keys that do not (the
    equivalent of ComfyUI's "lora key not loaded").
    """
    names = sorted({k.split(".", 1)[0] for k in state_dict})
    problems: list[str] = []
    leftovers = [k for k in state_dict if not k.endswith(_KOHYA_SUFFIXES)]
    if leftovers:
        problems.append(f"keys that are not kohya LoRA tensors: {leftovers[:5]}")
    complete = []
    for name in names:
        if f"{name}.lora_down.weight" in state_dict and f"{name}.lora_up.weight" in state_dict:
            complete.append(name)
        else:
            problems.append(f"{name}: needs both .lora_down.weight and .lora_up.weight")
    pairs = {f"{name}.{leaf}": state_dict[f"{name}.{leaf}"] for name in complete
             for leaf in ("lora_down.weight", "lora_up.weight")}
    try:
        module_keys = _convert_names_with_diffusers(pairs, base)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"diffusers cannot convert this LoRA's key names ({type(exc).__name__}: {exc})") from exc
    out: dict[str, LoraWeights] = {}
    for name in complete:
        down, up = state_dict[f"{name}.lora_down.weight"], state_dict[f"{name}.lora_up.weight"]
        key = module_keys.get(name)
        if key is None:
            problems.append(f"{name}: diffusers' converter produced no module for it")
            continue
        try:
            target = get_lora_target(base, key)
        except (AttributeError, ValueError) as exc:
            problems.append(f"{name} -> {key}: no such module in the {base.arch} base model ({exc})")
            continue
        if isinstance(target, torch.nn.Linear):
            fits = down.ndim == 2 and down.shape[1] == target.in_features and up.shape[0] == target.out_features
        elif isinstance(target, torch.nn.Conv2d):
            fits = down.ndim == 4 and down.shape[1] == target.in_channels and up.shape[0] == target.out_channels
        else:
            fits = False
        if not fits or up.shape[1] != down.shape[0]:
            problems.append(f"{name} -> {key}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} "
                            f"do not fit {target}")
            continue
        alpha_tensor = state_dict.get(f"{name}.alpha")
        alpha = float(alpha_tensor) if alpha_tensor is not None else float(down.shape[0])
        out[_loaded_module_key(base, key)] = LoraWeights(down=down, up=up, alpha=alpha, kohya_name=name)
    if problems:
        raise ValueError(f"{len(problems)} LoRA entries do not map onto the {base.arch} base model: "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return out


# --------------------------------------------------------------------------------------------
# either format, as the family writes it

def lora_module_weights(state_dict: Mapping[str, torch.Tensor], base,
                        metadata: Mapping[str, str] | None = None) -> dict[str, LoraWeights]:
    """Per-module LoRA weights of a file in the base model's family format (``lora_format``):
    ``kohya_to_peft`` (SD families) or ``diffusers_to_peft`` (DiT families). Keys name the module
    for ``lora_target_module``; ``LoraWeights.kohya_name`` is the module's name in the file."""
    if base.architecture.lora_format == "diffusers":
        return diffusers_to_peft(state_dict, base, metadata)
    return kohya_to_peft(state_dict, base)


def lora_target_module(base, key: str) -> torch.nn.Module:
    """The Linear / Conv2d of ``base`` a ``lora_module_weights`` key names (peft's wrapped base
    layer if adapters are injected)."""
    component = base.architecture.denoiser_component + "."
    if base.architecture.lora_format == "diffusers" and key.startswith(component):
        target = base.denoiser.get_submodule(key[len(component):])
        return getattr(target, "base_layer", target)
    return get_lora_target(base, key)
