"""Mixture-of-LoRA gate (trainer/gate.py): fused paths against the per-expert loop, balancing
losses against hand-computed values, masking. Pure torch, no ComfyUI, runs in about a second."""

from __future__ import annotations

import math

import pytest
import torch

from versat2i.trainer.gate import (
    ExpertLoRA,
    GateUsage,
    MixtureGate,
    fused_layer,
    mixture_delta,
    reference_delta,
    renormalise,
    stack_experts,
)

IN, OUT, N = 24, 20, 4


def make_experts(ranks, generator, missing=()):
    experts = []
    for index, rank in enumerate(ranks):
        if index in missing:
            experts.append(None)
            continue
        down = torch.randn(rank, IN, generator=generator) * 0.1
        up = torch.randn(OUT, rank, generator=generator) * 0.1
        experts.append(ExpertLoRA(down=down, up=up, scale=(rank + 1) / rank))
    return experts


def random_token_gate(generator, layers=("lora_unet_a", "lora_unet_b"), temperature=0.7):
    gate = MixtureGate([f"aspect{i}" for i in range(N)], list(layers), [IN] * len(layers), "token",
                       temperature=temperature)
    with torch.no_grad():
        for weight in gate.weights:
            weight.copy_(torch.randn(weight.shape, generator=generator))
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=generator))
        gate.input_scale.copy_(torch.rand(gate.input_scale.shape, generator=generator) * 3 + 0.5)
    return gate


@pytest.mark.parametrize("ranks", [(4, 4, 4, 4), (2, 5, 3, 4)])
@pytest.mark.parametrize("missing", [(), (2,)])
def test_fused_token_layer_equals_per_expert_loop(ranks, missing):
    g = torch.Generator().manual_seed(0)
    experts = make_experts(ranks, g, missing)
    gate = random_token_gate(g)
    hidden = torch.randn(3, 7, IN, generator=g) * 5.0  # unnormalised: the gate must be scale-aware
    base = torch.randn(3, 7, OUT, generator=g)
    strength = 0.8

    layer = fused_layer(gate, "lora_unet_b", experts, IN, OUT, strength=strength)
    fused = layer(hidden, base)

    probabilities = gate.token_gates(1, hidden)
    reference = base + strength * reference_delta(hidden, experts, probabilities)
    assert (fused - reference).abs().max().item() <= 1e-5
    # and the training path (separate gate, stacked experts) agrees as well
    down, up, stacked_ranks = stack_experts(experts, IN, OUT)
    train_path = base + strength * mixture_delta(hidden, down, up, stacked_ranks, probabilities)
    assert (train_path - reference).abs().max().item() <= 1e-5
    # the delta is not trivially zero (the test could not pass on an identity layer)
    assert (fused - base).abs().max().item() > 1e-2


def test_fused_layer_with_per_sample_gates_equals_loop():
    g = torch.Generator().manual_seed(1)
    experts = make_experts((3, 3, 3, 3), g)
    hidden = torch.randn(2, 5, IN, generator=g)
    base = torch.randn(2, 5, OUT, generator=g)
    gates = torch.softmax(torch.randn(2, N, generator=g), -1)
    layer = fused_layer(None, "lora_unet_x", experts, IN, OUT)
    reference = base + reference_delta(hidden, experts, gates[:, None, :])
    assert (layer(hidden, base, layer.expand_gates(gates)) - reference).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="per-sample rank_gates"):
        layer(hidden, base)


def test_prompt_gate_is_per_sample_and_static_on_text_encoder_layers():
    g = torch.Generator().manual_seed(2)
    gate = MixtureGate(
        ["a", "b", "c"], ["lora_unet_x", "lora_te_text_model_encoder_layers_0_mlp_fc1"], [IN, IN], "prompt",
        prompt_features=16
    )
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))
    context = torch.randn(2, 9, 16, generator=g)
    probabilities = gate.sample_gates(context)
    assert probabilities.shape == (2, 2, 3)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2))
    assert (probabilities[0, 0] - probabilities[1, 0]).abs().max() > 1e-3  # UNet layer follows the prompt
    torch.testing.assert_close(probabilities[0, 1], probabilities[1, 1])  # text-encoder layer does not
    torch.testing.assert_close(probabilities[0, 1], gate.static_gates()[1])
    # the prompt embedding is the token mean: a context repeated to twice the length gives the same gate
    torch.testing.assert_close(gate.sample_gates(context.repeat(1, 2, 1)), probabilities)
    with pytest.raises(ValueError, match="hidden size"):
        gate.sample_gates(torch.randn(1, 9, 8))


