"""Gated Multi-LoRA Loader on the DiT families in a real ComfyUI 0.33 (in-process, CPU; skipped
without COMFYUI_PATH, and with the reason on a ComfyUI without the family).

Per family, a tiny random-weight model in ComfyUI's file layout (``tiny_models/dit.py``), loaded by
ComfyUI's own loader; LoRA files in the family's format (diffusers keys, written by the pack's own
``save_lora`` from peft adapters with random factors on every Linear the table's targets name, MLPs
included); a gate built over those layers by the trainer's code (``mixture_layers`` on the same
files) with random weights, saved as a MoL file. Each image is sampled two steps through
``comfy.sample.sample`` (KSampler's path) at cfg 1.

* **one expert, dynamic = stock**: with one LoRA the softmax gate is 1 everywhere, so the gated
  runtime delta (ComfyUI's fused q / k / v weights adapted per row block) must equal the stock
  LoraLoaderModelOnly, which merges the same LoRA into the weights: max |difference| <= 2e-5 of the
  largest latent value (float32 rounding of W x + B (A x) against (W + B A) x).
* **bake = dynamic for a prompt gate**: a prompt gate evaluated once on the prompt's conditioning and
  merged equals the gate evaluated at run time, same tolerance.
* **the base model is untouched**: after both, the base weights are bitwise the file's, the base
  patcher holds no patch, and the base model samples bitwise as before.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models.dit import MODELS, comfy_model_patcher, require_comfy_family
from tiny_models.mixture import write_mixture

pytestmark = [pytest.mark.comfy, pytest.mark.family]

NAMES = ["flux1-dev", "flux2-klein", "zimage"]
TOLERANCE = 2e-5
# (tiny_models/mixture.py's LoRA factors change the sampled latents by ~1e-2; the tests require > 1e-3,
# 50x the tolerance)
# (latent channels, latent side at 64 px, text width, pooled width) of the tiny models
LATENTS = {"flux1": (16, 8, 32, 32), "flux2_klein": (128, 4, 96, None), "zimage": (16, 8, 32, None)}


@pytest.fixture(scope="module")
def tiny_models(tiny_dits):
    return tiny_dits  # tests/conftest.py


def conditioning(name: str, seed: int = 3):
    """One prompt's CONDITIONING at the tiny widths (what CLIP Text Encode gives the family)."""
    generator = torch.Generator().manual_seed(seed)
    family = MODELS[name][0]
    _, _, width, pooled = LATENTS[family]
    extra = {"pooled_output": torch.randn(1, pooled, generator=generator)} if pooled else {}
    return [[torch.randn(1, 7, width, generator=generator), extra]]


