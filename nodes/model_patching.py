"""The one module of the pack that touches ``ModelPatcher``: applies a Mixture of LoRA to a MODEL
(and CLIP) through the patcher's public API, mapping LoRA keys with ComfyUI's own ``comfy.lora``
functions (the stock LoraLoader's key map, converter and parser), so every LoRA name format the
stock loader accepts works here too.

Two ways to apply a mixture (both on clones; the input patchers are never modified):

* **merge** (modes bake / equal / manual): per adapted weight, all LoRAs become one rank-sum
  LoRA whose B blocks are pre-multiplied by their mixture weights, handed to ``add_patches`` as a
  core ``LoRAAdapter``. ComfyUI merges it when it loads the model (low-VRAM streaming, offload and
  stacking with other LoRAs work as for any LoRA) and sampling then costs the same as the base.
  A prompt gate is baked on a prompt encoded with the mixed CLIP (``bake_on_prompt``): the context
  dynamic mode and gate training evaluate it on; a layer gate's learned weights merge exactly. A
  gate with a timestep input changes at every sampling step, so no single merge represents it:
  asked to bake one, the loader applies it dynamically (and logs why).
* **dynamic** (token gates, or prompt and timestep gates evaluated per sample at run time): every
  adapted Linear's ``forward`` is wrapped through ``add_object_patch`` (state-dict keys stay
  unchanged, so stock weight patches and low-VRAM casting still apply to the base weight). The
  wrapper calls the current forward (read with ``get_model_object``, so patches of other packs
  chain) and adds the fused gated delta. Per-sample gates (and a token gate's timestep offsets) are
  computed once per UNet call in a ``DIFFUSION_MODEL`` wrapper from the cross-attention context and
  the timesteps (ComfyUI passes the UNet families' discrete timestep, 0..999, as diffusers does,
  and the DiT families' sigma, 0..1: the range recorded in the MoL file normalises both alike);
  layers whose gate reads nothing at run time (text-encoder layers of prompt and layer gates) are
  merged with their static gate. The fused factors count in the patcher's ``model_size()`` (see
  ``_count_factor_memory``).

The DiT families (FLUX.1, FLUX.2-klein, Z-Image): ComfyUI holds q / k / v (and FLUX.1's single-
block MLP input) in one fused Linear where diffusers, the LoRA files and the gate have one module
each; ComfyUI's key map gives such a LoRA module as a row block ``(key, (0, first row, rows))``.
Each block keeps its own experts and gate layer: merged as a patch on its rows (what the stock
loader does), or, dynamically, added to its rows of the fused Linear's output. FLUX.1's prompt gate
reads the pooled CLIP-L vector (``y`` in the diffusion model's call, ``pooled_output`` in the
conditioning), the others the text context. Nothing here uses hooks (``comfy.hooks``): object
patches, a wrapper, callbacks and weight patches keep ComfyUI 0.33 on its dynamic-VRAM model
patcher, which falls back to the old one only for conditioning with hooks
(``samplers.CFGGuider.inner_set_conds``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.patcher_extension
import comfy.utils
import torch
import torch.nn.functional as F
from comfy.weight_adapter import LoRAAdapter

from ..trainer.gate import (
    ExpertLoRA,
    FusedGatedLoRA,
    MixtureGate,
    fused_layer,
    stack_experts,
    timestep_logit_offsets,
)

logger = logging.getLogger(__name__)

PATCH_KEY = "versat2i_mixture_of_lora"  # wrapper / callback key on the patcher
# Where the diffusion model's call holds what a prompt gate reads (``MixtureGate.prompt_input``): the
# text context (None: the ``context`` argument), or FLUX.1's pooled CLIP-L vector, which ComfyUI passes
# as ``y`` (its conditioning's ``pooled_output``).
COMFY_PROMPT_KEYWORDS = {"context": None, "pooled": "y"}
CONDITIONING_PROMPT_INPUTS = {"context": None, "pooled": "pooled_output"}
_TEXT_ENCODER_LORA_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "lora_prior_te")


@dataclass
class AspectLoRA:
    """One aspect LoRA to mix: its aspect name, a display name for messages, its state dict."""

    aspect: str
    name: str
    state_dict: Mapping[str, torch.Tensor]


@dataclass
class LayerTarget:
    """One adapted weight of the model or the text encoder, or one row block of a fused weight
    (ComfyUI's DiTs hold q / k / v, and FLUX.1's single blocks also the MLP input, in one Linear,
    where the LoRA files adapt each part: ComfyUI's patch key is then ``(weight key, (0, first row,
    rows))``), with every aspect's factors."""

    key: str | tuple  # ComfyUI's patch key: a state-dict key ("diffusion_model.….weight"), or (key, offset)
    on_clip: bool
    shape: tuple[int, ...]  # of the weight, or of its row block
    experts: list[ExpertLoRA | None] = field(default_factory=list)  # one per aspect, None = not adapted

    @property
    def weight_key(self) -> str:
        return self.key if isinstance(self.key, str) else self.key[0]

    @property
    def rows(self) -> tuple[int, int] | None:
        """(first row, rows) of a row block of a fused weight; None for a whole weight."""
        return None if isinstance(self.key, str) else (int(self.key[1][1]), int(self.key[1][2]))

    @property
    def module_path(self) -> str:
        return self.weight_key[: -len(".weight")]