def test_untrained_gate_is_uniform():
    gate = MixtureGate(["a", "b", "c", "d"], ["lora_unet_x"], [IN], "token")
    probabilities = gate.token_gates(0, torch.randn(5, IN))
    torch.testing.assert_close(probabilities, torch.full((5, 4), 0.25))


def test_masking_renormalises_the_rest():
    g = torch.Generator().manual_seed(3)
    gate = random_token_gate(g)
    hidden = torch.randn(6, IN, generator=g)
    mask = gate.expert_mask(["aspect0", "aspect2", "aspect3"])
    full = gate.token_gates(0, hidden)
    masked = gate.token_gates(0, hidden, mask)
    expected = full * mask
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=1e-5)
    assert masked[:, 1].abs().max().item() == 0.0

    # the fused layer with the same mask equals the loop over renormalised gates
    experts = make_experts((4, 4, 4, 4), g)
    base = torch.zeros(6, OUT)
    fused = fused_layer(gate, "lora_unet_a", experts, IN, OUT, mask=mask)(hidden, base)
    reference = reference_delta(hidden, experts, expected)
    assert (fused - reference).abs().max().item() <= 1e-5

    # static weights (prior) renormalise the same way
    with torch.no_grad():
        gate.prior.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    torch.testing.assert_close(gate.prior_gates(mask)[0], torch.tensor([0.1, 0.0, 0.3, 0.4]) / 0.8)
    torch.testing.assert_close(renormalise(torch.tensor([0.5, 0.5]), torch.tensor([False, True])), torch.tensor([0.0,
                                                                                                                 1.0]))

    with pytest.raises(ValueError, match="keep at least one"):
        gate.token_gates(0, hidden, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in this gate"):
        gate.expert_mask(["nope"])


def test_balancing_losses_match_hand_computed_values():
    usage = GateUsage(3)
    usage.record(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))  # layer 1, two tokens
    usage.record(torch.tensor([[0.2, 0.2, 0.6]]))  # layer 2, one token
    # q = column means over all three rows = (0.8, 1.1, 1.1) / 3
    expected_mole = -(math.log(0.8 / 3) + math.log(1.1 / 3) + math.log(1.1 / 3))
    assert usage.mole_loss().item() == pytest.approx(expected_mole, rel=1e-6)
    # switch: layer 1: top-1 fractions (1/2, 1/2, 0), mean probs (0.3, 0.45, 0.25) -> 3 * 0.375 = 1.125
    #         layer 2: fractions (0, 0, 1), mean probs (0.2, 0.2, 0.6) -> 3 * 0.6 = 1.8; mean 1.4625
    assert usage.switch_loss().item() == pytest.approx(1.4625, rel=1e-6)
    torch.testing.assert_close(usage.mean_mass(), torch.tensor([0.8, 1.1, 1.1]) / 3)

    uniform = GateUsage(4)
    uniform.record(torch.full((10, 4), 0.25))
    assert uniform.mole_loss().item() == pytest.approx(4 * math.log(4), rel=1e-6)  # the minimum, N log N
    assert uniform.switch_loss().item() == pytest.approx(1.0, rel=1e-6)  # the minimum, 1
    assert uniform.loss("none").item() == 0.0
    with pytest.raises(ValueError, match="unknown"):
        uniform.loss("entropy")


def test_balancing_loss_gradient_reaches_only_the_gate():
    g = torch.Generator().manual_seed(4)
    gate = random_token_gate(g)
    experts = make_experts((4, 4, 4, 4), g)
    down, up, ranks = stack_experts(experts, IN, OUT)
    gate.usage = GateUsage(N)
    hidden = torch.randn(8, IN, generator=g)
    probabilities = gate.token_gates(0, hidden)
    out = mixture_delta(hidden, down, up, ranks, probabilities)
    loss = out.pow(2).mean() + 0.1 * gate.usage.loss("mole")
    loss.backward()
    assert gate.weights[0].grad is not None and gate.weights[0].grad.abs().sum() > 0
    assert gate.bias.grad is not None and gate.log_temperature.grad is not None
    assert not down.requires_grad and not up.requires_grad  # frozen LoRAs


