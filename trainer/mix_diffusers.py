"""A Mixture of LoRA on diffusers models: the gate trainer's model, and ``versat2i mix``
(generation with a MoL file outside ComfyUI).

The aspect LoRAs stay frozen factors, never merged into peft layers: every adapted Linear (or 1x1
Conv2d) gets a forward hook that adds the gated delta to the layer's output, so the base model's
modules and state dict stay exactly as loaded and ``remove()`` restores it. Prompt and timestep
gates read their inputs in a forward pre-hook on the denoiser, once per call, where the family's
table entry says (``CallReader``: the UNet's ``encoder_hidden_states``; FLUX.1's pooled projection;
Z-Image's positional list of contexts and its reversed timestep). ``bake`` instead adds
the mixed delta to the weights in place (one merge, no per-step cost) and remembers the originals.

peft can load several adapters and weight them (``set_adapters``), but only with one weight per
adapter for the whole model; per-layer learned gates over frozen adapters are what MoLE adds, hence
these hooks.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.flow_matching import encode_prompts as encode_flow_prompts
from ..models.loading import encode_prompts
from ..models.lora_files import load_kohya_lora, lora_module_weights, lora_target_module
from .gate import (
    ExpertLoRA,
    MixtureGate,
    expand_to_ranks,
    fused_layer,
    is_text_encoder_layer,
    mixture_delta,
    prompt_embedding,
    stack_experts,
)
from .mol_file import load_mol

logger = logging.getLogger(__name__)

MODES = ("bake", "dynamic", "equal")


@dataclass
class MixtureLayer:
    """One adapted module of a diffusers base model with every aspect LoRA's factors."""

    name: str  # the module's name in the LoRA files (what the MoL file records): kohya's, or diffusers' (DiTs)
    key: str  # "unet.<path>" / "text_encoder.<path>" / "transformer.<path>" (models.lora_files.lora_module_weights)
    module: torch.nn.Module
    experts: list[ExpertLoRA | None]

    @property
    def on_text_encoder(self) -> bool:
        return self.key.startswith(TEXT_ENCODER_KEYS)

    @property
    def channels_first(self) -> bool:
        return isinstance(self.module, torch.nn.Conv2d)

    @property
    def in_features(self) -> int:
        return self.module.in_features if isinstance(self.module, torch.nn.Linear) else self.module.in_channels

    @property
    def out_features(self) -> int:
        return self.module.out_features if isinstance(self.module, torch.nn.Linear) else self.module.out_channels


def mixture_layers(base, loras: Sequence[Mapping[str, torch.Tensor]],
                   metadata: Sequence[Mapping[str, str] | None] | None = None) -> list[MixtureLayer]:
    """Group the LoRAs' factors by module of ``base`` (a ``models.loading.BaseModel``), sorted by
    their names in the files. Files are read in the family's format
    (``models.lora_files.lora_module_weights``: kohya names through diffusers' converters, or
    diffusers' own keys for the DiT families, whose alpha may be in the file's ``metadata``)."""

    layers: dict[str, MixtureLayer] = {}
    metadata = list(metadata) if metadata is not None else [None] * len(loras)
    for index, (state_dict, meta) in enumerate(zip(loras, metadata, strict=True)):
        for key, weights in lora_module_weights(state_dict, base, meta).items():
            module = lora_target_module(base, key)
            if isinstance(module, torch.nn.Conv2d) and (tuple(module.kernel_size) != (1, 1) or module.groups != 1):
                raise ValueError(f"LoRA {index}: layer {key} is a {tuple(module.kernel_size)} convolution; the gated "
                                 "mixture handles Linear and 1x1 Conv2d layers (attention / feed-forward LoRAs)")
            layer = layers.get(key)
            if layer is None:
                layer = layers[key] = MixtureLayer(weights.kohya_name, key, module, [None] * len(loras))
            layer.experts[index] = ExpertLoRA(down=weights.down, up=weights.up, scale=weights.scale)
    return sorted(layers.values(), key=lambda layer: layer.name)