# -- LoRA keys -> model weights ------------------------------------------------------------------

def lora_key_map(model, clip) -> tuple[dict[str, str], set[str]]:
    """ComfyUI's LoRA-name -> state-dict-key map (the stock loader's), and the keys on the CLIP."""
    key_map: dict[str, str] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    clip_keys: set[str] = set()
    if clip is not None:
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        clip_keys = set(clip_map.values())
        key_map.update(clip_map)
    return key_map, clip_keys


def _is_text_encoder_lora_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_LORA_PREFIXES)


def collect_targets(model, clip, loras: Sequence[AspectLoRA]) -> dict[str, LayerTarget]:
    """Parse every LoRA with ComfyUI's own parser and group the factors by adapted weight.

    Raises ValueError naming the LoRA when it does not fit this model (keys that map to no layer,
    factor shapes that don't fit the weight) or uses a LoRA variant a gate can't mix."""
    key_map, clip_keys = lora_key_map(model, clip)
    model_sd = model.model_state_dict() if model is not None else {}
    clip_sd = clip.cond_stage_model.state_dict() if clip is not None else {}
    targets: dict[str, LayerTarget] = {}
    for index, lora in enumerate(loras):
        converted = comfy.lora_convert.convert_lora(dict(lora.state_dict))
        loaded = comfy.lora.load_lora(converted, key_map, log_missing=False)
        used: set[str] = set()
        for adapter in loaded.values():
            used |= set(getattr(adapter, "loaded_keys", ()))
        unmatched = [
            k for k in converted
            if k not in used and not k.endswith(".alpha") and not (clip is None and _is_text_encoder_lora_key(k))
        ]
        if unmatched or not loaded:
            example = ", ".join(sorted(unmatched)[:3]) or "(no key at all)"
            raise ValueError(
                f"LoRA {lora.name!r} (aspect {lora.aspect!r}) does not fit this model: {len(unmatched)} of "
                f"{len(converted)} tensors match no layer (e.g. {example}). It was probably trained for another "
                "base model (SD1.5 vs SDXL...); load the checkpoint it was trained on"
            )
        def lora_key_of(key, converted=converted) -> str:  # for messages: the LoRA's name of a patch key
            # (adapter.loaded_keys is shared by all of a file's adapters: find the name by the key map)
            return next((name for name, mapped in key_map.items() if mapped == key
                         and any(k.startswith(name + ".") for k in converted)), "?")

        for key, adapter in loaded.items():
            if not isinstance(adapter, LoRAAdapter):
                raise ValueError(
                    f"LoRA {lora.name!r}: layer {key} is a {type(adapter).__name__} patch; the gated loader mixes "
                    "plain LoRA (up/down) factors only. Use the stock LoraLoader for LoHa/LoKr/diff files"
                )
            up, down, alpha, mid, dora_scale, reshape = adapter.weights
            if mid is not None or dora_scale is not None or reshape is not None:
                raise ValueError(
                    f"LoRA {lora.name!r}: layer {key} uses LoCon mid weights, DoRA or reshape; the gated loader "
                    "mixes plain LoRA factors only. Use the stock LoraLoader for this file"
                )
            on_clip = key in clip_keys
            weight_key, offset = (key, None) if isinstance(key, str) else key
            weight = (clip_sd if on_clip else model_sd).get(weight_key)
            if weight is not None and offset is not None:
                if offset[0] != 0:
                    raise ValueError(
                        f"LoRA {lora.name!r} (aspect {lora.aspect!r}): {lora_key_of(key)} maps to a block of dimension "
                        f"{offset[0]} of the fused weight {weight_key!r}; the gated loader mixes whole weights and "
                        "row blocks only. Use the stock LoraLoader for this model"
                    )
                weight = weight.narrow(*offset)
            if weight is None:
                raise ValueError(
                    f"LoRA {lora.name!r} (aspect {lora.aspect!r}): {lora_key_of(key)} maps to {key!r}, a weight this "
                    f"{'CLIP' if on_clip else 'model'} does not have; the LoRA was made for another base model (or "
                    "the checkpoint is pruned). Load the checkpoint the LoRA was trained on"
                )
            rank = down.shape[0]
            if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel() or up.shape[1] != rank:
                raise ValueError(
                    f"LoRA {lora.name!r} (aspect {lora.aspect!r}) does not fit this model: layer {key} has weight "
                    f"{tuple(weight.shape)} but the LoRA factors are up {tuple(up.shape)} / down {tuple(down.shape)}. "
                    "It was trained for another base model; load the checkpoint it was trained on"
                )
            target = targets.get(key)
            if target is None:
                target = targets[key] = LayerTarget(key, on_clip, tuple(weight.shape), [None] * len(loras))
            scale = float(alpha) / rank if alpha is not None else 1.0
            target.experts[index] = ExpertLoRA(down=down, up=up, scale=scale)
    return targets