def test_stack_experts_rejects_mismatched_shapes():
    bad = [ExpertLoRA(down=torch.zeros(4, IN + 1), up=torch.zeros(OUT, 4), scale=1.0)]
    with pytest.raises(ValueError, match="another base model"):
        stack_experts(bad, IN, OUT)


def test_input_scale_calibration_normalises_logits():
    g = torch.Generator().manual_seed(5)
    gate = random_token_gate(g)
    hidden = torch.randn(4, 10, IN, generator=g) * 40.0  # a layer with large activations
    before = gate.token_logits(0, hidden)
    gate.calibrate_input_scale(0, hidden)
    assert gate.calibrated == [True, False]
    assert gate.input_scale[0].item() == pytest.approx(40.0 * IN**0.5, rel=0.1)  # mean L2 norm of the input
    after = gate.token_logits(0, hidden)
    assert after.abs().mean() < before.abs().mean() / 5  # logits back to the bias' scale
    # the fused layer folds the calibrated scale in: still equal to the loop
    experts = make_experts((4, 4, 4, 4), g)
    base = torch.zeros(4, 10, OUT)
    fused = fused_layer(gate, "lora_unet_a", experts, IN, OUT)(hidden, base)
    assert (fused - reference_delta(hidden, experts, gate.token_gates(0, hidden))).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_layer_in_half_precision_keeps_float32_masters(dtype):
    """A half-precision call is close to the float32 per-expert loop on the same inputs, and does
    not round the layer's factors: a float32 call afterwards is still exact."""
    g = torch.Generator().manual_seed(6)
    experts = make_experts((2, 4, 4, 8), g, missing=(1,))
    gate = random_token_gate(g)
    mask = gate.expert_mask(["aspect0", "aspect1", "aspect3"])
    hidden = torch.randn(3, 7, IN, generator=g) * 5.0
    base = torch.randn(3, 7, OUT, generator=g)
    strength = 0.8
    layer = fused_layer(gate, "lora_unet_b", experts, IN, OUT, mask=mask, strength=strength)
    masters = {name: buffer.clone() for name, buffer in layer.named_buffers()}

    def reference(x, b):
        return b + strength * reference_delta(x, experts, gate.token_gates(1, x, mask))

    low = layer(hidden.to(dtype), base.to(dtype))
    assert low.dtype == dtype
    exact = reference(hidden.to(dtype).float(), base.to(dtype).float())  # float32 loop, same rounded inputs
    error = (low.float() - exact).abs().max().item()
    # within two units of the output's last place (measured: 0.9 for bf16, 0.55 for fp16)
    assert error <= 2 * torch.finfo(dtype).eps * exact.abs().max().item(), error
    assert (exact - base.to(dtype).float()).abs().max().item() > 0.1  # a real delta, not an identity
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == masters[name].dtype and torch.equal(buffer, masters[name]), name

    assert (layer(hidden, base) - reference(hidden, base)).abs().max().item() <= 1e-5
    # the per-sample (prompt gate) path too
    per_sample = fused_layer(None, "lora_unet_x", experts, IN, OUT)
    gates = torch.softmax(torch.randn(3, N, generator=g), -1)
    per_sample(hidden.to(dtype), base.to(dtype), per_sample.expand_gates(gates.to(dtype)))
    expected = base + reference_delta(hidden, experts, gates[:, None, :])
    assert (per_sample(hidden, base, per_sample.expand_gates(gates)) - expected).abs().max().item() <= 1e-5
    with pytest.raises(TypeError, match="float32"):
        layer.to(torch.float16)


# -- gate kinds free to combine, layer gates, timestep input --------------------------------------------

KINDS = ("softmax", "softmax_n", "sigmoid", "scaled_softmax")


