"""Mixture of LoRA (MoLE-style) gate: pure PyTorch, shared by the gate trainer, the diffusers
mixer and the ComfyUI Gated Multi-LoRA Loader. No ``comfy`` import.

The model (after MoLE, arXiv 2404.13628): every layer that the aspect LoRAs adapt gets its own
gate over the N frozen LoRAs ("experts"), with a learnable temperature:

    y = W x + sum_i g_i * s_i * B_i A_i x,      z = (V u + b + T_l h(t)) / tau,   g = m * act(z)

where ``s_i = alpha_i / rank_i`` is each LoRA's own scale. What the gate reads (``u``), fixed at
training time (``granularity``):

* ``token``: the layer's input hidden state, one gate per token. (MoLE routes per token too, but
  computes its logits from the experts' concatenated outputs; logits from the layer input cost one
  extra row block in the experts' stacked A matmul instead of N full expert outputs.)
* ``prompt``: the prompt embedding, the mean over tokens of the text-encoder hidden states that the
  UNet cross-attends to (``context`` in ComfyUI, ``encoder_hidden_states`` in diffusers: the same
  tensor on both sides, unlike the CLIP "pooled" output, which ComfyUI and diffusers compute
  differently). One gate per sample, constant over a sampling run, so it can be merged into the
  weights once ("bake"). Text-encoder layers can't depend on the prompt embedding they produce: in
  this granularity their gates are static (``z = b``).
* ``layer``: nothing (``z = b``): one learned weight per layer and LoRA, the same for every input
  (what a per-layer merge with learned coefficients is); bakes exactly.

How the logits become weights (``kind``): MoLE's ``softmax`` makes the weights sum to 1, so an
untrained gate is the 1/N average of the LoRAs and a trained one can only redistribute that unit of
weight: every aspect gets a share of its LoRA's effect, never all of it (measured on the demo world:
58 % of the aesthetics LoRA's own gain). The other kinds are free to combine:

* ``softmax_n``: ``N * softmax``: the weights sum to N, so the untrained gate is every LoRA at full
  weight (the plain sum) and training moves weight between LoRAs per layer and input;
* ``sigmoid``: ``2 * sigmoid`` per LoRA, each weight in (0, 2) independently of the others (1 at
  the start);
* ``scaled_softmax``: ``N * softmax * exp(rho)`` with a learned per-layer, per-LoRA log scale
  ``rho`` (the softmax routes, the scale sets each LoRA's total strength).

Optional timestep conditioning (``timestep_knots`` K >= 2; AutoLoRA, arXiv 2508.02107, gates across
layers and noise levels: composition is decided at high noise, fine texture at low noise): each
layer adds ``T_l h(t)`` to its logits, where ``t`` is the denoiser's timestep divided by the
family's timestep range (``models.architectures``: the noise level in 0..1) and ``h`` the K
piecewise-linear "hat" functions with knots at 0, 1/(K-1), ..., 1, so ``T_l[:, k]`` is the logit
offset at knot k and the gate interpolates linearly between knots. Text-encoder layers run once per
prompt, outside the denoiser's steps: they get no timestep term. A timestep gate changes at every
sampling step, so it cannot be merged into the weights once; callers asked to bake one apply it
dynamically instead (``can_bake``).

Gate inputs are normalised to unit length, so that the logits' scale, and so the temperature, is
comparable across layers (hidden-state magnitudes differ by orders of magnitude between layers),
and so that one optimiser step moves a logit about as far through the projection ``V`` as through
the bias (fan-in scaling: with raw inputs, Adam's per-element steps add up over ``in_features``
elements and the projection's noise swamps the routing signal). The prompt embedding is divided by
its norm per sample (once per UNet call); each token-gated layer divides its logits by a fixed
``input_scale``, the mean L2 norm of that layer's input on the first training batch (calibrated
once, like a frozen normalisation statistic, and saved with the gate). A fixed scale folds into the
gate projection at inference, so the token gate costs no normalisation pass per layer: on a GPU an
SD1.5 step is bound by kernel launches, and a per-token norm costs as much as the rest of the
gated layer.

Masking experts out at inference (MoLE's "flexible composition") sets their logits to -inf: a
softmax renormalises over the rest (``g_i / sum_{j kept} g_j``), and the kinds that scale by N
scale by the number of kept LoRAs instead (each kept LoRA keeps its weight's order of size); a
sigmoid weight just drops out.

Balancing losses (stop the gate collapsing onto one LoRA), on each LoRA's *share* of the
activations ``act(z)`` (the softmax values themselves; sigmoid values divided by their sum), so the
scale of a free gate is left to the denoising loss:

* ``mole``: MoLE's ``-log prod_i q_i``, ``q_i`` = mean share of expert i over every gate
  evaluation (layers x tokens x batch) of the step. Minimum ``N log N`` at a uniform mean.
* ``switch``: Switch Transformer's load balancing ``N sum_i f_i P_i`` per layer (``f_i`` = share of
  tokens whose top expert is i, ``P_i`` = mean share), averaged over layers. Minimum 1.

Nothing here is in peft (it has no gated multi-adapter layer over frozen adapters with a learned
router), hence the hand-written module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GRANULARITIES = ("token", "prompt", "layer")
# What a prompt gate reads (the family's table entry, ``gate_prompt_input``): the mean of the text
# tokens the denoiser attends to, or FLUX.1's pooled CLIP-L vector. Recorded in the MoL file, so a
# loader hands the gate the same tensor the trainer did.
PROMPT_INPUTS = ("context", "pooled")
GATE_KINDS = ("softmax", "softmax_n", "sigmoid", "scaled_softmax")
BALANCE_KINDS = ("mole", "switch", "none")
TEXT_ENCODER_PREFIX = "lora_te"  # kohya module names of text-encoder layers: lora_te_, lora_te1_, lora_te2_
NORM_EPS = 1e-6
SIGMOID_RANGE = 2.0  # a sigmoid gate's weights lie in (0, 2): 1 (the LoRA at full weight) at the start


def is_text_encoder_layer(layer_name: str) -> bool:
    return layer_name.startswith(TEXT_ENCODER_PREFIX)


def inverse_norm(u: torch.Tensor) -> torch.Tensor:
    """``1 / |u|`` over the last dimension, keepdim: the gate input normalisation."""
    # One fused reduction in float32 (no float copy of u).
    norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.reciprocal(norm.clamp_min(NORM_EPS)).to(u.dtype)


def prompt_embedding(context) -> torch.Tensor:
    """The prompt gate's input from the cross-attention context ``[B, T, D]`` (or an already pooled
    ``[B, D]``, or a list of ``[T_i, D]`` contexts of different lengths: Z-Image's real tokens in
    diffusers): the mean over tokens. ComfyUI repeats a shorter context to a common length when it
    batches conds; a mean is unchanged by that repetition."""
    if isinstance(context, (list, tuple)):
        return torch.stack([prompt_embedding(item.unsqueeze(0))[0] for item in context])
    if context.ndim == 3:
        return context.mean(dim=1)
    if context.ndim == 2:
        return context
    raise ValueError(f"prompt context: expected [B, T, D] or [B, D], got shape {tuple(context.shape)}")


def _check_mask(mask: torch.Tensor | None, device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.to(device=device, dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError("expert mask: every LoRA is switched off; keep at least one aspect enabled")
    return mask


def masked_bias(mask: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor | float:
    """0 for kept experts, -inf for masked ones (added to logits), checked to keep at least one."""
    mask = _check_mask(mask, reference.device)
    if mask is None:
        return 0.0
    zeros = torch.zeros(mask.shape, device=reference.device, dtype=reference.dtype)
    return zeros.masked_fill(~mask, float("-inf"))


def renormalise(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the masked experts' weights (last dim) and rescale the rest to sum to 1."""
    mask = _check_mask(mask, weights.device)
    if mask is None:
        return weights
    kept = weights * mask.to(weights.dtype)
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def activation_of(kind: str) -> str:
    """The function a gate kind applies to its logits: ``softmax`` or ``sigmoid``."""
    if kind not in GATE_KINDS:
        raise ValueError(f"gate kind {kind!r}: unknown; choose one of {', '.join(GATE_KINDS)}")
    return "sigmoid" if kind == "sigmoid" else "softmax"


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """softmax over the experts (last dim) or a sigmoid per expert, in float32."""
    if activation == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())