def gate_for_layers(aspects: Sequence[str], layers: Sequence[MixtureLayer], granularity: str, prompt_features: int,
                    temperature: float = 1.0, **form: Any) -> MixtureGate:
    """A fresh (uniform) gate over ``layers``; ``form``: ``kind``, ``timestep_knots``, ``timestep_range``."""
    return MixtureGate(list(aspects), [layer.name for layer in layers], [layer.in_features for layer in layers],
                       granularity, prompt_features=prompt_features, temperature=temperature, **form)


def gate_form(architecture) -> dict[str, Any]:
    """What a gate reads of a family's denoiser call (``gate_for_layers`` keywords): its timestep span
    and its prompt input."""
    return {"timestep_range": architecture.gate_timestep_range, "prompt_input": architecture.gate_prompt_input}


class _CallState:
    """What one denoiser call sets for every gated layer (read in the denoiser's forward pre-hook):
    per-sample gate values ``[B, L, N]`` (prompt gates, timestep gates of layer granularity) or
    per-sample logit offsets of token gates (their timestep term, ``[B, L, N]``)."""

    def __init__(self):
        self.gates: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None

    def clear(self) -> None:
        self.gates = self.offsets = None


TEXT_ENCODER_KEYS = ("text_encoder.", "text_encoder_2.")


class CallReader:
    """Reads the gate's inputs from a diffusers denoiser call, as the family's table entry says
    (``gate_call_arguments``, ``timestep_reversed``): (prompt input, timestep as the gate reads it,
    batch size). Without an entry: the UNet's ``(sample, timestep, encoder_hidden_states)``."""

    def __init__(self, architecture=None):
        self.names = (architecture.gate_call_arguments if architecture is not None
                      else ("sample", "timestep", "encoder_hidden_states"))
        self.reversed_range = (architecture.gate_timestep_range
                               if architecture is not None and architecture.timestep_reversed else None)
        self._signatures: dict[int, inspect.Signature] = {}

    def __call__(self, module, args, kwargs) -> tuple[Any, Any, int, torch.device]:
        """(prompt input, timestep, batch size, the latents' device) of one call of ``module``."""
        # The class's forward, not the instance's: accelerate / offloading hooks replace the latter by a
        # (*args, **kwargs) wrapper.
        forward = type(module).forward
        signature = self._signatures.get(id(forward))
        if signature is None:
            signature = self._signatures[id(forward)] = inspect.signature(forward)
        arguments = signature.bind_partial(module, *args, **kwargs).arguments
        sample_name, timestep_name, prompt_name = self.names
        sample = arguments.get(sample_name)
        timestep = arguments.get(timestep_name)
        if timestep is not None and self.reversed_range is not None:  # the gate reads the noise level
            timestep = self.reversed_range - torch.as_tensor(timestep).float()
        first = sample[0] if isinstance(sample, (list, tuple)) else sample
        return arguments.get(prompt_name), timestep, len(sample), first.device