def gate_layer_keys(gate: MixtureGate, model, clip) -> dict[str, int]:
    """state-dict key -> gate layer index for every gate layer present on the connected models."""
    key_map, clip_keys = lora_key_map(model, clip)
    keys: dict[str, int] = {}
    missing = []
    for index, layer in enumerate(gate.layers):
        key = key_map.get(layer)
        if key is None:
            if clip is None and _is_text_encoder_lora_key(layer):
                continue
            missing.append(layer)
            continue
        keys[key] = index
    if missing:
        raise ValueError(
            f"the MoL gate covers {len(missing)} layers this model does not have (e.g. {missing[0]}); it was trained "
            "for another base model. Load the checkpoint the gate and its LoRAs were trained on"
        )
    return keys


# -- merge (bake / equal / manual) ----------------------------------------------------------------

def merged_adapter(target: LayerTarget, weights: torch.Tensor, strength: float) -> LoRAAdapter | None:
    """All experts of ``target`` as one core LoRAAdapter of rank sum(r_i): B blocks scaled by
    ``weight_i * strength * alpha_i / r_i``; alpha None = scale 1 in ComfyUI's LoRA math."""
    scaled = [
        None if expert is None or float(weights[i]) == 0.0
        else ExpertLoRA(down=expert.down, up=expert.up, scale=expert.scale * float(weights[i]) * strength)
        for i, expert in enumerate(target.experts)
    ]
    if all(expert is None for expert in scaled):
        return None
    in_features = target.experts[next(i for i, e in enumerate(scaled) if e is not None)].down[0].numel()
    down, up, _ = stack_experts(scaled, in_features, target.shape[0])
    return LoRAAdapter(set(), (up, down, None, None, None, None))


def apply_merge(model, clip, targets: Mapping[str, LayerTarget], weights_for: Mapping[str, torch.Tensor],
                strength: float):
    """Clone MODEL/CLIP and add one merged LoRA patch per adapted weight. ``weights_for`` maps a
    target key to its ``[N]`` mixture weights."""
    model_patches, clip_patches = {}, {}
    for key, target in targets.items():
        adapter = merged_adapter(target, weights_for[key], strength)
        if adapter is not None:
            (clip_patches if target.on_clip else model_patches)[key] = adapter
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    if new_model is not None and model_patches:
        applied = set(new_model.add_patches(model_patches, 1.0))
        _check_applied(model_patches, applied)
    if new_clip is not None and clip_patches:
        applied = set(new_clip.add_patches(clip_patches, 1.0))
        _check_applied(clip_patches, applied)
    return new_model, new_clip


def _check_applied(patches: Mapping[str, object], applied: set) -> None:
    missing = [key for key in patches if key not in applied]
    if missing:
        raise RuntimeError(f"ComfyUI refused {len(missing)} LoRA patches (e.g. {missing[0]}); please report this")