def sample(model, name: str, positive, seed: int = 1):
    import comfy.sample

    channels, side, _, _ = LATENTS[MODELS[name][0]]
    latent = torch.zeros(1, channels, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", positive, positive, latent,
                               disable_pbar=True, seed=seed)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b| (at least 1)."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_gated_loader_on_a_dit(comfy, comfy_dirs, tiny_models, name):
    import comfy.model_management

    import nodes as comfy_nodes
    from versat2i.nodes.gated_multi_lora_loader import GatedMultiLoRALoader

    require_comfy_family(name)
    tiny = tiny_models(name)
    patcher = comfy_model_patcher(name, tiny)
    base_weights = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    positive = conditioning(name)
    base_before = sample(patcher, name, positive)
    loras_dir = comfy_dirs["models"] / "loras"

    # one expert: dynamic (a token gate, so every adapted Linear runs the gated path) = the stock loader
    mol_one, (lora_one,) = write_mixture(name, tiny, loras_dir, ["aesthetics"], "token")
    stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, lora_one, 1.0)[0]
    dynamic = GatedMultiLoRALoader.execute(patcher, mol_one, "dynamic", 1.0).result[0]
    with_stock, with_dynamic = sample(stock, name, positive), sample(dynamic, name, positive)
    assert close(with_stock, base_before) > 1e-3, "the LoRA does not change the output"
    error = close(with_dynamic, with_stock)
    print(f"{name}: one expert, dynamic vs stock LoraLoaderModelOnly: {error:.2e} (relative max)")
    assert error <= TOLERANCE
    # ComfyUI fuses q / k / v into one Linear: the LoRA's modules map onto fewer weights, each wrapped once
    import comfy.utils

    modules = {key.rsplit(".lora_", 1)[0] for key in comfy.utils.load_torch_file(
        str(comfy_dirs["models"] / "loras" / lora_one))}
    gated = {key[: -len(".forward")] for key in dynamic.object_patches}
    assert len(gated) == len(stock.patches) < len(modules)

    # a prompt gate over two LoRAs: bake on the prompt's conditioning = dynamic
    mol_two, _ = write_mixture(name, tiny, loras_dir, ["aesthetics", "lowlevel"], "prompt", kind="sigmoid", seed=1)
    dynamic = GatedMultiLoRALoader.execute(patcher, mol_two, "dynamic", 1.0).result[0]
    baked = GatedMultiLoRALoader.execute(patcher, mol_two, "bake", 1.0, conditioning=positive).result[0]
    with_dynamic, with_bake = sample(dynamic, name, positive), sample(baked, name, positive)
    assert close(with_dynamic, with_stock) > 1e-3  # the gate mixes: not the one-LoRA output
    error = close(with_bake, with_dynamic)
    print(f"{name}: prompt gate, bake vs dynamic: {error:.2e} (relative max)")
    assert error <= TOLERANCE
    # the gate reads the prompt: another prompt's bake differs
    other = GatedMultiLoRALoader.execute(patcher, mol_two, "bake", 1.0, conditioning=conditioning(name, 9)).result[0]
    assert close(sample(other, name, positive), with_bake) > 1e-4

    # the base model is untouched
    comfy.model_management.unload_all_models()
    assert not patcher.patches and not patcher.object_patches
    live = patcher.model.state_dict()
    assert [k for k in base_weights if not torch.equal(live[k], base_weights[k])] == []
    assert torch.equal(sample(patcher, name, positive), base_before)


@pytest.mark.slow
def test_gated_loader_on_fp8_base_weights(comfy, comfy_dirs, tiny_models):
    """klein with its weights stored in float8_e4m3fn, computed in float32 (ComfyUI's manual cast, as it
    runs fp8 files): ``bake`` merges as the stock loader does (ComfyUI patches the fp8 weights with the
    same seeded stochastic rounding), and ``dynamic`` adds its delta to ComfyUI's cast forward: it
    equals dynamic on a float32 model holding the same (fp8-rounded) weights."""
    import comfy.model_management

    import nodes as comfy_nodes
    from versat2i.nodes.gated_multi_lora_loader import GatedMultiLoRALoader

    name = "flux2-klein"
    require_comfy_family(name)
    tiny = tiny_models(name)
    fp8 = comfy_model_patcher(name, tiny, dtype=torch.float8_e4m3fn)
    weights = {k: v.clone() for k, v in fp8.model.diffusion_model.state_dict().items()}
    assert any(v.dtype == torch.float8_e4m3fn for v in weights.values())
    rounded = comfy_model_patcher(name, tiny)  # float32, then the fp8 values
    with torch.no_grad():
        for key, value in rounded.model.diffusion_model.state_dict().items():
            value.copy_(weights[key].float())
    positive = conditioning(name)
    mol_one, (lora_one,) = write_mixture(name, tiny, comfy_dirs["models"] / "loras", ["aesthetics"], "token")

    base = sample(fp8, name, positive)
    stock = sample(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(fp8, lora_one, 1.0)[0], name, positive)
    baked = sample(GatedMultiLoRALoader.execute(fp8, mol_one, "bake", 1.0).result[0], name, positive)
    dynamic = sample(GatedMultiLoRALoader.execute(fp8, mol_one, "dynamic", 1.0).result[0], name, positive)
    reference = sample(GatedMultiLoRALoader.execute(rounded, mol_one, "dynamic", 1.0).result[0], name, positive)
    comfy.model_management.unload_all_models()
    assert close(stock, base) > 1e-3
    print(f"fp8: bake vs stock {close(baked, stock):.2e}, dynamic vs dynamic on float32 copies "
          f"{close(dynamic, reference):.2e}, dynamic vs stock {close(dynamic, stock):.2e} (fp8 rounding of the merged "
          "weights)")
    assert close(baked, stock) <= TOLERANCE
    assert close(dynamic, reference) <= TOLERANCE
    # the fp8 base is untouched (compared as bytes: CPU torch has no fp8 comparison)
    assert all(torch.equal(v.view(torch.uint8), weights[k].view(torch.uint8)) if v.dtype == torch.float8_e4m3fn
               else torch.equal(v, weights[k]) for k, v in fp8.model.diffusion_model.state_dict().items())