class DiffusersMixture:
    """A gate and its layers attached to a diffusers model. ``attach()`` installs the hooks
    (``train=True``: differentiable gates, the trainer's path; else the fused inference form),
    ``bake()`` merges once; ``remove()`` undoes either."""

    def __init__(self, gate: MixtureGate, layers: Sequence[MixtureLayer], *, denoiser: torch.nn.Module | None = None,
                 mask: torch.Tensor | None = None, strength: float = 1.0, architecture=None):
        missing = sorted(set(layer.name for layer in layers) - set(gate.layers))
        if missing:
            raise ValueError(f"the LoRAs adapt {len(missing)} layers the gate has no entry for (e.g. {missing[0]}); "
                             "the gate was trained for other LoRAs")
        self.gate, self.layers, self.denoiser = gate, list(layers), denoiser
        self.mask, self.strength = mask, strength
        self.state = _CallState()
        self.read_call_inputs = CallReader(architecture)
        self._handles: list = []
        self._baked: dict[int, torch.Tensor] = {}

    # -- hooks -----------------------------------------------------------------------------------------
    def attach(self, *, train: bool = False) -> DiffusersMixture:
        self.remove()
        gate = self.gate
        if gate.per_sample or gate.timestep_knots:
            if self.denoiser is None:
                raise ValueError("prompt and timestep gates need the denoiser to read their input from; pass denoiser=")
            self._handles.append(self.denoiser.register_forward_pre_hook(self._read_call, with_kwargs=True))
        for layer in self.layers:
            index = gate.layer_index[layer.name]
            static = is_text_encoder_layer(layer.name) and gate.per_sample  # bias-only gates
            if train:
                down, up, ranks = stack_experts(layer.experts, layer.in_features, layer.out_features)
                hook = _TrainHook(self, index, down, up * self.strength, ranks, layer.channels_first, static,
                                  layer.on_text_encoder)
            else:
                fused = fused_layer(gate, layer.name, layer.experts, layer.in_features, layer.out_features,
                                    mask=self.mask, strength=self.strength)
                hook = _FusedHook(self, index, fused, layer.channels_first, static, layer.on_text_encoder)
            self._handles.append(layer.module.register_forward_hook(hook))
        return self

    def _read_call(self, module, args, kwargs):
        context, timestep, batch, device = self.read_call_inputs(module, args, kwargs)
        gate = self.gate
        if gate.bias.device != device:  # the pipeline moved to another device after load
            gate.to(device)
        if gate.granularity == "prompt" and context is None:
            raise ValueError(f"prompt gate: the denoiser was called without its prompt input "
                             f"({self.read_call_inputs.names[2]})")
        with torch.set_grad_enabled(gate.training and torch.is_grad_enabled()):
            if gate.per_sample:
                embedding = None if context is None else prompt_embedding(context).float()
                self.state.gates = gate.sample_gates(embedding, self.mask, timestep=timestep, batch=batch)
            else:  # token gate with a timestep input
                self.state.offsets = gate.timestep_offsets(timestep, batch)
        return None

    def sample_gates(self, index: int, static: bool, reference: torch.Tensor) -> torch.Tensor:
        if static:
            return self.gate.static_gates(self.mask)[index].to(reference.device, reference.dtype)
        if self.state.gates is None:
            raise RuntimeError("prompt gate: a gated layer ran before the UNet received its prompt context")
        return self.state.gates[:, index].to(reference.dtype)

    def apply(self, mode: str, *, encode: Callable[[], torch.Tensor] | None = None) -> DiffusersMixture:
        """Apply the mixture in ``mode`` (``MODES``): ``dynamic`` attaches the gate; ``bake`` merges
        it once (a prompt gate on the prompt ``encode()`` returns, through the mixed text encoder;
        a timestep gate, which no single merge represents, is attached instead, with a warning);
        ``equal`` merges every kept LoRA at 1/N."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: unknown; choose one of {', '.join(MODES)}")
        if mode == "dynamic" or (mode == "bake" and not self.gate.can_bake):
            if mode == "bake":
                logger.warning("bake: this gate changes with the timestep at every sampling step, so no single merge "
                               "represents it; applying it dynamically")
            return self.attach()
        if mode == "bake" and self.gate.granularity == "prompt" and encode is not None:
            self.bake_on_prompt(encode)
            return self
        if mode == "bake":
            return self.bake(self.gate.merge_weights(None, self.mask))
        kept = torch.ones(self.gate.num_experts) if self.mask is None else self.mask.float()
        return self.bake((kept / kept.sum()).expand(len(self.gate.layers), -1))

    # -- bake ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def bake(self, weights: torch.Tensor) -> DiffusersMixture:
        """Add ``sum_i w_i s_i B_i A_i`` (``weights`` ``[L, N]`` in gate layer order) to each weight."""
        self.remove()
        self._merge(self.layers, weights)
        return self

    @torch.no_grad()
    def bake_on_prompt(self, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Bake a prompt gate on a prompt as dynamic mode (and training) evaluates it: the
        text-encoder layers are merged first (in prompt granularity their gates are static, the
        bias softmax), then ``encode()`` runs the prompt through that mixed text encoder, and the
        gate evaluated on its context is merged into the UNet layers. Returns the context (the
        UNet's ``encoder_hidden_states`` for this prompt)."""
        if self.gate.granularity != "prompt":
            raise ValueError(f"bake_on_prompt: this is a {self.gate.granularity} gate; bake it with "
                             "bake(merge_weights(None))")
        self.remove()
        self._merge([layer for layer in self.layers if layer.on_text_encoder], self.gate.static_gates(self.mask))
        context = encode()
        self._merge([layer for layer in self.layers if not layer.on_text_encoder],
                    self.gate.merge_weights(context, self.mask))
        return context

    def _merge(self, layers: Sequence[MixtureLayer], weights: torch.Tensor) -> None:
        for layer in layers:
            row = weights[self.gate.layer_index[layer.name]]
            down, up, ranks = stack_experts(layer.experts, layer.in_features, layer.out_features)
            up = up * expand_to_ranks(row.float(), ranks) * self.strength
            weight = layer.module.weight
            self._baked[id(layer.module)] = weight.detach().clone()
            delta = (up.to(weight.device) @ down.to(weight.device)).reshape(weight.shape)
            weight.add_(delta.to(weight.dtype))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._baked:
            with torch.no_grad():
                for layer in self.layers:
                    original = self._baked.pop(id(layer.module), None)
                    if original is not None:
                        layer.module.weight.copy_(original)
        self.state.clear()