# -- dynamic (runtime gates) -------------------------------------------------------------------------

def _call_argument(executor, name: str, args: tuple, kwargs: dict):
    """The argument ``name`` of a diffusion model call after ``(x, timesteps, context)``: FLUX's
    forward hands ``y`` on by position, so it is found by the position the model's ``_forward``
    gives it."""
    if name in kwargs:
        return kwargs[name]
    names = [n for n in inspect.signature(executor.original).parameters if n != "self"]
    index = names.index(name) - 3 if name in names else -1
    return args[index] if 0 <= index < len(args) else None


class GateCallState:
    """What one UNet call sets for every gated layer, computed once per call in a DIFFUSION_MODEL
    wrapper from the cross-attention context and the timesteps: per-sample gate values (prompt
    gates, layer gates with a timestep input), expanded once to each layer's rank space, or the
    timestep logit offsets of a token gate (``[B, L, N]``)."""

    def __init__(self, gate: MixtureGate, mask: torch.Tensor | None):
        self.gate = gate
        self.mask = mask
        self.prompt_keyword = COMFY_PROMPT_KEYWORDS[gate.prompt_input]
        self.rank_indices: dict[tuple[int, ...], torch.Tensor] = {}  # ranks -> expert index per rank
        self.expanded: dict[tuple[int, ...], torch.Tensor] | None = None
        self.offsets: torch.Tensor | None = None

    def register(self, fused: FusedGatedLoRA) -> tuple[int, ...]:
        self.rank_indices.setdefault(fused.ranks, fused.rank_index.clone())
        return fused.ranks

    def to(self, device_or_dtype):  # ComfyUI's cast_to_load_options calls .to on wrappers
        return self

    def __call__(self, executor, x, timesteps=None, context=None, *args, **kwargs):
        gate = self.gate
        prompt = context if self.prompt_keyword is None else _call_argument(executor, self.prompt_keyword, args, kwargs)
        if prompt is None and gate.granularity == "prompt":
            raise ValueError(f"Gated Multi-LoRA Loader (dynamic, prompt gate): the model received no "
                             f"{'text context' if self.prompt_keyword is None else self.prompt_keyword + ' input'}")
        with torch.no_grad():
            gate.to(x.device)
            if gate.per_sample:
                gates = gate.sample_gates(None if prompt is None else prompt.float(), self.mask,
                                          timestep=timesteps, batch=x.shape[0]).to(x.dtype)
                self.expanded = {
                    ranks: gates.index_select(-1, index.to(gates.device)) for ranks, index in self.rank_indices.items()
                }
            else:  # a token gate with a timestep input
                self.offsets = timestep_logit_offsets(gate, timesteps, x.shape[0])
        try:
            return executor(x, timesteps, context, *args, **kwargs)
        finally:
            self.expanded = self.offsets = None

    def _outside_call(self) -> RuntimeError:
        return RuntimeError(
            "Gated Multi-LoRA Loader (dynamic): a gated layer ran outside a UNet call; this model can only be "
            "sampled, not used by nodes that call its layers directly"
        )

    def rank_gates(self, layer: int, ranks: tuple[int, ...], ndim: int) -> torch.Tensor:
        if self.expanded is None:
            raise self._outside_call()
        gates = self.expanded[ranks][:, layer]
        return gates.view(gates.shape[0], *([1] * (ndim - 2)), gates.shape[1])

    def logit_offsets(self, layer: int, ndim: int) -> torch.Tensor:
        if self.offsets is None:
            raise self._outside_call()
        offsets = self.offsets[:, layer]
        return offsets.view(offsets.shape[0], *([1] * (ndim - 2)), offsets.shape[1])