def random_gate(generator, granularity="token", kind="softmax", knots=0,
                layers=("lora_unet_a", "lora_unet_b", "lora_te_text_model_encoder_layers_0_mlp_fc1")):
    gate = MixtureGate([f"aspect{i}" for i in range(N)], list(layers), [IN] * len(layers), granularity,
                       prompt_features=16, temperature=0.8, kind=kind, timestep_knots=knots, timestep_range=1000.0)
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        gate.input_scale.copy_(torch.rand(gate.input_scale.shape, generator=generator) * 3 + 0.5)
    return gate


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_gates_sum_or_average_the_loras(kind):
    """softmax starts at the 1/N average; every other kind at each LoRA at full weight (the sum)."""
    gate = MixtureGate(["a", "b", "c", "d"], ["lora_unet_x"], [IN], "token", kind=kind)
    expected = 0.25 if kind == "softmax" else 1.0
    torch.testing.assert_close(gate.token_gates(0, torch.randn(5, IN)), torch.full((5, 4), expected))
    layer = MixtureGate(["a", "b", "c", "d"], ["lora_unet_x"], [IN], "layer", kind=kind)
    torch.testing.assert_close(layer.merge_weights(), torch.full((1, 4), expected))
    torch.testing.assert_close(layer.prior_gates(), torch.full((1, 4), expected))


def test_each_kind_turns_logits_into_weights_as_documented():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, IN, generator=g)
    for kind in KINDS:
        gate = random_gate(torch.Generator().manual_seed(8), kind=kind)
        logits = gate.token_logits(1, hidden) / gate.temperature()[1]
        softmax = torch.softmax(logits, -1)
        expected = {"softmax": softmax, "softmax_n": N * softmax, "sigmoid": 2 * torch.sigmoid(logits),
                    "scaled_softmax": N * softmax * gate.log_scale[1].exp() if kind == "scaled_softmax" else None}[kind]
        torch.testing.assert_close(gate.token_gates(1, hidden), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected.sum(-1), torch.full((6,), float(N)))  # the scale moved the total


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("knots", [0, 4])
def test_fused_token_layer_equals_the_loop_for_every_kind(kind, knots):
    """The inference layer (multiplier folded into B, timestep offsets added to the logits) equals
    the per-expert loop over the gate's values, masked or not."""
    g = torch.Generator().manual_seed(9)
    experts = make_experts((3, 3, 2, 4), g)
    gate = random_gate(g, kind=kind, knots=knots)
    hidden = torch.randn(2, 5, IN, generator=g) * 3.0
    base = torch.randn(2, 5, OUT, generator=g)
    timestep = torch.tensor([50.0, 930.0])
    offsets = gate.timestep_offsets(timestep, 2) if knots else None
    for mask in (None, gate.expert_mask(["aspect0", "aspect2", "aspect3"])):
        layer = fused_layer(gate, "lora_unet_b", experts, IN, OUT, mask=mask, strength=0.7)
        logit_offsets = None
        if knots:
            logit_offsets = (offsets[:, 1] / gate.temperature()[1]).view(2, 1, N)
        with torch.no_grad():
            fused = layer(hidden, base, logit_offsets=logit_offsets)
            reference = base + 0.7 * reference_delta(hidden, experts, gate.token_gates(1, hidden, mask, offsets))
        assert (fused - reference).abs().max().item() <= 1e-5
        assert (fused - base).abs().max().item() > 1e-2


def test_masking_keeps_each_kinds_meaning():
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(4, IN, generator=g)
    mask = torch.tensor([True, False, True, True])
    for kind in KINDS:
        gate = random_gate(torch.Generator().manual_seed(11), kind=kind)
        full, masked = gate.token_gates(0, hidden), gate.token_gates(0, hidden, mask)
        assert masked[:, 1].abs().max().item() == 0.0
        if kind == "sigmoid":  # independent weights: the others are unchanged
            torch.testing.assert_close(masked[:, mask], full[:, mask])
        else:  # the softmax renormalises over the kept; the N-scaled kinds scale by the kept count (3)
            activations = full / gate.multiplier()[0]
            kept = activations[:, mask] / activations[:, mask].sum(-1, keepdim=True)
            scale = 3.0 * gate.log_scale[0, mask].exp() if kind == "scaled_softmax" else {"softmax": 1.0}.get(kind, 3.0)
            torch.testing.assert_close(masked[:, mask], kept * scale, rtol=1e-5, atol=1e-6)
        # the recorded mean (what bake merges for a token gate) follows the same rule
        with torch.no_grad():
            gate.prior.copy_(torch.rand(gate.prior.shape, generator=g) * 0.5 + 0.1)
        prior = gate.prior_gates(mask)[0]
        assert prior[1] == 0.0
        if gate.activation == "softmax":
            torch.testing.assert_close(prior / gate.multiplier(mask)[0], renormalise(gate.prior[0], mask))