class _TrainHook:
    """Differentiable gated delta (gate parameters train; LoRA factors frozen)."""

    def __init__(self, mixture, index, down, up, ranks, channels_first, static, on_text_encoder):
        self.mixture, self.index, self.ranks = mixture, index, ranks
        self.down, self.up = down, up
        self.channels_first, self.static, self.on_text_encoder = channels_first, static, on_text_encoder

    def __call__(self, module, inputs, output):
        hidden = inputs[0]
        if self.channels_first:
            hidden, output = hidden.movedim(1, -1), output.movedim(1, -1)
        if self.down.device != hidden.device:
            self.down, self.up = self.down.to(hidden.device), self.up.to(hidden.device)
        gate = self.mixture.gate
        if gate.granularity == "token":
            if not gate.calibrated[self.index]:  # first training batch: fix this layer's input scale
                gate.calibrate_input_scale(self.index, hidden)
            # (text-encoder layers run outside the denoiser's call: no timestep term)
            offsets = None if self.on_text_encoder else self.mixture.state.offsets
            gates = gate.token_gates(self.index, hidden, self.mixture.mask, offsets)
        else:
            gates = self.mixture.sample_gates(self.index, self.static, hidden)
            if gates.ndim == 2:
                gates = gates.view(gates.shape[0], *([1] * (hidden.ndim - 2)), gates.shape[1])
        out = output + mixture_delta(hidden, self.down, self.up, self.ranks, gates)
        return out.movedim(-1, 1) if self.channels_first else out


class _FusedHook:
    """Inference: the fused gated layer (gate folded into the stacked A matrix)."""

    def __init__(self, mixture, index, fused, channels_first, static, on_text_encoder):
        self.mixture, self.index, self.fused = mixture, index, fused
        self.channels_first, self.static, self.on_text_encoder = channels_first, static, on_text_encoder

    def __call__(self, module, inputs, output):
        hidden = inputs[0]
        if self.channels_first:
            hidden, output = hidden.movedim(1, -1), output.movedim(1, -1)
        gates = offsets = None
        if not self.fused.has_token_gate:
            sample = self.mixture.sample_gates(self.index, self.static, hidden)
            gates = self.fused.expand_gates(sample.expand(hidden.shape[0], -1) if sample.ndim == 1 else sample,
                                            hidden.ndim)
        elif self.mixture.state.offsets is not None and not self.on_text_encoder:
            offset = self.mixture.state.offsets[:, self.index]
            offset = offset / self.mixture.gate.temperature()[self.index]
            offsets = offset.view(offset.shape[0], *([1] * (hidden.ndim - 2)), offset.shape[1]).float()
        with torch.no_grad():
            out = self.fused.forward(hidden, output, gates, offsets)
        return out.movedim(-1, 1) if self.channels_first else out