class RowBlocks:
    """The gated parts of one Linear: its whole weight, or the row blocks of a fused one (ComfyUI's
    q / k / v, FLUX.1's single-block linear1), each its own gated LoRA layer. They share one matmul
    for their A sides (stacked A matrices and gate projections: one GEMM of the input instead of
    one per block), then each block's B is accumulated into its rows of the output in place
    (``addmm_``: no delta tensor and no extra pass over the output, which on a CPU costs as much as
    the rank-space matmuls)."""

    def __init__(self, blocks: Sequence[tuple[FusedGatedLoRA, tuple[int, int]]]):
        self.blocks = list(blocks)
        self._key = None
        self._stacked: tuple = ()

    def stacked(self, like: torch.Tensor):
        """(stacked A sides, their biases or None, [(rows, B, biased)]) in ``like``'s device and dtype."""
        factors = [fused.factors(like) for fused, _ in self.blocks]
        key = (like.device, like.dtype, tuple(down.data_ptr() for down, _, _ in factors))
        if key != self._key:  # built once per place and dtype of the blocks' (cached) factors
            # one block (a whole weight) uses its factors as they are; several share a copy (shared_bytes)
            down = torch.cat([d for d, _, _ in factors]) if len(factors) > 1 else factors[0][0]
            biases = None
            if any(b is not None for _, _, b in factors):
                biases = torch.cat([b if b is not None else torch.zeros(d.shape[0], device=d.device, dtype=d.dtype)
                                    for d, _, b in factors])
            splits = [d.shape[0] for d, _, _ in factors]
            self._stacked = (down, biases, splits, [(rows, up, b is not None)
                                                     for (_, rows), (_, up, b) in zip(self.blocks, factors)])
            self._key = key
        return self._stacked

    def shared_bytes(self) -> int:
        """Bytes of the stacked copy ``stacked`` makes of several blocks' A sides (and their biases) at
        float32, the masters' dtype (a half-precision call makes it at half this size): the copy lives
        with the factors on the load device (at full FLUX.1 ~130 MB over the fused q / k / v and
        linear1 weights). One block makes none."""
        if len(self.blocks) < 2:
            return 0
        rows = sum(fused.down_and_gate.shape[0] for fused, _ in self.blocks)
        in_features = self.blocks[0][0].down_and_gate.shape[1]
        biased = any(fused.bias is not None for fused, _ in self.blocks)
        return rows * (in_features + biased) * torch.finfo(torch.float32).bits // 8

    def add_to(self, input: torch.Tensor, out: torch.Tensor, gates_of) -> None:
        """Add every block's gated delta to its rows of ``out`` (``[..., out_features]``, contiguous)."""
        down, biases, splits, blocks = self.stacked(input)
        h = F.linear(input, down, biases)
        out2d = out.view(-1, out.shape[-1])
        for (fused, _), part, (rows, up, biased) in zip(self.blocks, torch.split(h, splits, dim=-1), blocks):
            gates, offsets = gates_of(fused)
            low = fused.gated_low(part, gates, offsets, biased=biased)
            out2d.narrow(1, rows[0], rows[1]).addmm_(low.reshape(-1, low.shape[-1]), up.t())


class GatedForward:
    """Object patch for ``<module>.forward``: the previous forward (the layer's own, or another
    pack's patch) plus the fused gated LoRA delta of each adapted part of the weight: the whole
    weight, or row blocks of a fused one (ComfyUI's q / k / v in one Linear, each block its own gate
    layer, as the LoRAs and the gate were trained on diffusers' separate Linears; ``RowBlocks``). A
    plain object, not an nn.Module: setting a Module as an attribute would register it as a
    submodule and change the state dict."""

    def __init__(self, previous, parts: Sequence[tuple[FusedGatedLoRA, tuple[int, int] | None, int]],
                 channels_first: bool, state: GateCallState | None):
        self.previous = previous
        self.channels_first = channels_first  # 1x1 Conv2d: channels at dim 1
        self.state = state
        # (fused layer, (first row, rows) or None, gate layer index, its ranks in the call state)
        self.parts = [(fused, rows, layer, state.register(fused) if state is not None else None)
                      for fused, rows, layer in parts]
        # A Linear's parts (a whole weight is one block of all its rows) add into its output in place;
        # a 1x1 conv's output is channels-first, so it adds its delta to the moved view instead.
        self.whole = self.parts if channels_first else []
        blocks = [] if channels_first else [(fused, rows or (0, fused.out_features), layer, ranks)
                                            for fused, rows, layer, ranks in self.parts]
        self.row_blocks = RowBlocks([(fused, rows) for fused, rows, _, _ in blocks]) if blocks else None
        self._part_of = {id(fused): (layer, ranks) for fused, _, layer, ranks in blocks}

    def _gates(self, fused: FusedGatedLoRA, layer: int, ranks, ndim: int):
        """(rank gates, logit offsets) of one part for this call."""
        if self.state is None:
            return None, None
        if fused.has_token_gate:
            return None, self.state.logit_offsets(layer, ndim)
        return self.state.rank_gates(layer, ranks, ndim), None

    def __call__(self, input, *args, **kwargs):
        out = self.previous(input, *args, **kwargs)
        if self.channels_first:
            input, out = input.movedim(1, -1), out.movedim(1, -1)
        for fused, _, layer, ranks in self.whole:
            gates, offsets = self._gates(fused, layer, ranks, input.ndim)
            out = fused.forward(input, out, gates, offsets)  # .forward: skip nn.Module.__call__ overhead
        if self.row_blocks is not None:  # the fresh output of the Linear, written in place (inference only)
            out = out.contiguous()
            self.row_blocks.add_to(input, out, lambda fused: self._gates(fused, *self._part_of[id(fused)], input.ndim))
        return out.movedim(-1, 1) if self.channels_first else out


