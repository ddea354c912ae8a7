"""Gated Multi-LoRA Loader in a real ComfyUI (in-process, CPU): a tiny SD1.5-architecture model,
four tiny kohya LoRAs and a MoL file, sampled two steps through ``comfy.sample`` (KSampler's
path). Skipped without COMFYUI_PATH. Offline; ~10 s on one thread."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from versat2i.aspects import ASPECTS

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def setup(comfy):
    from tiny_models.comfy import build_tiny_clip, build_tiny_sd15, encode

    model = build_tiny_sd15(seed=0)
    clip = build_tiny_clip(seed=0)
    return {
        "model": model,
        "clip": clip,
        "positive": encode(clip, "a photo of a cat"),
        "negative": encode(clip, ""),
    }


@pytest.fixture
def node(comfy):
    from versat2i.nodes.gated_multi_lora_loader import GatedMultiLoRALoader

    return GatedMultiLoRALoader


def sample(model, positive, negative, *, cfg=3.0, seed=1, steps=2):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
    )


def close(a, b, tol=2e-5):
    scale = max(a.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= tol * scale


def write_loras(setup, folder, *, with_clip=True, ranks=(4, 4, 4, 4), modules=None):
    """One tiny LoRA per aspect; ``modules`` maps an aspect index to the only layers its LoRA adapts."""
    from tiny_models.comfy import make_kohya_lora

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (aspect, rank) in enumerate(zip(ASPECTS, ranks)):
        lora = make_kohya_lora(setup["model"], setup["clip"] if with_clip else None, seed=10 + index, rank=rank,
                               alpha=rank / 2, modules=(modules or {}).get(index))
        path = folder / f"{aspect}.safetensors"
        save_file(lora, str(path))
        paths.append(path)
    return paths


def random_gate(setup, granularity, aspects=ASPECTS, seed=0, scale=2.0, with_clip=True, **form):
    from tiny_models.comfy import clip_lora_module_names, unet_lora_module_names

    from versat2i.trainer.gate import MixtureGate

    names = unet_lora_module_names(setup["model"])
    weights = dict(setup["model"].model.state_dict())
    if with_clip:
        names.update(clip_lora_module_names(setup["clip"]))
        weights.update(setup["clip"].cond_stage_model.state_dict())
    layers = sorted(names)
    in_features = [weights[names[layer]].shape[1] for layer in layers]
    gate = MixtureGate(list(aspects), layers, in_features, granularity, prompt_features=64, **form)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [p for n, p in gate.named_parameters() if "temperature" not in n]:
            parameter.copy_(torch.randn(parameter.shape, generator=g) * scale)
        gate.prior.copy_(torch.softmax(torch.randn(gate.prior.shape, generator=g), -1))
    return gate


def write_mol(setup, comfy_dirs, granularity, name="mix", *, with_clip=True, ranks=(4, 4, 4, 4), modules=None,
              **kwargs):
    from versat2i.trainer.mol_file import expert_record, save_mol

    folder = comfy_dirs["models"] / "loras" / "versat2i"
    paths = write_loras(setup, folder, with_clip=with_clip, ranks=ranks, modules=modules)
    gate = random_gate(setup, granularity, with_clip=with_clip, **kwargs)
    records = [expert_record(a, p, folder) for a, p in zip(ASPECTS, paths)]
    save_mol(folder / f"{name}.mol.safetensors", gate, records)
    return f"versat2i/{name}.mol.safetensors", gate, paths


def run_node(node, setup, mol_file, mode, **kwargs):
    result = node.execute(setup["model"], mol_file, mode, kwargs.pop("strength", 1.0), clip=setup["clip"], **kwargs)
    return result.result[0], result.result[1]


def base_snapshot(setup):
    """The base weights as built (a fresh model and CLIP from the same seeds), not read from the live
    ones, which an earlier test could have left holding merged weights; the live ones must match."""
    import comfy.model_management
    from tiny_models.comfy import build_tiny_clip, build_tiny_sd15

    model_sd = {k: v.clone() for k, v in build_tiny_sd15(seed=0).model.state_dict().items()}
    clip_sd = {k: v.clone() for k, v in build_tiny_clip(seed=0).cond_stage_model.state_dict().items()}
    comfy.model_management.unload_all_models()
    for module_tree, fresh in ((setup["model"].model, model_sd), (setup["clip"].cond_stage_model, clip_sd)):
        live = module_tree.state_dict()
        assert not [k for k in fresh if not torch.equal(live[k], fresh[k])], "an earlier test changed the base"
    return model_sd, clip_sd


def assert_base_untouched(setup, snapshot):
    import comfy.model_management

    from versat2i.nodes.model_patching import GatedForward

    comfy.model_management.unload_all_models()
    for module_tree, saved in ((setup["model"].model, snapshot[0]), (setup["clip"].cond_stage_model, snapshot[1])):
        current = module_tree.state_dict()
        assert current.keys() == saved.keys()
        changed = [k for k in saved if not torch.equal(current[k], saved[k])]
        assert not changed, f"base weights changed: {changed[:3]}"
        leftovers = [n for n, m in module_tree.named_modules() if isinstance(m.__dict__.get("forward"), GatedForward)]
        assert not leftovers, f"object patches left on the base model: {leftovers[:3]}"
    assert not setup["model"].object_patches and not setup["model"].patches


@pytest.mark.parametrize(
    ("granularity", "mode"),
    [("token", "bake"), ("token", "dynamic"), ("prompt", "bake"), ("prompt", "dynamic"), ("token", "equal"),
     ("token", "manual")],
)
def test_node_samples_and_leaves_the_base_untouched(setup, node, comfy_dirs, granularity, mode):
    mol_file, _, _ = write_mol(setup, comfy_dirs, granularity)
    snapshot = base_snapshot(setup)
    base_out = sample(setup["model"], setup["positive"], setup["negative"])

    model, clip = run_node(node, setup, mol_file, mode, loras="geometry = 2.0", disabled_aspects="lowlevel")
    from tiny_models.comfy import encode

    positive = encode(clip, "a photo of a cat")  # the CLIP's LoRA layers are mixed too
    assert not torch.equal(positive[0][0], setup["positive"][0][0])
    out = sample(model, positive, setup["negative"])
    assert out.shape == base_out.shape and torch.isfinite(out).all()
    assert not close(out, base_out, tol=1e-3)

    del model, clip
    assert_base_untouched(setup, snapshot)
    assert torch.equal(sample(setup["model"], setup["positive"], setup["negative"]), base_out)


def test_dynamic_with_one_lora_equals_stock_lora_loader(setup, comfy_dirs):
    import comfy.sd
    from tiny_models.comfy import make_kohya_lora

    from versat2i.nodes.model_patching import AspectLoRA, apply_mixture
    from versat2i.trainer.gate import MixtureGate

    lora = make_kohya_lora(setup["model"], setup["clip"], seed=3, rank=4, alpha=2.0)
    stock_model, stock_clip = comfy.sd.load_lora_for_models(setup["model"], setup["clip"], lora, 0.7, 0.7)
    gate = random_gate(setup, "token", aspects=("only",))  # softmax over one expert: fixed at 1
    model, clip = apply_mixture(
        setup["model"], setup["clip"], [AspectLoRA("only", "one.safetensors", lora)], mode="dynamic", gate=gate,
        strength=0.7
    )
    assert isinstance(gate, MixtureGate)
    from tiny_models.comfy import encode

    stock_positive, positive = encode(stock_clip, "a cat"), encode(clip, "a cat")
    assert close(positive[0][0], stock_positive[0][0])
    stock = sample(stock_model, stock_positive, setup["negative"])
    dynamic = sample(model, positive, setup["negative"])
    base = sample(setup["model"], setup["positive"], setup["negative"])
    assert close(dynamic, stock), (dynamic - stock).abs().max()
    assert not close(dynamic, base, tol=1e-3)


def test_bake_on_the_prompt_equals_dynamic_for_prompt_gates(setup, node, comfy_dirs):
    """The LoRAs adapt the text encoder: dynamic mode evaluates the gate on the context of the
    *mixed* CLIP, so bake must too (the node's prompt input)."""
    from tiny_models.comfy import encode

    mol_file, _, _ = write_mol(setup, comfy_dirs, "prompt", scale=3.0)
    text = "a photo of a cat"
    baked_model, baked_clip = run_node(node, setup, mol_file, "bake", prompt=text)
    dynamic_model, dynamic_clip = run_node(node, setup, mol_file, "dynamic")
    positive = encode(dynamic_clip, text)  # CLIP Text Encode on the node's CLIP output, as a workflow has it
    assert not close(positive[0][0], setup["positive"][0][0], tol=1e-3)  # the text-encoder LoRAs act
    # text-encoder layers: both modes merge the same static gate
    assert close(encode(baked_clip, text)[0][0], positive[0][0])
    # cfg 1: ComfyUI evaluates only the positive prompt, the one the bake is evaluated on
    baked = sample(baked_model, encode(baked_clip, text), setup["negative"], cfg=1.0)
    dynamic = sample(dynamic_model, positive, setup["negative"], cfg=1.0)
    assert close(baked, dynamic), (baked - dynamic).abs().max()
    # the conditioning input comes from the base CLIP upstream: another context, another gate
    from_base, _ = run_node(node, setup, mol_file, "bake", conditioning=setup["positive"])
    assert not close(sample(from_base, positive, setup["negative"], cfg=1.0), dynamic, tol=1e-4)
    # and baking on another prompt gives another model
    baked_other, _ = run_node(node, setup, mol_file, "bake", prompt="an oil painting of a mountain lake at dawn")
    assert not close(sample(baked_other, positive, setup["negative"], cfg=1.0), baked, tol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        run_node(node, setup, mol_file, "bake", prompt=text, conditioning=setup["positive"])
    with pytest.raises(ValueError, match="connect the CLIP"):
        node.execute(setup["model"], mol_file, "bake", 1.0, prompt=text)


def test_bake_on_a_conditioning_equals_dynamic_when_the_text_encoder_is_not_adapted(setup, node, comfy_dirs):
    mol_file, _, _ = write_mol(setup, comfy_dirs, "prompt", scale=3.0, with_clip=False)
    positive = setup["positive"]  # the base CLIP's: the same as the mixed one, which has no LoRA layers
    baked_model, _ = run_node(node, setup, mol_file, "bake", conditioning=positive)
    dynamic_model, _ = run_node(node, setup, mol_file, "dynamic")
    baked = sample(baked_model, positive, setup["negative"], cfg=1.0)
    dynamic = sample(dynamic_model, positive, setup["negative"], cfg=1.0)
    assert close(baked, dynamic), (baked - dynamic).abs().max()
    prompt_baked, _ = run_node(node, setup, mol_file, "bake", prompt="a photo of a cat")
    assert close(sample(prompt_baked, positive, setup["negative"], cfg=1.0), baked)


@pytest.mark.parametrize("mode", ["bake", "dynamic"])
def test_stock_lora_loader_before_and_after(setup, node, comfy_dirs, mode):
    import folder_paths
    from tiny_models.comfy import make_kohya_lora

    from nodes import LoraLoader  # ComfyUI's own node

    mol_file, _, _ = write_mol(setup, comfy_dirs, "token")
    save_file(make_kohya_lora(setup["model"], setup["clip"], seed=77, rank=2),
              str(comfy_dirs["models"] / "loras" / "extra.safetensors"))
    folder_paths.filename_list_cache.clear()
    stock = LoraLoader()

    gated_model, gated_clip = run_node(node, setup, mol_file, mode)
    after_model, after_clip = stock.load_lora(gated_model, gated_clip, "extra.safetensors", 0.8, 0.8)

    stocked_model, stocked_clip = stock.load_lora(setup["model"], setup["clip"], "extra.safetensors", 0.8, 0.8)
    before = node.execute(stocked_model, mol_file, mode, 1.0, clip=stocked_clip).result

    from tiny_models.comfy import encode

    outs = {}
    pairs = {"after": (after_model, after_clip), "before": before, "gated": (gated_model, gated_clip),
             "stock": (stocked_model, stocked_clip)}
    for name, (m, c) in pairs.items():
        outs[name] = sample(m, encode(c, "a photo of a cat"), setup["negative"])
    assert close(outs["after"], outs["before"]), (outs["after"] - outs["before"]).abs().max()
    assert not close(outs["after"], outs["gated"], tol=1e-3)  # the stock LoRA did apply
    assert not close(outs["after"], outs["stock"], tol=1e-3)  # and so did the mixture


def gated_modules(patcher):
    from versat2i.nodes.model_patching import GatedForward

    return {name[: -len(".forward")]: patch
            for name, patch in patcher.object_patches.items() if isinstance(patch, GatedForward)}


@pytest.mark.parametrize(("granularity", "mode"), [("token", "bake"), ("token", "dynamic"), ("prompt", "dynamic")])
def test_low_vram_streaming_matches_full_load(setup, node, comfy_dirs, granularity, mode):
    """Partial (low-VRAM) loading casts weights per layer and applies weight patches on the fly;
    the mixture must come out the same as with the model fully loaded."""
    import comfy.model_management
    import comfy.utils

    mol_file, _, _ = write_mol(setup, comfy_dirs, granularity)
    model, _ = run_node(node, setup, mol_file, mode)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    context = torch.cat([setup["positive"][0][0], setup["negative"][0][0]])
    gated = gated_modules(model)
    assert bool(gated) == (mode == "dynamic")

    def forward(patcher, lowvram_bytes):
        comfy.model_management.unload_all_models()
        patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=lowvram_bytes)
        try:
            state = {
                "lowvram": patcher.model.model_lowvram,
                "weight_patches_streamed": patcher.lowvram_patch_counter(),
                "gated_cast": [comfy.utils.get_attr(patcher.model, path).comfy_cast_weights for path in gated],
            }
            with torch.no_grad():  # the patcher's wrappers (the prompt gate's), as the sampler passes them
                out = patcher.model.apply_model(x, sigma, c_crossattn=context,
                                                transformer_options={"wrappers": patcher.wrappers})
            return out, state
        finally:
            patcher.unpatch_model(patcher.offload_device)

    full, full_state = forward(model, 0)
    streamed, streamed_state = forward(model, 1)  # 1 byte: every layer streamed
    assert full_state["lowvram"] is False and not any(full_state["gated_cast"])
    assert streamed_state["lowvram"] is True  # it did stream
    if mode == "bake":  # the merged mixture is applied per layer by LowVramPatch, one per patched weight
        assert streamed_state["weight_patches_streamed"] == len(model.patches) > 0
    else:  # the gated layers' own weights are cast per call; the object patches still add the mixture
        assert streamed_state["gated_cast"] and all(streamed_state["gated_cast"])
    assert model.model.model_lowvram is False  # unpatched again
    assert close(full, streamed), (full - streamed).abs().max()
    comfy.model_management.unload_all_models()
    with torch.no_grad():
        base = setup["model"].model.apply_model(x, sigma, c_crossattn=context)
    assert not close(full, base, tol=1e-3)  # the mixture is in both


@pytest.mark.parametrize("granularity", ["token", "prompt"])
def test_dynamic_factors_count_in_comfyui_memory_estimate(setup, node, comfy_dirs, granularity):
    """ComfyUI budgets VRAM with ModelPatcher.model_size(); the gated layers' factors move to the
    load device with the model, so they count there (and in clones, e.g. a stock LoRA after)."""
    import folder_paths
    from tiny_models.comfy import make_kohya_lora

    from nodes import LoraLoader

    mol_file, _, _ = write_mol(setup, comfy_dirs, granularity)
    model, clip = run_node(node, setup, mol_file, "dynamic")
    for patcher, base in ((model, setup["model"]), (clip.patcher, setup["clip"].patcher)):
        factors = sum(b.numel() * b.element_size()
                      for patch in gated_modules(patcher).values() for fused, *_ in patch.parts
                      for b in fused.buffers())
        if patcher is clip.patcher and granularity == "prompt":
            assert factors == 0  # text-encoder layers are merged (static gates)
        else:
            assert factors > 0
        assert patcher.model_size() == base.model_size() + factors
    save_file(make_kohya_lora(setup["model"], setup["clip"], seed=77, rank=2),
              str(comfy_dirs["models"] / "loras" / "extra.safetensors"))
    folder_paths.filename_list_cache.clear()
    after, _ = LoraLoader().load_lora(model, clip, "extra.safetensors", 0.8, 0.8)
    assert after.model_size() == model.model_size()


def test_changed_lora_is_refused_by_the_node(setup, node, comfy_dirs):
    from tiny_models.comfy import make_kohya_lora

    from versat2i.trainer.mol_file import LoRAHashMismatchError

    mol_file, _, paths = write_mol(setup, comfy_dirs, "token")
    save_file(make_kohya_lora(setup["model"], setup["clip"], seed=999), str(paths[2]))
    with pytest.raises(LoRAHashMismatchError, match="geometry"):
        run_node(node, setup, mol_file, "bake")


def damage(path, kind: str) -> None:
    """Truncate, empty or replace with a pickle (never run: safetensors loading refuses it)."""
    import pickle

    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "pickled": pickle.dumps({"lora_unet_x.lora_down.weight": torch.zeros(2)})}[kind])


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickled"])
def test_a_damaged_mol_or_lora_file_is_one_error_naming_it(setup, node, comfy_dirs, kind):
    """Before, safetensors' own error came up without the file's name (issue 15)."""
    import folder_paths

    mol_file, _, paths = write_mol(setup, comfy_dirs, "token", name=f"mix_{kind}")
    mol_path = comfy_dirs["models"] / "loras" / mol_file
    damage(mol_path, kind)
    with pytest.raises(ValueError, match=f"MoL file {str(mol_path.resolve())!r}: cannot be read|"
                                         f"MoL file {str(mol_path)!r}: cannot be read"):
        run_node(node, setup, mol_file, "bake")
    damage(paths[1], kind)  # a LoRA of the manual list
    folder_paths.filename_list_cache.clear()
    with pytest.raises(ValueError) as info:
        node.execute(setup["model"], "none (use the LoRA list)", "equal", 1.0,
                     loras="versat2i/aesthetics.safetensors\nversat2i/alignment.safetensors")
    message = str(info.value)
    assert message.startswith("LoRA file ") and "alignment.safetensors" in message and "cannot be read" in message \
        or "holds no tensors" in message, message


