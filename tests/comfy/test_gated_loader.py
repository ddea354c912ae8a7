"""Gated Multi-LoRA Loader in a real ComfyUI (in-process, CPU): a tiny SD1.5-architecture model,
four tiny kohya LoRAs and a MoL file, sampled two steps through ``comfy.sample`` (KSampler's
path). Skipped without COMFYUI_PATH. Offline; ~10 s on one thread."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy

ASPECTS = ("aesthetics", "alignment", "geometry", "lowlevel")


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


def write_loras(setup, folder, *, with_clip=True, ranks=(4, 4, 4, 4)):
    from tiny_models.comfy import make_kohya_lora

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (aspect, rank) in enumerate(zip(ASPECTS, ranks)):
        lora = make_kohya_lora(setup["model"], setup["clip"] if with_clip else None, seed=10 + index, rank=rank, alpha=rank / 2)
        path = folder / f"{aspect}.safetensors"
        save_file(lora, str(path))
        paths.append(path)
    return paths


def random_gate(setup, granularity, aspects=ASPECTS, seed=0, scale=2.0, with_clip=True):
    from tiny_models.comfy import clip_lora_module_names, unet_lora_module_names

    from versat2i.trainer.gate import MixtureGate

    names = unet_lora_module_names(setup["model"])
    weights = dict(setup["model"].model.state_dict())
    if with_clip:
        names.update(clip_lora_module_names(setup["clip"]))
        weights.update(setup["clip"].cond_stage_model.state_dict())
    layers = sorted(names)
    in_features = [weights[names[layer]].shape[1] for layer in layers]
    gate = MixtureGate(list(aspects), layers, in_features, granularity, prompt_features=64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in [p for n, p in gate.named_parameters() if "temperature" not in n]:
            parameter.copy_(torch.randn(parameter.shape, generator=g) * scale)
        gate.prior.copy_(torch.softmax(torch.randn(gate.prior.shape, generator=g), -1))
    return gate


def write_mol(setup, comfy_dirs, granularity, name="mix", **kwargs):
    from versat2i.trainer.mol_file import expert_record, save_mol

    folder = comfy_dirs["models"] / "loras" / "versat2i"
    paths = write_loras(setup, folder)
    gate = random_gate(setup, granularity, **kwargs)
    records = [expert_record(a, p, folder) for a, p in zip(ASPECTS, paths)]
    save_mol(folder / f"{name}.mol.safetensors", gate, records)
    return f"versat2i/{name}.mol.safetensors", gate, paths


def run_node(node, setup, mol_file, mode, **kwargs):
    result = node.execute(setup["model"], mol_file, mode, kwargs.pop("strength", 1.0), clip=setup["clip"], **kwargs)
    return result.result[0], result.result[1]


def base_snapshot(setup):
    model_sd = {k: v.clone() for k, v in setup["model"].model.state_dict().items()}
    clip_sd = {k: v.clone() for k, v in setup["clip"].cond_stage_model.state_dict().items()}
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
    [("token", "bake"), ("token", "dynamic"), ("prompt", "bake"), ("prompt", "dynamic"), ("token", "equal"), ("token", "manual")],
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
        setup["model"], setup["clip"], [AspectLoRA("only", "one.safetensors", lora)], mode="dynamic", gate=gate, strength=0.7
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


def test_bake_equals_dynamic_for_prompt_gates(setup, node, comfy_dirs):
    mol_file, _, _ = write_mol(setup, comfy_dirs, "prompt", scale=3.0)
    positive = setup["positive"]
    # cfg 1: ComfyUI evaluates only the positive prompt, the one the bake is evaluated on
    baked_model, baked_clip = run_node(node, setup, mol_file, "bake", conditioning=positive)
    dynamic_model, dynamic_clip = run_node(node, setup, mol_file, "dynamic")
    from tiny_models.comfy import encode

    # text-encoder layers: both modes merge the same static gate
    assert close(encode(baked_clip, "a photo of a cat")[0][0], encode(dynamic_clip, "a photo of a cat")[0][0])
    baked = sample(baked_model, positive, setup["negative"], cfg=1.0)
    dynamic = sample(dynamic_model, positive, setup["negative"], cfg=1.0)
    assert close(baked, dynamic), (baked - dynamic).abs().max()
    # and baking on another prompt gives another model
    other = encode(setup["clip"], "an oil painting of a mountain lake at dawn")
    baked_other, _ = run_node(node, setup, mol_file, "bake", conditioning=other)
    assert not close(sample(baked_other, positive, setup["negative"], cfg=1.0), baked, tol=1e-4)


@pytest.mark.parametrize("mode", ["bake", "dynamic"])
def test_stock_lora_loader_before_and_after(setup, node, comfy_dirs, mode):
    import folder_paths
    from nodes import LoraLoader  # ComfyUI's own node

    from tiny_models.comfy import make_kohya_lora

    mol_file, _, _ = write_mol(setup, comfy_dirs, "token")
    save_file(make_kohya_lora(setup["model"], setup["clip"], seed=77, rank=2), str(comfy_dirs["models"] / "loras" / "extra.safetensors"))
    folder_paths.filename_list_cache.clear()
    stock = LoraLoader()

    gated_model, gated_clip = run_node(node, setup, mol_file, mode)
    after_model, after_clip = stock.load_lora(gated_model, gated_clip, "extra.safetensors", 0.8, 0.8)

    stocked_model, stocked_clip = stock.load_lora(setup["model"], setup["clip"], "extra.safetensors", 0.8, 0.8)
    before = node.execute(stocked_model, mol_file, mode, 1.0, clip=stocked_clip).result

    from tiny_models.comfy import encode

    outs = {}
    pairs = {"after": (after_model, after_clip), "before": before, "gated": (gated_model, gated_clip), "stock": (stocked_model, stocked_clip)}
    for name, (m, c) in pairs.items():
        outs[name] = sample(m, encode(c, "a photo of a cat"), setup["negative"])
    assert close(outs["after"], outs["before"]), (outs["after"] - outs["before"]).abs().max()
    assert not close(outs["after"], outs["gated"], tol=1e-3)  # the stock LoRA did apply
    assert not close(outs["after"], outs["stock"], tol=1e-3)  # and so did the mixture


@pytest.mark.parametrize("mode", ["bake", "dynamic"])
def test_low_vram_streaming_matches_full_load(setup, node, comfy_dirs, mode):
    """Partial (low-VRAM) loading casts weights per layer and applies weight patches on the fly;
    the mixture must come out the same as with the model fully loaded."""
    import comfy.model_management

    mol_file, _, _ = write_mol(setup, comfy_dirs, "token")
    model, _ = run_node(node, setup, mol_file, mode)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    context = torch.cat([setup["positive"][0][0], setup["negative"][0][0]])

    def forward(lowvram_bytes):
        comfy.model_management.unload_all_models()
        model.patch_model(device_to=model.load_device, lowvram_model_memory=lowvram_bytes)
        try:
            with torch.no_grad():
                return model.model.apply_model(x, sigma, c_crossattn=context)
        finally:
            model.unpatch_model(model.offload_device)

    full = forward(0)
    streamed = forward(1)  # 1 byte: every layer streamed, LowVramPatch applies the weight patches
    assert model.model.model_lowvram is False  # unpatched again
    assert close(full, streamed), (full - streamed).abs().max()
    comfy.model_management.unload_all_models()
    with torch.no_grad():
        base = setup["model"].model.apply_model(x, sigma, c_crossattn=context)
    assert not close(full, base, tol=1e-3)  # the mixture is in both


def test_changed_lora_is_refused_by_the_node(setup, node, comfy_dirs):
    from tiny_models.comfy import make_kohya_lora

    from versat2i.trainer.mol_file import LoRAHashMismatchError

    mol_file, _, paths = write_mol(setup, comfy_dirs, "token")
    save_file(make_kohya_lora(setup["model"], setup["clip"], seed=999), str(paths[2]))
    with pytest.raises(LoRAHashMismatchError, match="geometry"):
        run_node(node, setup, mol_file, "bake")


def test_lora_for_another_architecture_is_a_clear_error(setup, comfy):
    from tiny_models.comfy import TINY_UNET_CONFIG, build_tiny_sd15, make_kohya_lora

    from versat2i.nodes.model_patching import AspectLoRA, apply_mixture

    wider = build_tiny_sd15(seed=1, unet_config={**TINY_UNET_CONFIG, "model_channels": 64})
    foreign = make_kohya_lora(wider, None, seed=5)
    with pytest.raises(ValueError, match="another base model"):
        apply_mixture(setup["model"], None, [AspectLoRA("a", "wide.safetensors", foreign)], mode="equal")
    garbage = {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 8), "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="does not fit this model"):
        apply_mixture(setup["model"], None, [AspectLoRA("a", "junk.safetensors", garbage)], mode="equal")


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
    assert close(sample(model, setup["positive"], setup["negative"]), sample(stock, setup["positive"], setup["negative"]))
    with pytest.raises(ValueError, match="needs a learned gate"):
        node.execute(setup["model"], "none (use the LoRA list)", "dynamic", 1.0, loras="versat2i/aesthetics.safetensors")
    assert "needs a learned gate" in node.validate_inputs("none (use the LoRA list)", "bake")
    assert "unknown" in node.validate_inputs("none (use the LoRA list)", "blend")


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

    from versat2i.nodes import gated_multi_lora_loader, train_gate
    from versat2i.trainer.lora_io import save_kohya_lora
    from versat2i.trainer.model_loading import load_base_model
    from versat2i.trainer.mol_file import read_mol

    tiny = build_tiny_sd15(tmp_path / "tiny")
    (comfy_dirs["models"] / "checkpoints").mkdir()
    shutil.copy(tiny.checkpoint, comfy_dirs["models"] / "checkpoints" / "tiny.safetensors")
    make_kohya_dataset(comfy_dirs["output"] / "versat2i" / "ds", aspects={"aesthetics": 1, "geometry": 1}, images_per_aspect=2)
    loras = comfy_dirs["models"] / "loras" / "versat2i"
    for seed, aspect in enumerate(("aesthetics", "geometry")):
        base = load_base_model(tiny.folder, compute_hash=False)
        base.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
        with torch.no_grad():
            for name, parameter in base.unet.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
        save_kohya_lora(loras / f"{aspect}.safetensors", unet=base.unet, metadata={"versat2i_aspect": aspect})
    folder_paths.filename_list_cache.clear()
    original = train_gate.build_config  # tiny shapes: point the loader at the tiny configs
    monkeypatch.setattr(train_gate, "build_config", lambda *a, **k: original(*a, **k).replace(model_config_dir=str(tiny.folder)))

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
    assert "must be one of" in train_gate.TrainGate.validate_inputs(granularity="word")
    with pytest.raises(ValueError, match="at least two"):
        train_gate.TrainGate.execute(**{**typed, "loras": "versat2i/aesthetics.safetensors"})


def test_node_schemas_are_valid_for_comfyui(comfy, comfy_dirs):
    """ComfyUI builds the /object_info entry from each schema (ids, categories, tooltips, combos)."""
    from versat2i.nodes import gated_multi_lora_loader, train_gate

    for module, node_id in ((gated_multi_lora_loader, "VersaT2I_GatedMultiLoRALoader"), (train_gate, "VersaT2I_TrainGate")):
        (cls,) = module.NODES
        info = cls.GET_NODE_INFO_V1()
        assert info["name"] == node_id and info["category"] == "VersaT2I/mix"
        inputs = cls.INPUT_TYPES()
        assert all("tooltip" in spec[1] for group in ("required", "optional") for spec in inputs.get(group, {}).values())