@pytest.mark.parametrize("mode", ["bake", "dynamic"])
def test_low_vram_streaming_matches_full_load_on_a_dit(comfy, comfy_dirs, tiny_models, mode):
    """klein streamed layer by layer (low-VRAM loading: weights cast per layer, weight patches applied
    on the fly, each row block's patch on its rows) gives the full load's output, in both modes."""
    import comfy.model_management
    import comfy.utils

    from versat2i.nodes.gated_multi_lora_loader import GatedMultiLoRALoader
    from versat2i.nodes.model_patching import GatedForward

    name = "flux2-klein"
    require_comfy_family(name)
    tiny = tiny_models(name)
    patcher = comfy_model_patcher(name, tiny)
    mol, _ = write_mixture(name, tiny, comfy_dirs["models"] / "loras", ["aesthetics", "lowlevel"], "token",
                           kind="softmax_n")
    model = GatedMultiLoRALoader.execute(patcher, mol, mode, 1.0).result[0]
    gated = [key[: -len(".forward")] for key, patch in model.object_patches.items() if isinstance(patch, GatedForward)]
    assert bool(gated) == (mode == "dynamic")
    generator = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(1, 128, 4, 4, generator=generator), torch.tensor([0.6])
    context = conditioning(name)[0][0]

    def forward(lowvram_bytes):
        comfy.model_management.unload_all_models()
        model.patch_model(device_to=model.load_device, lowvram_model_memory=lowvram_bytes)
        try:
            state = {"lowvram": model.model.model_lowvram, "streamed": model.lowvram_patch_counter(),
                     "gated_cast": [comfy.utils.get_attr(model.model, path).comfy_cast_weights for path in gated]}
            with torch.no_grad():
                out = model.model.apply_model(x, sigma, c_crossattn=context,
                                              transformer_options={"wrappers": model.wrappers})
            return out, state
        finally:
            model.unpatch_model(model.offload_device)

    full, full_state = forward(0)
    streamed, streamed_state = forward(1)  # 1 byte: every layer streamed
    assert full_state["lowvram"] is False and streamed_state["lowvram"] is True
    if mode == "bake":  # one LowVramPatch per patched weight (a fused weight's row blocks share it)
        assert streamed_state["streamed"] == len(model.patches) > 0
    else:
        assert streamed_state["gated_cast"] and all(streamed_state["gated_cast"])
    assert close(streamed, full) <= TOLERANCE
    comfy.model_management.unload_all_models()
    with torch.no_grad():
        base = patcher.model.apply_model(x, sigma, c_crossattn=context)
    assert close(full, base) > 1e-3  # the mixture is in both