def hat_basis(noise_level: torch.Tensor, knots: int) -> torch.Tensor:
    """``[B, K]`` piecewise-linear hat functions of ``noise_level`` ``[B]`` (clamped to 0..1) at K
    evenly spaced knots: row b interpolates linearly between the two knots around its level."""
    position = noise_level.float().clamp(0.0, 1.0)[:, None] * (knots - 1)
    return (1.0 - (position - torch.arange(knots, device=position.device, dtype=position.dtype)).abs()).clamp_min(0.0)


# -- usage statistics and the balancing losses -----------------------------------------------------

class GateUsage:
    """Accumulates gate activations over one training step for the balancing loss.

    ``record`` keeps per-layer sums of each expert's share (differentiable), the sums of the raw
    activations (the trainer's prior) and top-1 counts (not differentiable).
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.share_sums: list[torch.Tensor] = []  # one [N] per recorded gate evaluation
        self.activation_sums: list[torch.Tensor] = []
        self.top1_counts: list[torch.Tensor] = []
        self.token_counts: list[int] = []
        self.layers: list[int | None] = []

    def record(self, activations: torch.Tensor, layer: int | None = None) -> None:
        flat = activations.reshape(-1, self.num_experts).float()
        shares = flat / flat.sum(-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        self.share_sums.append(shares.sum(0))
        self.activation_sums.append(flat.sum(0))
        self.top1_counts.append(torch.bincount(flat.argmax(-1), minlength=self.num_experts).to(flat.device))
        self.token_counts.append(flat.shape[0])
        self.layers.append(layer)

    def layer_totals(self) -> dict[int, tuple[torch.Tensor, int]]:
        """Detached (sum of activations ``[N]``, gate evaluations) per recorded layer: what several
        processes add up before taking the mean."""
        totals: dict[int, tuple[torch.Tensor, int]] = {}
        for layer, activation_sum, tokens in zip(self.layers, self.activation_sums, self.token_counts):
            if layer is None:
                continue
            total, count = totals.get(layer, (0, 0))
            totals[layer] = (total + activation_sum.detach(), count + tokens)
        return totals

    def layer_means(self) -> dict[int, torch.Tensor]:
        """Detached mean activation per expert for each recorded layer (for the trainer's prior)."""
        return {layer: total / count for layer, (total, count) in self.layer_totals().items()}

    def __len__(self) -> int:
        return len(self.share_sums)

    def _require(self) -> None:
        if not self.share_sums:
            raise ValueError("gate usage: nothing recorded; run a forward pass with the gate attached first")

    def mean_mass(self) -> torch.Tensor:
        """Mean share per expert over everything recorded: MoLE's ``q`` ([N], sums to 1)."""
        self._require()
        return torch.stack(self.share_sums).sum(0) / float(sum(self.token_counts))

    def mean_activation(self) -> torch.Tensor:
        """Mean activation per expert over everything recorded (softmax: equals ``mean_mass``)."""
        self._require()
        return torch.stack(self.activation_sums).sum(0).detach() / float(sum(self.token_counts))

    def mole_loss(self) -> torch.Tensor:
        """MoLE's gate balancing loss ``-log prod_i q_i`` (= ``-sum_i log q_i``)."""
        return -torch.log(self.mean_mass().clamp_min(1e-12)).sum()

    def switch_loss(self) -> torch.Tensor:
        """Switch-Transformer load balancing ``N * sum_i f_i * P_i`` per recorded layer, averaged."""
        self._require()
        losses = []
        for share_sum, counts, tokens in zip(self.share_sums, self.top1_counts, self.token_counts):
            fraction = counts.to(share_sum.dtype) / tokens
            mean_share = share_sum / tokens
            losses.append(self.num_experts * (fraction * mean_share).sum())
        return torch.stack(losses).mean()

    def loss(self, kind: str) -> torch.Tensor:
        if kind == "mole":
            return self.mole_loss()
        if kind == "switch":
            return self.switch_loss()
        if kind == "none":
            return torch.zeros((), device=self.share_sums[0].device if self.share_sums else None)
        raise ValueError(f"balance loss {kind!r}: unknown; choose one of {', '.join(BALANCE_KINDS)}")


# -- the gate ---------------------------------------------------------------------------------------

class MixtureGate(nn.Module):
    """One gate per adapted layer over ``experts`` (aspect names, in LoRA order).

    Parameters (these, and only these, are what the gate trainer updates and the MoL file stores):

    * ``token``: ``weight_<l>`` ``[N, in_features_l]`` per layer (a ParameterList, dims differ).
    * ``prompt``: ``weight`` ``[L, N, prompt_features]`` (all layers read the same embedding, so
      all gates come out of one einsum); text-encoder layers are masked to static gates.
    * ``layer``: no input weight.
    * ``bias`` ``[L, N]``, ``log_temperature`` ``[L]``; ``scaled_softmax``: ``log_scale`` ``[L, N]``;
      timestep gates: ``timestep_weight`` ``[L, N, K]``.
    * buffer ``prior`` ``[L, N]``: the mean activation over the training data, written by the
      trainer; what "bake" merges (times the kind's multiplier) when it has no input to evaluate the
      gate on.

    Weights start at zero, so an untrained gate is the uniform mixture: every LoRA at 1/N
    (``softmax``) or at full weight (every other kind).
    """

    def __init__(
        self,
        experts: Sequence[str],
        layers: Sequence[str],
        layer_in_features: Sequence[int],
        granularity: str,
        prompt_features: int | None = None,
        temperature: float = 1.0,
        *,
        kind: str = "softmax",
        timestep_knots: int = 0,
        timestep_range: float = 1000.0,
        prompt_input: str = "context",
    ):
        super().__init__()
        if prompt_input not in PROMPT_INPUTS:
            raise ValueError(f"prompt_input {prompt_input!r}: unknown; choose one of {', '.join(PROMPT_INPUTS)}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity {granularity!r}: unknown; choose one of {', '.join(GRANULARITIES)}")
        self.activation = activation_of(kind)
        if len(experts) < 1:
            raise ValueError("experts: a gate needs at least one LoRA")
        if len(set(experts)) != len(experts):
            raise ValueError(f"experts {list(experts)}: names must be unique (one LoRA per aspect)")
        if len(layers) != len(layer_in_features):
            raise ValueError(f"layers ({len(layers)}) and layer_in_features ({len(layer_in_features)}) differ in "
                             "length")
        if granularity == "prompt" and not prompt_features:
            raise ValueError("prompt_features: required for prompt gates (the text encoder's hidden size, 768 for "
                             "SD1.5)")
        if temperature <= 0:
            raise ValueError(f"temperature {temperature}: must be > 0")
        if timestep_knots == 1 or timestep_knots < 0:
            raise ValueError(f"timestep_knots {timestep_knots}: 0 (no timestep input) or >= 2 knots")
        if not timestep_range > 0:
            raise ValueError(f"timestep_range {timestep_range}: must be > 0 (the denoiser's timestep span, 1000 "
                             "for SD)")
        self.experts = tuple(experts)
        self.layers = tuple(layers)
        self.layer_in_features = tuple(int(d) for d in layer_in_features)
        self.granularity = granularity
        self.kind = kind
        self.timestep_knots = int(timestep_knots)
        self.timestep_range = float(timestep_range)
        self.prompt_input = prompt_input
        self.prompt_features = int(prompt_features) if prompt_features else None
        self.layer_index = {name: index for index, name in enumerate(self.layers)}
        n, count = len(self.experts), len(self.layers)
        static = torch.tensor([is_text_encoder_layer(name) for name in self.layers], dtype=torch.bool)
        if granularity == "token":
            self.weights = nn.ParameterList([nn.Parameter(torch.zeros(n, d)) for d in self.layer_in_features])
        elif granularity == "prompt":
            self.weight = nn.Parameter(torch.zeros(count, n, self.prompt_features))
            self.register_buffer("input_mask", (~static).float().view(count, 1, 1), persistent=False)
        self.bias = nn.Parameter(torch.zeros(count, n))
        self.log_temperature = nn.Parameter(torch.full((count,), math.log(temperature)))
        if kind == "scaled_softmax":
            self.log_scale = nn.Parameter(torch.zeros(count, n))
        if self.timestep_knots:
            self.timestep_weight = nn.Parameter(torch.zeros(count, n, self.timestep_knots))
            self.register_buffer("timestep_mask", (~static).float().view(count, 1, 1), persistent=False)
        initial = 1.0 / n if self.activation == "softmax" else 0.5
        self.register_buffer("prior", torch.full((count, n), initial))
        self.register_buffer("input_scale", torch.ones(count))  # token gates: logits = (V x) / input_scale + b
        self.calibrated = [False] * count  # set when input_scale was measured (or loaded)
        self.usage: GateUsage | None = None  # set by the trainer for a step; activations are recorded

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def per_sample(self) -> bool:
        """The gate is computed once per denoiser call for every layer (``[B, L, N]``), not per
        token: prompt and layer granularities."""
        return self.granularity != "token"

    @property
    def can_bake(self) -> bool:
        """Whether a one-off merge can represent the gate: not when it changes with the timestep."""
        return not self.timestep_knots

    def expert_mask(self, enabled: Sequence[str] | None) -> torch.Tensor | None:
        """Bool ``[N]`` from the aspect names to keep (None = all)."""
        if enabled is None:
            return None
        unknown = sorted(set(enabled) - set(self.experts))
        if unknown:
            raise ValueError(f"aspects {unknown}: not in this gate; it mixes {', '.join(self.experts)}")
        return torch.tensor([name in enabled for name in self.experts], dtype=torch.bool)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def multiplier(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[L, N]``: what the activations are multiplied by (see the module docstring): 1
        (softmax), the number of kept LoRAs (softmax_n), 2 (sigmoid), or that number times the
        learned scale (scaled_softmax)."""
        mask = _check_mask(mask, self.bias.device)
        kept = float(self.num_experts if mask is None else int(mask.sum()))
        ones = torch.ones_like(self.bias)
        if self.kind == "softmax":
            return ones
        if self.kind == "softmax_n":
            return ones * kept
        if self.kind == "sigmoid":
            return ones * SIGMOID_RANGE
        return self.log_scale.exp() * kept

    def gate_values(self, activations: torch.Tensor, layer: int | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Activations ``[..., N]`` (of one layer, or ``[..., L, N]`` of all) times the multiplier."""
        if self.kind == "softmax":
            return activations
        multiplier = self.multiplier(mask)
        multiplier = multiplier if layer is None else multiplier[layer]
        return activations * multiplier.to(activations.dtype)

    def _record(self, activations: torch.Tensor, layer: int) -> None:
        if self.usage is not None:
            self.usage.record(activations, layer)

    # timestep input ---------------------------------------------------------------------------
    def timestep_offsets(self, timestep: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Logit offsets ``[B, L, N]`` from the denoiser's timestep (``[B]``, a scalar, or None
        for gates without timestep input), zero on text-encoder layers."""
        if not self.timestep_knots:
            return None
        if timestep is None:
            raise ValueError("timestep gate: the denoiser was called without a timestep")
        timestep = torch.as_tensor(timestep, device=self.bias.device).float().reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        if timestep.numel() != batch:
            raise ValueError(f"timestep gate: {timestep.numel()} timesteps for a batch of {batch}")
        basis = hat_basis(timestep / self.timestep_range, self.timestep_knots)
        return torch.einsum("bk,lnk->bln", basis, self.timestep_weight * self.timestep_mask)

    # token gates ------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_input_scale(self, layer: int, hidden: torch.Tensor) -> None:
        """Set layer ``layer``'s ``input_scale`` to the mean L2 norm of ``hidden``'s tokens (once)."""
        norm = torch.linalg.vector_norm(hidden.float(), dim=-1).mean()
        self.input_scale[layer] = norm.clamp_min(NORM_EPS).to(self.input_scale.device)
        self.calibrated[layer] = True

    def token_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., N]`` of layer ``layer`` from its input ``hidden`` ``[..., in_features]``."""
        if self.granularity != "token":
            raise ValueError(f"token_logits: this is a {self.granularity} gate; use sample_gates")
        # clone: calibration writes other entries of the buffer during the same forward pass
        weight = (self.weights[layer] / self.input_scale[layer].clone()).to(hidden.dtype)
        return F.linear(hidden, weight, self.bias[layer].to(hidden.dtype))

    def token_gates(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                    offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Gate values ``[..., N]`` of layer ``layer`` per token of ``hidden`` ``[B, ..., in]``;
        ``offsets``: the per-sample timestep offsets ``[B, L, N]`` (``timestep_offsets``)."""
        logits = self.token_logits(layer, hidden)
        if offsets is not None:
            offset = offsets[:, layer]
            logits = logits + offset.view(offset.shape[0], *([1] * (logits.ndim - 2)), offset.shape[1]).to(logits.dtype)
        logits = logits / self.temperature()[layer].to(logits.dtype) + masked_bias(mask, logits)
        activations = activate(logits, self.activation).to(hidden.dtype)
        self._record(activations, layer)
        return self.gate_values(activations, layer, mask)

    # per-sample gates (prompt granularity, or layer granularity with a timestep input) ---------
    def sample_logits(self, context: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                      batch: int | None = None) -> torch.Tensor:
        """Logits ``[B, L, N]`` (before the temperature) for every layer from the cross-attention
        context (prompt granularity) and the timestep (timestep gates)."""
        if self.granularity == "token":
            raise ValueError("sample_logits: this is a token gate; use token_gates")
        if self.granularity == "prompt":
            if context is None:
                raise ValueError("prompt gate: no prompt context given")
            embedding = prompt_embedding(context)
            if embedding.shape[-1] != self.prompt_features:
                raise ValueError(
                    f"prompt context: hidden size {embedding.shape[-1]} but this gate was trained on "
                    f"{self.prompt_features}; the text encoder does not match the gate's base model"
                )
            u = embedding * inverse_norm(embedding)
            weight = (self.weight * self.input_mask).to(u.dtype)
            logits = torch.einsum("bd,lnd->bln", u, weight) + self.bias.to(u.dtype)
        else:
            if batch is None:
                batch = (context.shape[0] if context is not None
                         else torch.as_tensor(timestep).numel() if timestep is not None else 1)
            logits = self.bias.unsqueeze(0).expand(batch, -1, -1)
        offsets = self.timestep_offsets(timestep, logits.shape[0])
        return logits if offsets is None else logits + offsets.to(logits.dtype)

    def sample_gates(self, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     timestep: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
        """Gate values ``[B, L, N]`` for every layer, one row per sample."""
        logits = self.sample_logits(context, timestep, batch)
        logits = logits / self.temperature().to(logits.dtype).view(1, -1, 1) + masked_bias(mask, logits)
        activations = activate(logits, self.activation).to(logits.dtype)
        if self.usage is not None:
            for layer in range(activations.shape[1]):
                self.usage.record(activations[:, layer], layer)
        return self.gate_values(activations, None, mask)

    # static weights for merging -------------------------------------------------------------
    def prior_gates(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[L, N]`` the recorded mean activation as gate values (softmax kinds renormalised over
        the kept experts, masked sigmoid weights dropped)."""
        prior = self.prior.detach().clone()
        if self.activation == "softmax":
            prior = renormalise(prior, mask)
        elif mask is not None:
            prior = prior * _check_mask(mask, prior.device).to(prior.dtype)
        return self.gate_values(prior, None, mask).detach()

    def static_gates(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[L, N]`` the gate of the bias alone: the exact gate of layers with no input (text-encoder
        layers of a prompt gate, every layer of a layer gate without timestep input)."""
        logits = self.bias / self.temperature().view(-1, 1) + masked_bias(mask, self.bias)
        return self.gate_values(activate(logits, self.activation), None, mask)

    def merge_weights(self, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[L, N]`` weights for a one-off merge (bake). A layer gate: its exact static gates. A
        prompt gate with a ``context`` ``[1, T, D]``: the gate evaluated on that prompt (static
        layers: their bias gate). Otherwise the recorded training mean. A timestep gate cannot be
        merged once (``can_bake``)."""
        if not self.can_bake:
            raise ValueError("bake: this gate changes with the timestep, so no single merge represents it; "
                             "apply it dynamically")
        if self.granularity == "layer":
            return self.static_gates(mask).detach()
        if context is not None and self.granularity == "prompt":
            if prompt_embedding(context).shape[0] != 1:
                raise ValueError("bake: the prompt conditioning holds several prompts; give one prompt to bake")
            with torch.no_grad():
                return self.sample_gates(context.to(self.bias.device).float(), mask)[0]
        return self.prior_gates(mask)


# -- LoRA experts of one layer, and the mixed forward --------------------------------------------

@dataclass
class ExpertLoRA:
    """One LoRA's factors on one layer: ``delta W = scale * up @ down`` (kohya ``lora_up`` = B
    ``[out, r]``, ``lora_down`` = A ``[r, in]``, ``scale`` = alpha / r)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def stack_experts(
    experts: Sequence[ExpertLoRA | None], in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """All experts of a layer as one rank-sum LoRA: ``down`` ``[R, in]`` (A matrices stacked),
    ``up`` ``[out, R]`` (B matrices side by side, each pre-multiplied by its scale) and the ranks.
    An expert that does not adapt this layer (None) takes rank 0."""
    downs, ups, ranks = [], [], []
    for index, expert in enumerate(experts):
        if expert is None:
            ranks.append(0)
            continue
        down = expert.down.reshape(expert.down.shape[0], -1).float()
        up = expert.up.reshape(expert.up.shape[0], -1).float()
        if down.shape[1] != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"expert {index}: LoRA factors up {tuple(expert.up.shape)} / down {tuple(expert.down.shape)} do not "
                f"fit a layer of {in_features} -> {out_features} features; the LoRA was made for another base model"
            )
        downs.append(down)
        ups.append(up * float(expert.scale))
        ranks.append(down.shape[0])
    if not downs:
        raise ValueError("stack_experts: no expert adapts this layer")
    return torch.cat(downs, 0), torch.cat(ups, 1), tuple(ranks)


def expand_to_ranks(gates: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Gate values ``[..., N]`` -> ``[..., R]``: each expert's value repeated over its rank."""
    if len(set(ranks)) == 1:
        rank = ranks[0]
        return gates.unsqueeze(-1).expand(*gates.shape, rank).reshape(*gates.shape[:-1], len(ranks) * rank)
    repeats = torch.tensor(list(ranks), device=gates.device)
    return torch.repeat_interleave(gates, repeats, dim=-1)


def mixture_delta(
    hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ranks: Sequence[int], gates: torch.Tensor
) -> torch.Tensor:
    """``sum_i g_i s_i B_i A_i x`` with all A in one matmul, gate-scaled, all B in one matmul.
    ``gates`` broadcasts against ``hidden[..., :N]`` (``[..., N]`` per token, ``[B, 1, N]`` per
    sample). Differentiable in ``gates`` (the trainer's path)."""
    low = F.linear(hidden, down.to(hidden.dtype))
    low = low * expand_to_ranks(gates.to(hidden.dtype), ranks)
    return F.linear(low, up.to(hidden.dtype))


def reference_delta(hidden: torch.Tensor, experts: Sequence[ExpertLoRA | None], gates: torch.Tensor) -> torch.Tensor:
    """The plain per-expert loop ``sum_i g_i * s_i * B_i (A_i x)``: the definition the fused paths
    are tested against, and the "per-expert loop" in the benchmark."""
    out = None
    for index, expert in enumerate(experts):
        if expert is None:
            continue
        down = expert.down.reshape(expert.down.shape[0], -1).to(hidden.dtype)
        up = expert.up.reshape(expert.up.shape[0], -1).to(hidden.dtype)
        term = F.linear(F.linear(hidden, down), up) * (gates[..., index : index + 1].to(hidden.dtype) * expert.scale)
        out = term if out is None else out + term
    if out is None:
        raise ValueError("reference_delta: no expert adapts this layer")
    return out


class FusedGatedLoRA(nn.Module):
    """Inference form of one gated layer: the frozen experts plus (token granularity) the gate,
    in as few operations as possible (on a GPU each one costs a kernel launch, which at SD1.5 size
    costs more than its arithmetic):

    * token: the gate projection ``V / (input_scale * tau)`` is appended to the stacked A matrix, so
      one matmul gives both the rank-space activations and the gate's projection; ``b / tau`` (and
      -inf for masked experts) is added, plus the per-sample timestep offsets when the gate has them
      (``forward(..., logit_offsets=...)``, already divided by ``tau``), and the softmax (or sigmoid)
      taken in float32; gate-scale; one matmul with the stacked B (each LoRA's scale, the gate kind's
      multiplier and the global strength folded in); add to the base output.
    * per-sample gates (prompt granularity, timestep gates, fixed weights): ``forward(...,
      rank_gates=...)`` with gate values already expanded to rank space (``expand_gates``),
      computed once per UNet call.

    Callers use ``forward`` directly (not ``__call__``): module hooks are never needed here and
    ``nn.Module.__call__`` adds measurable overhead at 160 layers per step.

    The buffers are float32 masters and stay float32 (move the module with ``.to(device)``, never
    to another dtype). They follow the input's device on first use (low-VRAM / offload safe: moved,
    not copied); an input of another dtype (fp16 / bf16 sampling) is served by a copy cast once per
    (device, dtype) and cached until the masters move again, so a half-precision call never rounds
    the masters and a later float32 call is still exact.
    """

    def __init__(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        ranks: Sequence[int],
        *,
        gate_weight: torch.Tensor | None = None,
        gate_bias: torch.Tensor | None = None,
        temperature: float = 1.0,
        input_scale: float = 1.0,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        activation: str = "softmax",
        multiplier: torch.Tensor | None = None,
    ):
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation {activation!r}: softmax or sigmoid")
        self.ranks = tuple(int(r) for r in ranks)
        self.num_experts = len(self.ranks)
        self.rank_total = sum(self.ranks)
        self.out_features = int(up.shape[0])
        self.equal_ranks = len(set(self.ranks)) == 1
        self.has_token_gate = gate_weight is not None
        self.activation = activation
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}
        with torch.no_grad():
            if self.has_token_gate:
                inv_tau = 1.0 / float(temperature)
                bias = (gate_bias if gate_bias is not None else torch.zeros(self.num_experts)).float() * inv_tau
                bias = bias + masked_bias(mask, bias)
                down_and_gate = torch.cat([down.float(), gate_weight.float() * (inv_tau / float(input_scale))], dim=0)
                # [R + N]: zeros over the rank rows, so float32 inputs take the bias inside the one matmul
                self.register_buffer("bias", torch.cat([torch.zeros(self.rank_total), bias]))
            else:
                down_and_gate = down.float()
                self.bias = None
            up = up.float() * strength
            if multiplier is not None:  # the gate kind's per-expert factor, folded into B (exact: a constant)
                up = up * expand_to_ranks(multiplier.float().to(up.device), self.ranks)
            self.register_buffer("down_and_gate", down_and_gate.contiguous())
            self.register_buffer("up", up.contiguous())
            self.register_buffer("rank_index", torch.repeat_interleave(torch.arange(self.num_experts),
                                                                       torch.tensor(self.ranks)))

    def _apply(self, fn, recurse=True):
        self._cast.clear()  # the cast copies belong to the masters' old place
        result = super()._apply(fn, recurse)
        if self.up.dtype != torch.float32:
            raise TypeError(
                "FusedGatedLoRA keeps float32 factors; move it with .to(device) only (each call uses the input's dtype)"
            )
        return result

    def factors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(stacked A [+ gate projection], stacked B, the bias for float32 inputs) on ``like``'s
        device in its dtype."""
        key = (like.device, like.dtype)
        cached = self._cast.get(key)
        if cached is not None:
            return cached
        if self.up.device != like.device:
            self.to(like.device)  # the masters follow the input (clears the cache)
        if like.dtype == torch.float32:
            cached = (self.down_and_gate, self.up, self.bias)
        else:  # (no cast bias: forward adds the float32 one)
            cached = (self.down_and_gate.to(like.dtype), self.up.to(like.dtype), None)
        self._cast[key] = cached
        return cached

    def expand_gates(self, gates: torch.Tensor, ndim: int = 3) -> torch.Tensor:
        """Per-sample gates ``[B, N]`` -> ``[B, 1, …, R]`` broadcasting over an input of ``ndim`` dims."""
        expanded = gates.index_select(-1, self.rank_index.to(gates.device))
        return expanded.view(expanded.shape[0], *([1] * (ndim - 2)), expanded.shape[-1])

    def forward(self, hidden: torch.Tensor, base_out: torch.Tensor, rank_gates: torch.Tensor | None = None,
                logit_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``base_out + delta`` for ``hidden`` ``[..., in]``; ``rank_gates`` (``[B, 1.., R]``) is
        required unless this layer has a token gate; ``logit_offsets`` (``[B, 1.., N]``, float32,
        divided by the temperature) shift a token gate's logits per sample (timestep gates)."""
        return base_out + self.delta(hidden, rank_gates, logit_offsets)

    def delta(self, hidden: torch.Tensor, rank_gates: torch.Tensor | None = None,
              logit_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The gated mixture's delta alone (``forward`` without the base output)."""
        down_and_gate, up, bias = self.factors(hidden)
        # float32 inputs take a token gate's bias inside the one matmul (``factors``)
        h = F.linear(hidden, down_and_gate, bias)
        return F.linear(self.gated_low(h, rank_gates, logit_offsets, biased=bias is not None), up)

    def gated_low(self, h: torch.Tensor, rank_gates: torch.Tensor | None = None,
                  logit_offsets: torch.Tensor | None = None, *, biased: bool) -> torch.Tensor:
        """The gate-scaled rank-space activations from ``h`` = the input times ``down_and_gate``
        (``[..., R (+ N)]``; ``biased``: the bias of ``factors`` is already added): what the stacked
        B multiplies. Split out so that several row blocks of one fused weight (ComfyUI's q / k / v
        in one Linear) share one matmul for their A sides."""
        if self.has_token_gate:
            logits = h[..., self.rank_total :]
            if not biased:
                # The shared matmul runs in the input's dtype (a GPU GEMM accumulates in float32 and
                # rounds only its output, like every other activation of the layer); the bias, the
                # masking -inf and the softmax are float32 (the add promotes to float32).
                logits = logits + self.bias[self.rank_total :]
            if logit_offsets is not None:
                logits = logits + logit_offsets
            if self.activation == "softmax":
                g = torch.softmax(logits, dim=-1, dtype=torch.float32).to(h.dtype)
            else:
                g = torch.sigmoid(logits.float()).to(h.dtype)
            low = h[..., : self.rank_total]
            if self.equal_ranks:
                return (low.unflatten(-1, (self.num_experts, self.ranks[0])) * g.unsqueeze(-1)).flatten(-2)
            return low * g.index_select(-1, self.rank_index)
        if rank_gates is None:
            raise ValueError("FusedGatedLoRA: this layer has no token gate; pass per-sample rank_gates")
        return h * rank_gates.to(h.dtype)


def fused_layer(
    gate: MixtureGate | None,
    layer_name: str,
    experts: Sequence[ExpertLoRA | None],
    in_features: int,
    out_features: int,
    *,
    mask: torch.Tensor | None = None,
    strength: float = 1.0,
) -> FusedGatedLoRA:
    """Build the inference layer for ``layer_name``: with a token gate its projection and the gate
    kind's multiplier are folded in; otherwise (per-sample gates, fixed weights) the caller passes
    gate values at run time."""
    down, up, ranks = stack_experts(experts, in_features, out_features)
    if gate is not None and gate.granularity == "token":
        index = gate.layer_index[layer_name]
        multiplier = None if gate.kind == "softmax" else gate.multiplier(mask)[index].detach()
        return FusedGatedLoRA(
            down,
            up,
            ranks,
            gate_weight=gate.weights[index].detach(),
            gate_bias=gate.bias[index].detach(),
            temperature=float(gate.temperature()[index].detach()),
            input_scale=float(gate.input_scale[index]),
            mask=mask,
            strength=strength,
            activation=gate.activation,
            multiplier=multiplier,
        )
    return FusedGatedLoRA(down, up, ranks, strength=strength)


def timestep_logit_offsets(gate: MixtureGate, timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, L, N]`` float32 timestep offsets of a token gate divided by each layer's temperature:
    what ``FusedGatedLoRA.forward(logit_offsets=...)`` adds, computed once per denoiser call."""
    offsets = gate.timestep_offsets(timestep, batch)
    return (offsets / gate.temperature().view(1, -1, 1)).float()