def _module_kind(patcher, target: LayerTarget) -> bool:
    """True for channels-first (1x1 conv) layers; raises for layers dynamic mode can't wrap."""
    module = patcher.get_model_object(target.module_path)
    if isinstance(module, torch.nn.Linear):
        return False
    if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
        return True
    raise ValueError(
        f"dynamic mode: layer {target.module_path} is a {type(module).__name__}; runtime gating works on Linear and "
        "1x1 Conv2d layers. Use mode 'bake' for this mixture"
    )


def _follow_device_callbacks(patcher, modules: list[FusedGatedLoRA]) -> None:
    """Move the gated layers' LoRA factors with the model: to the load device when it loads, back
    to the offload device when ComfyUI detaches it (they otherwise follow the input lazily)."""

    def on_load(patcher_, device_to, *args, **kwargs):
        if device_to is not None:
            for module in modules:
                module.to(device_to)

    def on_detach(patcher_, unpatch_all):
        for module in modules:
            if module.up.device != torch.device(patcher_.offload_device):
                module.to(patcher_.offload_device)

    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, PATCH_KEY, on_load)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, PATCH_KEY, on_detach)


def factor_bytes(modules: Sequence[FusedGatedLoRA]) -> int:
    """Bytes of the gated layers' float32 factors (what moves to the load device with the model)."""
    return sum(buffer.numel() * buffer.element_size() for module in modules for buffer in module.buffers())


def _count_factor_memory(patcher, modules: Sequence[FusedGatedLoRA], forwards: Sequence[GatedForward] = ()) -> None:
    """Add the factors to the patcher's ``model_size()``, the figure ComfyUI's model management
    frees and budgets VRAM with (``LoadedModel.model_memory``): the object patches are plain
    objects, outside the module tree whose state dict ComfyUI measures, and ``_follow_device_callbacks``
    moves them to the load device with the model. Counted with them: the copy of the A sides that a
    fused weight's row blocks share (``RowBlocks.shared_bytes``, made on the first call on that device).
    ``size`` is the patcher's own constructor argument for this figure, and clones inherit it (so do
    stock LoRA loaders after this node). Not counted: the transient rank-space activations of each
    gated layer (``[tokens, R + N]``, small next to the attention activations ComfyUI's
    ``memory_required`` reserves), and half-precision copies of the factors, made on the first call
    in that dtype (half the float32 size)."""
    shared = sum(forward.row_blocks.shared_bytes() for forward in forwards if forward.row_blocks is not None)
    patcher.size = patcher.model_size() + factor_bytes(modules) + shared