@pytest.mark.parametrize("name", ["flux1-dev", "zimage"])
def test_dynamic_mode_counts_the_shared_copy_of_fused_row_blocks_in_model_size(comfy, comfy_dirs, tiny_models, name):
    """ComfyUI budgets VRAM with ModelPatcher.model_size(). A fused weight's row blocks (q / k / v in
    one Linear; FLUX.1's linear1) share one stacked copy of their A sides, made on the first call:
    it counts there beside the factors (issue 13), exactly the bytes the call then holds; a whole
    weight (one block) makes no copy."""
    from versat2i.nodes.gated_multi_lora_loader import GatedMultiLoRALoader
    from versat2i.nodes.model_patching import GatedForward

    require_comfy_family(name)
    tiny = tiny_models(name)
    patcher = comfy_model_patcher(name, tiny)
    mol, _ = write_mixture(name, tiny, comfy_dirs["models"] / "loras", ["aesthetics", "lowlevel"], "token",
                           tag=f"size-{name}")
    model = GatedMultiLoRALoader.execute(patcher, mol, "dynamic", 1.0).result[0]
    forwards = [patch for patch in model.object_patches.values() if isinstance(patch, GatedForward)]
    factors = sum(b.numel() * b.element_size() for forward in forwards for fused, *_ in forward.parts
                  for b in fused.buffers())
    shared = sum(forward.row_blocks.shared_bytes() for forward in forwards)
    fused_weights = [forward for forward in forwards if len(forward.row_blocks.blocks) > 1]
    assert fused_weights and shared > 0, "no fused weight with several row blocks"
    assert model.model_size() == patcher.model_size() + factors + shared

    sample(model, name, conditioning(name))  # float32 on the CPU: the copies are made at that size
    made = 0
    for forward in forwards:
        down, biases, _, _ = forward.row_blocks._stacked
        own = [fused.down_and_gate for fused, _ in forward.row_blocks.blocks]
        if len(own) == 1:
            assert down is own[0], "a whole weight's A side was copied"
            continue
        made += down.numel() * down.element_size() + (biases.numel() * biases.element_size() if biases is not None
                                                      else 0)
    assert made == shared


@pytest.mark.parametrize("name", NAMES)
def test_no_mode_gives_comfyui_a_reason_to_leave_dynamic_vram(comfy, comfy_dirs, tiny_models, monkeypatch, name):
    """ComfyUI 0.33 samples with its dynamic-VRAM patcher (``ModelPatcherDynamic``) unless it asks for
    the old one: ``get_non_dynamic_delegate``, that is ``clone(disable_dynamic=True)``, which CFGGuider
    calls when the conditioning carries hooks; the dynamic patcher's hook-weight functions raise.
    What a CPU can show (there ``ModelPatcherDynamic`` reroutes to the old patcher;
    ``bench/dynamic_vram_check.py`` is the GPU check): every mode returns a clone of the patcher's
    own class holding no hook state, and neither the loader nor sampling its model asks for a
    non-dynamic clone."""
    import comfy.model_patcher
    import comfy.patcher_extension

    from versat2i.nodes.gated_multi_lora_loader import GatedMultiLoRALoader

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM (0.33 has)")
    require_comfy_family(name)
    tiny = tiny_models(name)
    patcher = comfy_model_patcher(name, tiny)
    positive = conditioning(name)
    mol, _ = write_mixture(name, tiny, comfy_dirs["models"] / "loras", ["aesthetics", "lowlevel"], "prompt",
                           kind="sigmoid", tag=f"dynamic-vram-{name}")
    non_dynamic_clones = []
    clone = comfy.model_patcher.ModelPatcher.clone

    def recording_clone(self, disable_dynamic=False, *args, **kwargs):
        if disable_dynamic:
            non_dynamic_clones.append(type(self).__name__)
        return clone(self, disable_dynamic, *args, **kwargs)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "clone", recording_clone)
    sampled_with = {}
    for mode in ("bake", "dynamic", "equal"):
        extra = {"conditioning": positive} if mode == "bake" else {}
        model = GatedMultiLoRALoader.execute(patcher, mol, mode, 1.0, **extra).result[0]
        assert type(model) is type(patcher), mode
        assert (model.hook_patches, model.forced_hooks, model.current_hooks) == ({}, None, None), mode
        assert model.patches or model.object_patches, f"{mode}: nothing applied"

        def outer_sample(executor, *args, mode=mode, **kwargs):
            guider = executor.class_obj  # its conditioning is set: what ComfyUI decided to sample with
            sampled_with[mode] = type(guider.model_patcher)
            return executor(*args, **kwargs)

        checked = model.clone()
        checked.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test", outer_sample)
        sample(checked, name, positive)
    assert non_dynamic_clones == []
    assert sampled_with == {mode: type(patcher) for mode in ("bake", "dynamic", "equal")}