def test_hat_basis_interpolates_between_knots():
    from versat2i.trainer.gate import hat_basis

    basis = hat_basis(torch.tensor([0.0, 1 / 6, 1 / 3, 0.5, 1.0, 1.5]), 4)  # knots at 0, 1/3, 2/3, 1
    expected = torch.tensor([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1],
                             [0, 0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(basis, expected)


def test_timestep_gate_follows_the_noise_level_but_not_on_text_encoder_layers():
    g = torch.Generator().manual_seed(12)
    gate = random_gate(g, granularity="layer", kind="sigmoid", knots=3)
    gates = gate.sample_gates(timestep=torch.tensor([0.0, 500.0, 999.0]))
    assert gates.shape == (3, 3, N)
    assert (gates[0, 0] - gates[2, 0]).abs().max() > 1e-3  # a UNet layer changes with the timestep
    torch.testing.assert_close(gates[0, 2], gates[2, 2])  # the text-encoder layer does not
    torch.testing.assert_close(gates[0, 2], gate.static_gates()[2])
    # at a knot the offset is that knot's column: timestep 500 of 1000 is the middle knot
    logits = (gate.bias[0] + gate.timestep_weight[0, :, 1]) / gate.temperature()[0]
    torch.testing.assert_close(gates[1, 0], 2 * torch.sigmoid(logits))
    # no single merge represents it
    assert not gate.can_bake
    with pytest.raises(ValueError, match="changes with the timestep"):
        gate.merge_weights()
    with pytest.raises(ValueError, match="without a timestep"):
        gate.sample_gates()
    # a scalar timestep (a diffusers pipeline step) serves the whole batch
    torch.testing.assert_close(gate.sample_gates(timestep=torch.tensor(500.0), batch=2)[0], gates[1])


def test_layer_gate_without_timestep_bakes_exactly():
    g = torch.Generator().manual_seed(13)
    gate = random_gate(g, granularity="layer", kind="scaled_softmax")
    assert gate.can_bake and gate.per_sample
    weights = gate.merge_weights()
    torch.testing.assert_close(gate.sample_gates(batch=2)[1], weights)
    mask = gate.expert_mask(["aspect1", "aspect2"])
    torch.testing.assert_close(gate.merge_weights(mask=mask), gate.sample_gates(mask=mask, batch=1)[0])


def test_balancing_uses_shares_so_a_free_gate_keeps_its_scale():
    """Sigmoid activations of 0.8 / 0.2 and of 0.4 / 0.1 have the same shares, so the same balancing
    loss: the loss says nothing about how strong the LoRAs are, only how evenly they are used."""
    strong, weak = GateUsage(2), GateUsage(2)
    strong.record(torch.tensor([[0.8, 0.2]]), 0)
    weak.record(torch.tensor([[0.4, 0.1]]), 0)
    assert strong.mole_loss().item() == pytest.approx(weak.mole_loss().item())
    assert strong.mole_loss().item() == pytest.approx(-(math.log(0.8) + math.log(0.2)), rel=1e-6)
    torch.testing.assert_close(strong.mean_activation(), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(strong.layer_means()[0], torch.tensor([0.8, 0.2]))


def test_bad_gate_forms_are_refused():
    with pytest.raises(ValueError, match="gate kind 'max'"):
        MixtureGate(["a", "b"], ["lora_unet_x"], [IN], "token", kind="max")
    with pytest.raises(ValueError, match="timestep_knots 1"):
        MixtureGate(["a", "b"], ["lora_unet_x"], [IN], "token", timestep_knots=1)
    with pytest.raises(ValueError, match="granularity 'block'"):
        MixtureGate(["a", "b"], ["lora_unet_x"], [IN], "block")