def apply_dynamic(
    model,
    clip,
    targets: Mapping[str, LayerTarget],
    gate: MixtureGate,
    layer_of_key: Mapping[str, int],
    *,
    mask: torch.Tensor | None,
    strength: float,
):
    """Clone MODEL/CLIP and install runtime-gated layers (see the module docstring). Layers whose
    gate reads nothing at run time (text-encoder layers of prompt and layer gates, every layer of a
    layer gate without timestep input) are merged with their exact static gate instead."""
    gate = gate.float().eval()
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    state = GateCallState(gate, mask) if gate.per_sample or gate.timestep_knots else None
    static = gate.static_gates(mask).detach()
    static_merge: dict[str, LayerTarget] = {}
    installed = {"model": [], "clip": []}
    forwards = {"model": [], "clip": []}
    parts: dict[tuple[bool, str], list[tuple[LayerTarget, FusedGatedLoRA, int]]] = {}
    for key, target in targets.items():
        layer = layer_of_key[key]
        if gate.per_sample and (target.on_clip or not gate.timestep_knots and gate.granularity == "layer"):
            static_merge[key] = target  # no input at run time: merged below
            continue
        in_features = target.experts[next(i for i, e in enumerate(target.experts) if e is not None)].down[0].numel()
        fused = fused_layer(gate, gate.layers[layer], target.experts, in_features, target.shape[0], mask=mask,
                            strength=strength)
        parts.setdefault((target.on_clip, target.weight_key), []).append((target, fused, layer))
    for (on_clip, _weight_key), weight_parts in parts.items():
        patcher = new_clip.patcher if on_clip else new_model
        channels_first = _module_kind(patcher, weight_parts[0][0])
        name = f"{weight_parts[0][0].module_path}.forward"
        previous = patcher.get_model_object(name)
        # text-encoder layers run outside the UNet call: token gates there read no timestep
        forward = GatedForward(previous, [(fused, target.rows, layer) for target, fused, layer in weight_parts],
                               channels_first, None if on_clip else state)
        patcher.add_object_patch(name, forward)
        installed["clip" if on_clip else "model"] += [fused for _, fused, _ in weight_parts]
        forwards["clip" if on_clip else "model"].append(forward)
    if state is not None and new_model is not None and installed["model"]:
        new_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY, state)
    if new_model is not None and installed["model"]:
        _follow_device_callbacks(new_model, installed["model"])
        _count_factor_memory(new_model, installed["model"], forwards["model"])
    if new_clip is not None and installed["clip"]:
        _follow_device_callbacks(new_clip.patcher, installed["clip"])
        _count_factor_memory(new_clip.patcher, installed["clip"], forwards["clip"])
    if static_merge:
        weights = {key: static[layer_of_key[key]] for key in static_merge}
        new_model, new_clip = apply_merge(new_model, new_clip, static_merge, weights, strength)
    return new_model, new_clip


def conditioning_prompt_input(conditioning, gate: MixtureGate) -> torch.Tensor:
    """What a prompt gate reads of a one-prompt CONDITIONING: its cross-attention context ``[1, T, D]``,
    or (FLUX.1) its pooled CLIP-L vector ``[1, D]``."""
    if not conditioning:
        raise ValueError("conditioning: empty; connect a CLIP Text Encode of the prompt to bake the gate on")
    if len(conditioning) != 1 or conditioning[0][0].shape[0] != 1:
        raise ValueError("conditioning: holds several prompts; connect the CLIP Text Encode of one prompt to bake on")
    key = CONDITIONING_PROMPT_INPUTS[gate.prompt_input]
    if key is None:
        return conditioning[0][0]
    value = conditioning[0][1].get(key)
    if value is None:
        raise ValueError(f"conditioning: has no {key}, which this gate reads; connect the CLIP Text Encode of the "
                         "model's own text encoders")
    return value


def encode_context(clip, prompt: str, gate: MixtureGate) -> torch.Tensor:
    """What a prompt gate reads of ``prompt``, encoded as CLIP Text Encode does."""
    return conditioning_prompt_input(clip.encode_from_tokens_scheduled(clip.tokenize(prompt)), gate)


def bake_on_prompt(model, clip, targets: Mapping[str, LayerTarget], gate: MixtureGate, layer_of_key: Mapping[str, int],
                   prompt: str, *, mask: torch.Tensor | None, strength: float):
    """Bake a prompt gate on ``prompt`` as dynamic mode would evaluate it: the text-encoder layers
    are merged first (in prompt granularity their gates are static: the bias softmax, the same in
    both modes), the prompt is encoded with that mixed CLIP (the UNet's context in dynamic sampling,
    and during gate training), and the gate evaluated on it is merged into the UNet layers."""
    if clip is None:
        raise ValueError("prompt: connect the CLIP; the prompt is encoded with the mixed CLIP to bake the gate on")
    gate = gate.float()
    static = gate.static_gates(mask).detach()
    clip_targets = {key: target for key, target in targets.items() if target.on_clip}
    model_targets = {key: target for key, target in targets.items() if not target.on_clip}
    _, new_clip = apply_merge(None, clip, clip_targets, {key: static[layer_of_key[key]] for key in clip_targets},
                              strength)
    layer_weights = gate.merge_weights(encode_context(new_clip, prompt, gate), mask)
    weights_for = {key: layer_weights[layer_of_key[key]] for key in model_targets}
    new_model, _ = apply_merge(model, None, model_targets, weights_for, strength)
    return new_model, new_clip