# -- versat2i mix ------------------------------------------------------------------------------------------

def load_mixture(base, mol_path: str | Path, *, enabled: Sequence[str] | None = None, strength: float = 1.0):
    """(MolFile, DiffusersMixture) for ``base``: hash-checked LoRAs, layers mapped onto ``base``."""

    mol = load_mol(mol_path)
    loaded = [load_kohya_lora(path) for path in mol.lora_paths]
    layers = mixture_layers(base, [state for state, _ in loaded], [meta for _, meta in loaded])
    gate = mol.gate.float()
    mask = gate.expert_mask(enabled)
    unknown = sorted(set(gate.layers) - {layer.name for layer in layers})
    if unknown:
        raise ValueError(f"MoL file {mol_path}: {len(unknown)} gate layers are adapted by none of its LoRAs "
                         f"(e.g. {unknown[0]}); the file is damaged or its LoRAs were replaced")
    return mol, DiffusersMixture(gate, layers, denoiser=base.denoiser, mask=mask, strength=strength,
                                 architecture=base.architecture)


class MixtureAdapters:
    """``prepare(pipe) -> context manager`` for ``generate_candidates``: the gated Mixture of LoRA
    of a MoL file applied to ``base`` (whose modules the pipeline shares) inside the ``with`` block.

    ``dynamic``: the gate runs at every step (per token, prompt or timestep, as trained); ``bake``:
    the gate's merge weights are merged once (cheaper, prompt-independent: a layer gate's exact
    weights, else the training mean). A timestep gate cannot be merged once: asked to bake, it runs
    dynamically (logged). The hooks or merged weights are removed on exit, restoring the base model
    exactly. Used by the loop's evaluation
    (``loop.generate.generate_candidates(adapters=...)``), like ``loop.generate.LoraAdapters``.
    """

    def __init__(self, mol_path: str | os.PathLike, base, *, mode: str = "dynamic"):
        self.mol_path, self.base, self.mode = Path(mol_path), base, mode

    def describe(self) -> dict[str, Any]:
        return {"kind": "gated", "mol": str(self.mol_path), "mode": self.mode}

    @contextlib.contextmanager
    def __call__(self, pipe) -> Iterator[Any]:
        _mol, mixture = load_mixture(self.base, self.mol_path)
        mixture.apply(self.mode)
        try:
            yield pipe
        finally:
            mixture.remove()


# The conditioning entry (``models.flow_matching.encode_prompts``) a DiT family's prompt gate reads
# (``Architecture.gate_prompt_input``).
FLOW_PROMPT_INPUTS = {"context": "prompt_embeds", "pooled": "pooled_prompt_embeds"}


def prompt_context(base, prompt: str, device) -> torch.Tensor:
    """What a prompt gate reads of ``prompt`` on ``base`` (through its text encoders as loaded, with
    any merged text-encoder layers): the UNet's cross-attention context ``[1, T, D]``; for a DiT
    family its text context or (FLUX.1) pooled vector, as the prompt embedding ``[1, D]``."""
    if base.architecture.objective == "flow_matching":
        cond = encode_flow_prompts(base, [prompt], device)
        return prompt_embedding(cond[FLOW_PROMPT_INPUTS[base.architecture.gate_prompt_input]]).float()
    with torch.no_grad():
        hidden, _ = encode_prompts(base, [prompt], device)
    return hidden