def test_lora_for_another_architecture_is_a_clear_error(setup, comfy):
    from tiny_models.comfy import TINY_UNET_CONFIG, build_tiny_sd15, make_kohya_lora

    from versat2i.nodes.model_patching import AspectLoRA, apply_mixture

    wider = build_tiny_sd15(seed=1, unet_config={**TINY_UNET_CONFIG, "model_channels": 64})
    foreign = make_kohya_lora(wider, None, seed=5)
    with pytest.raises(ValueError, match="another base model"):
        apply_mixture(setup["model"], None, [AspectLoRA("a", "wide.safetensors", foreign)], mode="equal")
    garbage = {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="does not fit this model"):
        apply_mixture(setup["model"], None, [AspectLoRA("a", "junk.safetensors", garbage)], mode="equal")


def test_lora_key_for_a_weight_the_model_lacks_is_a_clear_error(setup, comfy, monkeypatch):
    """A key map entry naming a weight the loaded model does not have (a pruned checkpoint, a key
    map written for a sibling architecture) must not drop the LoRA's layer silently."""
    import comfy.lora
    from tiny_models.comfy import make_kohya_lora

    from versat2i.nodes.model_patching import AspectLoRA, apply_mixture

    real = comfy.lora.model_lora_keys_unet

    def with_ghost(model, key_map):
        key_map = real(model, key_map)
        key_map["lora_unet_ghost_layer"] = "diffusion_model.ghost_layer.weight"
        return key_map

    monkeypatch.setattr(comfy.lora, "model_lora_keys_unet", with_ghost)
    lora = make_kohya_lora(setup["model"], None, seed=4)
    lora.update({"lora_unet_ghost_layer.lora_down.weight": torch.zeros(4, 8),
                 "lora_unet_ghost_layer.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match="does not have") as excinfo:
        apply_mixture(setup["model"], None, [AspectLoRA("a", "ghost.safetensors", lora)], mode="equal")
    assert "'ghost.safetensors'" in str(excinfo.value) and "lora_unet_ghost_layer" in str(excinfo.value)

    # text-encoder layers while no CLIP is connected are skipped on purpose
    monkeypatch.setattr(comfy.lora, "model_lora_keys_unet", real)
    with_text_encoder = make_kohya_lora(setup["model"], setup["clip"], seed=4)
    unet_only = {k: v for k, v in with_text_encoder.items() if k.startswith("lora_unet_")}
    assert len(with_text_encoder) > len(unet_only)
    model, clip = apply_mixture(setup["model"], None, [AspectLoRA("a", "te.safetensors", with_text_encoder)],
                                mode="equal")
    reference, _ = apply_mixture(setup["model"], None, [AspectLoRA("a", "unet.safetensors", unet_only)], mode="equal")
    assert clip is None
    assert close(sample(model, setup["positive"], setup["negative"]),
                 sample(reference, setup["positive"], setup["negative"]))


def test_fingerprint_follows_the_files_on_disk(setup, node, comfy_dirs):
    """ComfyUI reuses a node's last output while its fingerprint is unchanged: swapping a LoRA or
    the MoL file on disk (same name, even same size and mtime) must change it, so the node runs
    again and the sha256 check refuses the swapped LoRA."""
    import math
    import os

    from tiny_models.comfy import make_kohya_lora

    from versat2i.trainer.mol_file import LoRAHashMismatchError, expert_record, save_mol

    mol_file, gate, paths = write_mol(setup, comfy_dirs, "token")
    fingerprint = node.fingerprint_inputs(mol_file=mol_file, mode="bake", strength=1.0)
    assert isinstance(fingerprint, tuple) and len(fingerprint) == 1 + len(ASPECTS)
    assert node.fingerprint_inputs(mol_file=mol_file, mode="bake", strength=1.0) == fingerprint  # stable
    run_node(node, setup, mol_file, "bake")

    target = paths[2]
    before = target.stat()
    swapped = target.with_name("swapped.tmp")
    save_file(make_kohya_lora(setup["model"], setup["clip"], seed=999, rank=4, alpha=2.0), str(swapped))
    assert swapped.stat().st_size == before.st_size
    os.replace(swapped, target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert node.fingerprint_inputs(mol_file=mol_file, mode="bake", strength=1.0) != fingerprint
    with pytest.raises(LoRAHashMismatchError, match="geometry"):
        run_node(node, setup, mol_file, "bake")

    # a retrained MoL file under the same name
    folder = target.parent
    save_mol(folder / "mix.mol.safetensors", gate, [expert_record(a, p, folder) for a, p in zip(ASPECTS, paths)],
             overwrite=True)
    refreshed = node.fingerprint_inputs(mol_file=mol_file, mode="bake", strength=1.0)
    assert refreshed[0] != fingerprint[0]
    # the LoRA list without a gate: its files
    listed = node.fingerprint_inputs(mol_file="none (use the LoRA list)", mode="equal",
                                     loras="versat2i/aesthetics.safetensors\nversat2i/geometry.safetensors")
    assert [entry[0] for entry in listed] == [str(paths[0].resolve()), str(paths[2].resolve())]
    # a bad input: run again, so that execute reports it
    assert math.isnan(node.fingerprint_inputs(mol_file="versat2i/missing.mol.safetensors", mode="bake"))


def loop_reference_patches(patcher, names, loras, gate, *, strength=1.0):
    """Object patches with the plain per-expert loop (MixtureGate.token_gates, then
    reference_delta): the definition the fused dynamic path must match. ``names`` maps kohya
    module names to the patcher's weight keys (only those present are patched)."""
    from versat2i.trainer.gate import ExpertLoRA, reference_delta

    class LoopForward:
        def __init__(self, previous, layer, experts, channels_first):
            self.previous, self.layer, self.experts, self.channels_first = previous, layer, experts, channels_first

        def __call__(self, x, *args, **kwargs):
            out = self.previous(x, *args, **kwargs)
            h, o = (x.movedim(1, -1), out.movedim(1, -1)) if self.channels_first else (x, out)
            o = o + strength * reference_delta(h, self.experts, gate.token_gates(self.layer, h))
            return o.movedim(-1, 1) if self.channels_first else o

    for name, key in names.items():
        experts = []
        for lora in loras:
            if f"{name}.lora_down.weight" not in lora:
                experts.append(None)
                continue
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            experts.append(ExpertLoRA(down=down, up=up, scale=float(lora[f"{name}.alpha"]) / down.shape[0]))
        path = key[: -len(".weight")] + ".forward"
        module = patcher.get_model_object(key[: -len(".weight")])
        patcher.add_object_patch(path, LoopForward(patcher.get_model_object(path), gate.layer_index[name], experts,
                                                   isinstance(module, torch.nn.Conv2d)))


def test_unequal_ranks_and_partial_coverage_match_references(setup, node, comfy_dirs):
    """Ranks 2, 4, 4, 8, the geometry LoRA skipping every attn1 layer and the text encoder's MLPs:
    dynamic (token gate) against the per-expert loop, bake against ComfyUI's own LoRA patches
    weighted by the recorded mean gate per layer."""
    import comfy.lora
    from comfy.utils import load_torch_file
    from tiny_models.comfy import clip_lora_module_names, encode, unet_lora_module_names

    names = {**unet_lora_module_names(setup["model"]), **clip_lora_module_names(setup["clip"])}
    partial = sorted(n for n in names if "attn1" not in n and "mlp" not in n)
    assert 0 < len(partial) < len(names)
    strength = 0.9
    mol_file, gate, paths = write_mol(setup, comfy_dirs, "token", ranks=(2, 4, 4, 8), modules={2: partial})
    loras = [load_torch_file(str(p)) for p in paths]
    assert {loras[2][f"{n}.lora_down.weight"].shape[0] for n in partial} == {4}
    gate = gate.eval()
    text = "a photo of a cat"

    # dynamic vs the per-expert loop
    model, clip = run_node(node, setup, mol_file, "dynamic", strength=strength)
    ref_model, ref_clip = setup["model"].clone(), setup["clip"].clone()
    unet_names = unet_lora_module_names(setup["model"])
    loop_reference_patches(ref_model, unet_names, loras, gate, strength=strength)
    loop_reference_patches(ref_clip.patcher, clip_lora_module_names(setup["clip"]), loras, gate, strength=strength)
    with torch.no_grad():
        positive, ref_positive = encode(clip, text), encode(ref_clip, text)
        assert close(positive[0][0], ref_positive[0][0]), (positive[0][0] - ref_positive[0][0]).abs().max()
        dynamic = sample(model, positive, setup["negative"])
        reference = sample(ref_model, ref_positive, setup["negative"])
    assert close(dynamic, reference), (dynamic - reference).abs().max()
    assert not close(dynamic, sample(setup["model"], setup["positive"], setup["negative"]), tol=1e-3)

    # bake vs stock LoRA patches, one per (LoRA, layer) at strength prior[layer, i] * strength
    baked_model, baked_clip = run_node(node, setup, mol_file, "bake", strength=strength)
    stock_model, stock_clip = setup["model"].clone(), setup["clip"].clone()
    key_map = comfy.lora.model_lora_keys_clip(setup["clip"].cond_stage_model,
                                              comfy.lora.model_lora_keys_unet(setup["model"].model, {}))
    clip_keys = set(clip_lora_module_names(setup["clip"]).values())
    for index, lora in enumerate(loras):
        for key, adapter in comfy.lora.load_lora(lora, key_map, log_missing=False).items():
            name = next(n for n, k in names.items() if k == key)
            weight = float(gate.prior[gate.layer_index[name], index]) * strength
            (stock_clip if key in clip_keys else stock_model).add_patches({key: adapter}, weight)
    baked = sample(baked_model, encode(baked_clip, text), setup["negative"])
    stock = sample(stock_model, encode(stock_clip, text), setup["negative"])
    assert close(baked, stock), (baked - stock).abs().max()


class TimestepReference:
    """A DIFFUSION_MODEL wrapper that records each UNet call's timesteps and context, so the reference
    layers below can evaluate the gate the slow way (``MixtureGate`` itself, per layer)."""

    def __init__(self):
        self.timesteps = self.context = None

    def to(self, *args, **kwargs):
        return self

    def __call__(self, executor, x, timesteps=None, context=None, *args, **kwargs):
        self.timesteps, self.context = timesteps, context
        return executor(x, timesteps, context, *args, **kwargs)


def gate_reference_patches(patcher, names, loras, gate, call, *, strength=1.0, on_clip=False):
    """Object patches that compute each layer's gate with ``MixtureGate`` (token_gates with the
    timestep offsets, or sample_gates from the recorded context and timesteps; text-encoder layers
    of per-sample gates: static_gates) and the per-expert loop ``reference_delta``."""
    from versat2i.trainer.gate import ExpertLoRA, reference_delta

    class ReferenceForward:
        def __init__(self, previous, layer, experts, channels_first):
            self.previous, self.layer, self.experts, self.channels_first = previous, layer, experts, channels_first

        def __call__(self, x, *args, **kwargs):
            out = self.previous(x, *args, **kwargs)
            h, o = (x.movedim(1, -1), out.movedim(1, -1)) if self.channels_first else (x, out)
            if gate.granularity == "token":
                offsets = None if on_clip else gate.timestep_offsets(call.timesteps, h.shape[0])
                gates = gate.token_gates(self.layer, h, offsets=offsets)
            elif on_clip:
                gates = gate.static_gates()[self.layer]
            else:
                gates = gate.sample_gates(call.context.float(), timestep=call.timesteps, batch=h.shape[0])[:,
                                                                                                           self.layer]
                gates = gates.view(gates.shape[0], *([1] * (h.ndim - 2)), gates.shape[-1])
            o = o + strength * reference_delta(h, self.experts, gates)
            return o.movedim(-1, 1) if self.channels_first else o

    for name, key in names.items():
        experts = []
        for lora in loras:
            down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
            experts.append(ExpertLoRA(down=down, up=up, scale=float(lora[f"{name}.alpha"]) / down.shape[0]))
        path = key[: -len(".weight")] + ".forward"
        module = patcher.get_model_object(key[: -len(".weight")])
        patcher.add_object_patch(path, ReferenceForward(patcher.get_model_object(path), gate.layer_index[name], experts,
                                                        isinstance(module, torch.nn.Conv2d)))


@pytest.mark.parametrize(("granularity", "form"), [
    ("token", {"kind": "softmax_n", "timestep_knots": 3}),
    ("prompt", {"kind": "scaled_softmax", "timestep_knots": 4}),
    ("layer", {"kind": "sigmoid", "timestep_knots": 4}),
])
def test_free_and_timestep_gates_in_dynamic_mode_match_the_gate_evaluated_per_step(setup, node, comfy_dirs,
                                                                                    granularity, form, caplog):
    """Gates free to combine (weights not summing to 1) that read the timestep ComfyUI passes the
    UNet: the fused dynamic path against the gate evaluated layer by layer; asked to bake, the node
    applies such a gate dynamically (no single merge represents it) and says so."""
    import comfy.patcher_extension
    from comfy.utils import load_torch_file
    from tiny_models.comfy import clip_lora_module_names, encode, unet_lora_module_names

    mol_file, gate, paths = write_mol(setup, comfy_dirs, granularity, scale=1.0, **form)
    loras = [load_torch_file(str(p)) for p in paths]
    gate = gate.eval()
    text = "a photo of a cat"
    # Strength 0.25: these kinds weigh the four random LoRAs up to 4x as much as a softmax does, and at
    # that size the random tiny model amplifies float32 rounding (measured: 0.3 % of the output apart
    # after one step at strength 0.8, with every gated layer equal to the reference within 2e-7).
    strength = 0.25
    model, clip = run_node(node, setup, mol_file, "dynamic", strength=strength)
    call = TimestepReference()
    ref_model, ref_clip = setup["model"].clone(), setup["clip"].clone()
    ref_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "reference", call)
    gate_reference_patches(ref_model, unet_lora_module_names(setup["model"]), loras, gate, call, strength=strength)
    gate_reference_patches(ref_clip.patcher, clip_lora_module_names(setup["clip"]), loras, gate, call,
                           strength=strength, on_clip=True)
    with torch.no_grad():
        positive, ref_positive = encode(clip, text), encode(ref_clip, text)
        assert close(positive[0][0], ref_positive[0][0])
        dynamic = sample(model, positive, setup["negative"], steps=3)
        reference = sample(ref_model, ref_positive, setup["negative"], steps=3)
        assert close(dynamic, reference), (dynamic - reference).abs().max()
        # a real mixture, not an identity
        assert not close(dynamic, sample(setup["model"], setup["positive"], setup["negative"], steps=3), tol=1e-3)
        with caplog.at_level("WARNING"):
            baked_model, baked_clip = run_node(node, setup, mol_file, "bake", strength=strength)
        assert "changes with the timestep" in caplog.text
        baked = sample(baked_model, encode(baked_clip, text), setup["negative"], steps=3)
    assert close(baked, dynamic)


def test_a_layer_gate_bakes_exactly(setup, node, comfy_dirs):
    """A layer gate without timestep input reads nothing at run time: bake merges exactly the weights
    dynamic mode uses (which merges them too), whatever the prompt."""
    from tiny_models.comfy import encode

    mol_file, gate, _ = write_mol(setup, comfy_dirs, "layer", scale=1.5, kind="scaled_softmax")
    baked_model, baked_clip = run_node(node, setup, mol_file, "bake", disabled_aspects="geometry")
    dynamic_model, dynamic_clip = run_node(node, setup, mol_file, "dynamic", disabled_aspects="geometry")
    text = "a photo of a cat"
    baked = sample(baked_model, encode(baked_clip, text), setup["negative"])
    dynamic = sample(dynamic_model, encode(dynamic_clip, text), setup["negative"])
    assert close(baked, dynamic) and not close(baked, sample(setup["model"], setup["positive"], setup["negative"]),
                                               tol=1e-3)


def test_lora_list_without_gate(setup, node, comfy_dirs):
    import comfy.sd

    folder = comfy_dirs["models"] / "loras" / "versat2i"
    paths = write_loras(setup, folder)
    from comfy.utils import load_torch_file

    model, _ = node.execute(
        setup["model"], "none (use the LoRA list)", "manual", 1.0,
        loras="versat2i/aesthetics.safetensors = 0.5\nversat2i/geometry.safetensors = 1.5",
    ).result
    stock = setup["model"]
    for path, weight in ((paths[0], 0.5), (paths[2], 1.5)):
        stock, _ = comfy.sd.load_lora_for_models(stock, None, load_torch_file(str(path)), weight, 0)
    assert close(sample(model, setup["positive"], setup["negative"]),
                 sample(stock, setup["positive"], setup["negative"]))
    with pytest.raises(ValueError, match="needs a learned gate"):
        node.execute(setup["model"], "none (use the LoRA list)", "dynamic", 1.0,
                     loras="versat2i/aesthetics.safetensors")
    with pytest.raises(ValueError, match="needs a learned gate"):
        node.execute(setup["model"], "none (use the LoRA list)", "bake", 1.0, loras="versat2i/aesthetics.safetensors")
    with pytest.raises(ValueError, match="mode 'blend': unknown"):  # 0.3.64 lets V3 combo values through
        node.execute(setup["model"], "none (use the LoRA list)", "blend", 1.0, loras="versat2i/aesthetics.safetensors")
    # validate_inputs takes the MoL file only, so its message lands on that input alone
    assert node.validate_inputs("none (use the LoRA list)") is True
    assert "no such MoL file" in node.validate_inputs("versat2i/gone.mol.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(__import__("os").name == "nt", reason="POSIX process groups")
def test_train_gate_node_trains_then_reuses(comfy, comfy_dirs, tmp_path, monkeypatch):
    """Train Gate on a tiny SD1.5-shaped checkpoint (child process under accelerate), with the LoRAs
    linked into lora_1 / lora_2, then the same LoRAs typed in the loras list: the finished MoL file
    is reused, and it is listed for the Gated Multi-LoRA Loader."""
    import shutil

    import folder_paths
    from peft import LoraConfig
    from tiny_models.lora_training import make_kohya_dataset
    from tiny_models.sd import build_tiny_sd15

    from versat2i.models.loading import load_base_model
    from versat2i.models.lora_files import save_kohya_lora
    from versat2i.nodes import gated_multi_lora_loader, train_gate
    from versat2i.trainer.mol_file import read_mol

    tiny = build_tiny_sd15(tmp_path / "tiny")
    (comfy_dirs["models"] / "checkpoints").mkdir()
    shutil.copy(tiny.checkpoint, comfy_dirs["models"] / "checkpoints" / "tiny.safetensors")
    make_kohya_dataset(comfy_dirs["output"] / "versat2i" / "ds", aspects={"aesthetics": 1, "geometry": 1},
                       images_per_aspect=2)
    loras = comfy_dirs["models"] / "loras" / "versat2i"
    for seed, aspect in enumerate(("aesthetics", "geometry")):
        base = load_base_model(tiny.folder, compute_hash=False)
        base.denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
        with torch.no_grad():
            for name, parameter in base.denoiser.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        save_kohya_lora(loras / f"{aspect}.safetensors", denoiser=base.denoiser, metadata={"versat2i_aspect": aspect})
    folder_paths.filename_list_cache.clear()
    original = train_gate.build_config  # tiny shapes: point the loader at the tiny configs
    monkeypatch.setattr(train_gate, "build_config",
                        lambda *a, **k: original(*a, **k).replace(model_config_dir=str(tiny.folder)))

    inputs = dict(dataset="versat2i/ds", ckpt_name="tiny.safetensors", mol_name="mix", loras="",
                  lora_1="versat2i/aesthetics.safetensors", lora_2="versat2i/geometry.safetensors",
                  granularity="token", balance_loss="mole", balance_weight=0.1, steps=3, learning_rate=1e-2,
                  batch_size=2, resolution=64, seed=0, mixed_precision="no", cache_latents=True, checkpoint_every=2)
    first = train_gate.TrainGate.execute(**inputs)
    assert first.result[0] == "versat2i/mix.mol.safetensors"
    mol = read_mol(loras / "mix.mol.safetensors")
    assert mol.aspects == ("aesthetics", "geometry") and mol.training["steps"] == 3
    folder_paths.filename_list_cache.clear()
    assert "versat2i/mix.mol.safetensors" in gated_multi_lora_loader.mol_file_options()
    stamp = (loras / "mix.mol.safetensors").stat().st_mtime_ns
    typed = {**inputs, "lora_1": None, "lora_2": None,
             "loras": "versat2i/aesthetics.safetensors\nversat2i/geometry.safetensors"}
    again = train_gate.TrainGate.execute(**typed)
    assert "already trained" in again.ui["text"][0]
    assert (loras / "mix.mol.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="granularity 'word': must be one of"):  # checked when the node runs
        train_gate.TrainGate.execute(**{**typed, "granularity": "word"})
    with pytest.raises(ValueError, match="at least two"):
        train_gate.TrainGate.execute(**{**typed, "loras": "versat2i/aesthetics.safetensors"})


def test_node_schemas_are_valid_for_comfyui(comfy, comfy_dirs):
    """ComfyUI builds the /object_info entry from each schema (ids, categories, tooltips, combos)."""
    from versat2i.nodes import gated_multi_lora_loader, train_gate

    for module, node_id in ((gated_multi_lora_loader, "VersaT2I_GatedMultiLoRALoader"),
                            (train_gate, "VersaT2I_TrainGate")):
        (cls,) = module.NODES
        info = cls.GET_NODE_INFO_V1()
        assert info["name"] == node_id and info["category"] == "VersaT2I/mix"
        inputs = cls.INPUT_TYPES()
        assert all("tooltip" in spec[1]
                   for group in ("required", "optional") for spec in inputs.get(group, {}).values())