# -- entry point ---------------------------------------------------------------------------------------

MODES = ("bake", "dynamic", "equal", "manual")


def apply_mixture(
    model,
    clip,
    loras: Sequence[AspectLoRA],
    *,
    mode: str,
    gate: MixtureGate | None = None,
    enabled: Sequence[str] | None = None,
    manual_weights: Sequence[float] | None = None,
    strength: float = 1.0,
    context: torch.Tensor | None = None,
    prompt: str | None = None,
):
    """Apply ``loras`` to clones of MODEL / CLIP (either may be None) and return them.

    mode ``bake`` / ``dynamic`` need ``gate`` (its experts in the same order as ``loras``);
    ``equal`` weighs each enabled LoRA 1/N, ``manual`` by ``manual_weights``. ``enabled`` lists the
    aspects kept (None = all). A prompt gate is baked on ``prompt`` (text, encoded with the mixed
    CLIP: what dynamic mode sees; see ``bake_on_prompt``) or on ``context`` ``[1, T, D]`` (a
    cross-attention context made elsewhere, taken as it is), else on the training mean gate.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: unknown; choose one of {', '.join(MODES)}")
    if model is None and clip is None:
        raise ValueError("model / clip: connect at least one of them")
    aspects = [lora.aspect for lora in loras]
    if not loras:
        raise ValueError("loras: nothing to mix")
    if enabled is not None:
        unknown = sorted(set(enabled) - set(aspects))
        if unknown:
            raise ValueError(f"enabled aspects {unknown}: not in this mixture ({', '.join(aspects)})")
    mask = None if enabled is None else torch.tensor([a in enabled for a in aspects], dtype=torch.bool)
    if mask is not None and not bool(mask.any()):
        raise ValueError("every aspect is switched off; keep at least one enabled")
    targets = collect_targets(model, clip, loras)
    if not targets:
        raise ValueError("the LoRAs adapt no layer of the connected model / clip")

    if mode in ("bake", "dynamic"):
        if gate is None:
            raise ValueError(f"mode {mode!r} needs a learned gate (a MoL file); use 'equal' or 'manual' without one")
        if tuple(gate.experts) != tuple(aspects):
            raise ValueError(f"the gate mixes {list(gate.experts)} but the LoRAs given are {aspects}")
        layer_of_key = gate_layer_keys(gate, model, clip)
        uncovered = [key for key in targets if key not in layer_of_key]
        if uncovered:
            raise ValueError(
                f"the LoRAs adapt {len(uncovered)} layers the gate has no entry for (e.g. {uncovered[0]}); "
                "the MoL file does not belong to these LoRAs. Retrain the gate on them"
            )
        if mode == "bake" and not gate.can_bake:
            logger.warning("bake: this gate changes with the timestep at every sampling step, so no single merge "
                           "represents it; applying it dynamically (mode 'dynamic')")
            mode = "dynamic"
        if mode == "dynamic":
            return apply_dynamic(model, clip, targets, gate, layer_of_key, mask=mask, strength=strength)
        if prompt is not None and context is not None:
            raise ValueError("bake: give the prompt to bake on once, as prompt text or as a conditioning, not both")
        if (context is not None or prompt is not None) and gate.granularity != "prompt":
            logger.info("bake: a %s gate does not read the prompt; %s", gate.granularity,
                        "its learned weights are merged" if gate.granularity == "layer" else
                        "the training mean gate is merged")
            context = prompt = None
        if prompt is not None:
            return bake_on_prompt(model, clip, targets, gate, layer_of_key, prompt, mask=mask, strength=strength)
        layer_weights = gate.float().merge_weights(context, mask)
        weights_for = {key: layer_weights[layer_of_key[key]] for key in targets}
    elif mode == "equal":
        kept = torch.ones(len(loras)) if mask is None else mask.float()
        weights_for = dict.fromkeys(targets, kept / kept.sum())
    else:
        if manual_weights is None or len(manual_weights) != len(loras):
            raise ValueError(f"manual mode: give one weight per LoRA ({len(loras)}), got {manual_weights!r}")
        weights = torch.tensor([float(w) for w in manual_weights])
        if mask is not None:
            weights = weights * mask.float()
        weights_for = dict.fromkeys(targets, weights)
    return apply_merge(model, clip, targets, weights_for, strength)
