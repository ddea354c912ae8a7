"""The DiT families' files, configs, objective and LoRA format, without ComfyUI (CPU, offline).

The tiny models are written in ComfyUI's file layout (``tiny_models/dit.py``); the ComfyUI tier
(``tests/comfy/test_dit_families.py``) checks that ComfyUI 0.33 reads the same files.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models.dit import MODELS, TINY_RESOLUTION, text_encoder_file_state

from versat2i.models.architectures import ARCHITECTURES, DIT_ARCHITECTURES
from versat2i.models.comfy_layout import dequantize_fp8, read_header
from versat2i.models.loading import CONFIG_ROOT, load_base_model
from versat2i.models.split_files import ModelFilesError, inspect_model_files, load_model_files, load_tokenizer

pytestmark = [pytest.mark.family, pytest.mark.usefixtures("t5_tokenizer_for_flux1")]


@pytest.fixture(scope="module")
def tiny(tiny_dits):
    return tiny_dits  # tests/conftest.py


def assert_same_tensors(model, reference) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# -- loading the files users have ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_split_files_load_to_the_modules_they_were_written_from(tiny, name):
    model = tiny(name)
    base = load_base_model(model.diffusion_model, text_encoders=model.text_encoders[::-1], vae=model.vae)
    assert base.arch == MODELS[name][0] and base.variant.name == MODELS[name][1]
    assert base.prediction_type == "flow_matching" and base.source_format == "split_files"
    assert_same_tensors(base.denoiser, model.modules["transformer"])
    assert_same_tensors(base.vae, model.modules["vae"])
    for encoder, reference in zip(base.text_encoders, model.modules["text_encoders"], strict=True):
        assert_same_tensors(encoder, reference)
    assert base.vae_scale_factor * base.architecture.latent_patch == 16
    assert len(base.source_sha256) == 64


def test_a_full_checkpoint_holds_all_three(tiny, tmp_path):
    """ComfyUI's checkpoint layout (CheckpointSave; some FLUX.1 releases): model.diffusion_model.*,
    vae.*, text_encoders.<name>.transformer.*."""
    model = tiny("flux1-schnell")
    state = {"model.diffusion_model." + k: v for k, v in load_file(str(model.diffusion_model)).items()}
    state.update({"vae." + k: v for k, v in load_file(str(model.vae)).items()})
    for name, path in zip(("clip_l", "t5xxl"), model.text_encoders):
        state.update({f"text_encoders.{name}.transformer." + k: v for k, v in load_file(str(path)).items()})
    checkpoint = tmp_path / "flux1-schnell-all-in-one.safetensors"
    save_file(state, str(checkpoint))
    base = load_base_model(checkpoint, config_dir=model.configs)
    assert base.variant.name == "flux1-schnell"
    assert_same_tensors(base.denoiser, model.modules["transformer"])
    assert_same_tensors(base.text_encoders[1], model.modules["text_encoders"][1])


def test_a_diffusers_folder_of_a_dit_loads(tiny, tmp_path):
    import shutil

    model = tiny("flux2-klein")
    folder = tmp_path / "klein-diffusers"
    model.modules["transformer"].save_pretrained(folder / "transformer")
    model.modules["vae"].save_pretrained(folder / "vae")
    model.modules["text_encoders"][0].save_pretrained(folder / "text_encoder")
    for part in ("tokenizer", "scheduler", "model_index.json"):
        (shutil.copytree if part != "model_index.json" else shutil.copyfile)(model.configs / part, folder / part)
    base = load_base_model(folder)
    assert base.arch == "flux2_klein" and base.source_format == "diffusers" and base.prediction_type == "flow_matching"
    assert_same_tensors(base.denoiser, model.modules["transformer"])
    assert_same_tensors(base.text_encoders[0], model.modules["text_encoders"][0])


@pytest.mark.parametrize("style", ["plain", "old", "new"])
def test_fp8_files_load_dequantised(tiny, tmp_path, style):
    """plain float8_e4m3fn, ComfyUI's old scaled fp8 (scaled_fp8 + .scale_weight) and its new format
    (.weight_scale + .comfy_quant + _quantization_metadata): w = q * scale."""
    model = tiny("flux2-klein")
    source = load_file(str(model.diffusion_model))
    quantised, layers = {}, {}
    for key, value in source.items():
        if key.endswith(".weight") and value.ndim == 2 and "blocks." in key:
            layer = key[: -len(".weight")]
            scale = value.abs().max() / 448.0 if style != "plain" else torch.tensor(1.0)
            quantised[key] = (value / scale).to(torch.float8_e4m3fn)
            if style == "old":
                quantised[layer + ".scale_weight"] = scale.reshape(())
            elif style == "new":
                quantised[layer + ".weight_scale"] = scale.reshape(())
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                quantised[layer + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
                layers[layer] = {"format": "float8_e4m3fn"}
        else:
            quantised[key] = value
    if style == "old":
        quantised["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    metadata = {"_quantization_metadata": json.dumps({"layers": layers})} if style == "new" else None
    path = tmp_path / "diffusion_models" / f"klein_fp8_{style}.safetensors"
    path.parent.mkdir()
    save_file(quantised, str(path), metadata=metadata)
    base = load_base_model(path, text_encoders=model.text_encoders, vae=model.vae, config_dir=model.configs)
    ours, reference = base.denoiser.state_dict(), model.modules["transformer"].state_dict()
    worst = max(float((ours[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-12))
                for k in reference if reference[k].ndim == 2)
    assert 0 < worst < 0.07  # fp8 e4m3 keeps 3 mantissa bits: relative error <= 1/16 per element
    assert read_header(path).has_fp8()


def test_unknown_quantisation_formats_are_refused():
    state = {"a.weight": torch.zeros(2, 2, dtype=torch.uint8),
             "a.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}
    with pytest.raises(ValueError, match="nvfp4"):
        dequantize_fp8(state, torch.float32, name="x.safetensors")


def test_mismatched_files_name_the_input_at_fault(tiny, tmp_path):
    klein, flux, zimage = tiny("flux2-klein"), tiny("flux1-dev"), tiny("zimage")
    cases = [
        # (text encoders, vae, field, words in the message)
        ((klein.text_encoders[0],), flux.vae, "vae", ["FLUX.1's VAE", "flux2-vae.safetensors"]),
        ((flux.text_encoders[1],), klein.vae, "text_encoders", ["T5-XXL", "Qwen3"]),
        ((), klein.vae, "text_encoders", ["none given", "qwen_3_4b.safetensors"]),
        ((klein.text_encoders[0],), None, "vae", ["none given", "flux2-vae.safetensors"]),
        # Z-Image's Qwen3 is 32 wide, klein's diffusion model reads three layers of a 32-wide Qwen3: fits;
        # a Qwen3 of another width does not
    ]
    for text_encoders, vae, field, words in cases:
        with pytest.raises(ModelFilesError) as err:
            inspect_model_files(klein.diffusion_model, text_encoders, vae)
        assert err.value.field == field, str(err.value)
        assert all(word in str(err.value) for word in words), str(err.value)
    wide = tmp_path / "qwen_wide.safetensors"
    state = text_encoder_file_state(klein.modules["text_encoders"][0])
    state["model.embed_tokens.weight"] = torch.zeros(151936, 48)
    save_file(state, str(wide))
    with pytest.raises(ModelFilesError, match="width 48") as err:
        inspect_model_files(klein.diffusion_model, [wide], klein.vae)
    assert err.value.field == "text_encoders" and err.value.index == 0
    with pytest.raises(ModelFilesError, match="both CLIP-L") as err:
        inspect_model_files(flux.diffusion_model, [flux.text_encoders[0], flux.text_encoders[0]], flux.vae)
    # a Z-Image diffusion model with FLUX.1's VAE is right (Z-Image uses it)
    assert inspect_model_files(zimage.diffusion_model, zimage.text_encoders, flux.vae).architecture.name == "zimage"


def test_a_lora_or_an_sd_unet_is_not_a_diffusion_model(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelFilesError, match="LoRA file") as err:
        inspect_model_files(lora, [], None)
    assert err.value.field == "base_model"
    chroma = tmp_path / "chroma.safetensors"
    save_file({"distilled_guidance_layer.in_proj.weight": torch.zeros(2, 2)}, str(chroma))
    with pytest.raises(ModelFilesError, match="Chroma"):
        inspect_model_files(chroma, [], None)


def test_a_tiny_model_needs_its_configs(tiny, tmp_path):
    """Without configs describing its size a model of no released size is refused, naming the fix."""
    model = tiny("flux2-klein")
    moved = tmp_path / model.diffusion_model.name
    moved.write_bytes(model.diffusion_model.read_bytes())
    with pytest.raises(ModelFilesError, match="model_config_dir"):
        inspect_model_files(moved, model.text_encoders, model.vae)


# -- shipped configs -----------------------------------------------------------------------------------------

def shipped_folders():
    return sorted(p for p in CONFIG_ROOT.iterdir() if (p / "model_index.json").is_file())


@pytest.mark.parametrize("folder", shipped_folders(), ids=lambda p: p.name)
def test_every_shipped_folder_loads_with_stock_diffusers_and_transformers(folder):
    """Configs build their classes (on the meta device), tokenizers are complete (a real vocabulary,
    not a 2-token one built from a config), schedulers load: as diffusers' from_pretrained would."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    index = json.loads((folder / "model_index.json").read_text())
    components = {k: v for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert components
    for name, (library, class_name) in components.items():
        module = diffusers if library == "diffusers" else transformers
        cls = getattr(module, class_name)
        if "Tokenizer" in class_name:
            if any((folder / name / f).is_file() for f in ("tokenizer.json", "vocab.json", "spiece.model")):
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder / name), local_files_only=True)
                assert len(tokenizer) > 30000, f"{folder.name}/{name}: {len(tokenizer)} tokens"
            else:  # FLUX.1's T5: its vocabulary is not shipped, it comes from VERSAT2I_T5_TOKENIZER
                assert class_name == "T5TokenizerFast", f"{folder.name}/{name}: no vocabulary shipped"
                tokenizer = load_tokenizer(folder / name)
                assert tokenizer.model_max_length == 512
            assert len(set(tokenizer("a photo of a cat")["input_ids"])) > 3
        elif "Scheduler" in class_name:
            cls.from_pretrained(str(folder), subfolder=name, local_files_only=True)
        elif library == "diffusers":
            with init_empty_weights():
                cls.from_config(cls.load_config(str(folder), subfolder=name, local_files_only=True))
        else:
            config = transformers.AutoConfig.from_pretrained(str(folder / name), local_files_only=True)
            with init_empty_weights():
                cls(config)


@pytest.mark.parametrize("variant, billions", [("flux1-dev", 11.90), ("flux1-schnell", 11.89),
                                               ("flux2-klein-4b", 3.88), ("flux2-klein-9b", 9.08),
                                               ("zimage", 6.15)])
def test_shipped_transformer_configs_are_the_released_sizes(variant, billions):
    import diffusers
    from accelerate import init_empty_weights

    config = json.loads((CONFIG_ROOT / variant / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights():
        model = cls.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions


def test_the_table_and_its_config_folders_agree():
    for architecture in DIT_ARCHITECTURES.values():
        for variant in architecture.variants:
            folder = CONFIG_ROOT / variant.name
            assert json.loads((folder / "model_index.json").read_text())["_class_name"] == architecture.pipeline_class
            transformer = json.loads((folder / "transformer" / "config.json").read_text())
            assert transformer["_class_name"] == architecture.denoiser_class
            assert architecture.gate_prompt_features(transformer) > 0
            vae = json.loads((folder / "vae" / "config.json").read_text())
            assert vae["_class_name"] == architecture.vae_class
    assert set(ARCHITECTURES) >= set(DIT_ARCHITECTURES)


# -- the objective ------------------------------------------------------------------------------------------

def test_training_sigmas_follow_the_recipes_schedulers(tiny):
    """Training draws sigma at index u * 1000 of the model's own training scheduler: Z-Image's static
    shift 3 pushes it up (median ~0.75), FLUX.1-dev's dynamic shifting leaves it unshifted (~0.5)."""
    from types import SimpleNamespace

    from versat2i.models.split_files import flow_scheduler
    from versat2i.trainer.objective import flow_noised_latents

    medians = {}
    for variant in ("zimage", "flux1-dev", "flux1-schnell"):
        table = flow_scheduler(CONFIG_ROOT / variant).sigmas.clone()
        config = SimpleNamespace(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        batch = {"latents": torch.zeros(4000, 1, 1, 1)}
        _, _, sigmas, _ = flow_noised_latents(batch, None, "cpu", weight_dtype=torch.float32, vae_dtype=torch.float32,
                                              noise_generator=torch.Generator().manual_seed(0), sigma_table=table,
                                              config=config)
        medians[variant] = float(sigmas.median())
    assert abs(medians["zimage"] - 0.75) < 0.03
    assert abs(medians["flux1-dev"] - 0.5) < 0.03 and abs(medians["flux1-schnell"] - 0.5) < 0.03


@pytest.mark.parametrize("name", list(MODELS))
def test_the_loss_is_the_velocity_error_and_only_lora_gets_gradients(tiny, name):
    """At the target the loss is 0: a transformer replaced by one that returns (in the family's own
    packing, sign and timestep convention) exactly noise - x0 gives loss 0, so packing, unpacking,
    timestep direction and sign are each other's inverse; the real transformer with a LoRA gets
    gradients on the LoRA only."""
    from peft import LoraConfig

    from versat2i.models.flow_matching import encode_latents, encode_prompts, predict_velocity
    from versat2i.trainer.objective import flow_loss
    from versat2i.trainer.train_lora import lora_targets

    model = tiny(name)
    files = inspect_model_files(model.diffusion_model, model.text_encoders, model.vae)
    parts = load_model_files(files)
    from versat2i.models.loading import _dit_base_model

    base = _dit_base_model(parts, files.architecture, files.variant, source=model.diffusion_model,
                           source_format="split_files", digest="", config_dir=files.config_dir, notes=[],
                           source_files={})
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = encode_latents(base, pixels, generator)
        cond = encode_prompts(base, ["a red circle", "a blue square on grey"], "cpu")
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    shaped = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - shaped) * latents + shaped * noise

    captured = {}

    def fake_transformer(*args, **kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        return base.denoiser(*args, **kwargs)

    # the real transformer, to record what the convention hands it; then an oracle that returns
    # the target packed as the real one packs its output
    velocity = predict_velocity(base, fake_transformer_module(fake_transformer, base.denoiser.config), noisy, sigmas,
                                cond)
    assert velocity.shape == latents.shape
    oracle = oracle_module(base, noise - latents, captured)
    perfect = flow_loss(base, oracle, latents, noise, sigmas, noisy, cond, weighting_scheme="none", guidance=None)
    assert float(perfect) < 1e-10
    if base.architecture.timestep_reversed:
        assert torch.allclose(timestep_of(captured), 1 - sigmas)
    else:
        assert torch.allclose(timestep_of(captured), sigmas)

    transformer = base.denoiser
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=lora_targets(base.architecture, True)))
    for param_name, param in transformer.named_parameters():
        if "lora_B" in param_name:
            param.data.normal_(generator=generator)
    loss = flow_loss(base, transformer, latents, noise, sigmas, noisy, cond, weighting_scheme="logit_normal",
                     guidance=3.5)
    loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all("lora_" in n for n in grads)
    assert [n for n, p in transformer.named_parameters() if "lora_" not in n and p.grad is not None] == []


def fake_transformer_module(function, config):
    class Wrapped(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return function(*args, **kwargs)

    wrapped = Wrapped()
    wrapped.config = config
    return wrapped


def timestep_of(captured) -> torch.Tensor:
    if "timestep" in captured["kwargs"]:
        return captured["kwargs"]["timestep"].float()
    return captured["args"][1].float()  # Z-Image: transformer(x, t, cap_feats)


def oracle_module(base, target: torch.Tensor, captured):
    """A stand-in transformer that returns ``target`` in the layout (and sign) the real one returned
    for the same inputs: pack it the way the call convention packs latents."""
    import diffusers

    pipeline = getattr(diffusers, base.architecture.pipeline_class)
    sign = -1.0 if base.architecture.negated_prediction else 1.0

    def packed(*args, **kwargs):
        batch, channels, height, width = target.shape
        if base.architecture.denoiser_call == "flux":
            out = pipeline._pack_latents(target, batch, channels, height, width)
        elif base.architecture.denoiser_call == "flux2":
            out = pipeline._pack_latents(target)
        else:
            return ([t for t in (sign * target).unsqueeze(2).unbind(0)],)
        return (sign * out,)

    return fake_transformer_module(packed, base.denoiser.config)


# -- the LoRA file -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flux1-dev", "flux2-klein", "zimage"])
def test_lora_files_load_in_diffusers_with_the_trained_scale(tiny, tmp_path, name):
    """alpha 8 at rank 4 (scale 2): the file bakes the scale into lora_B and says alpha = rank, so
    diffusers' load_lora_weights applies exactly W + 2 B A, with no missing or unexpected key."""
    import diffusers
    from peft import LoraConfig

    from versat2i.models.lora_files import diffusers_to_peft, load_kohya_lora, save_lora
    from versat2i.trainer.train_lora import lora_targets

    model = tiny(name)
    base = load_base_model(model.diffusion_model, text_encoders=model.text_encoders, vae=model.vae)
    reference = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    base.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                         target_modules=lora_targets(base.architecture, True)))
    generator = torch.Generator().manual_seed(3)
    merged = dict(reference)
    from peft.tuners.lora import LoraLayer

    for path, layer in base.denoiser.named_modules():
        if isinstance(layer, LoraLayer):
            layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape,
                                                              generator=generator) * 0.05
            merged[path + ".weight"] = (reference[path + ".weight"] + layer.get_delta_weight("default")).detach()
    path = save_lora(tmp_path / "aspect.safetensors", architecture=base.architecture, denoiser=base.denoiser,
                     metadata={"versat2i_aspect": "test"})
    state, metadata = load_kohya_lora(path)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == 4
    assert metadata["versat2i_lora_alpha"] == "8.0"
    modules = diffusers_to_peft(state, base, metadata)
    assert len(modules) == len(state) // 2 and all(w.scale == 1.0 for w in modules.values())

    fresh = load_base_model(model.diffusion_model, text_encoders=model.text_encoders, vae=model.vae,
                            compute_hash=False)
    others = {n: None for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
              if n in getattr(diffusers, base.architecture.pipeline_class).__init__.__code__.co_varnames}
    pipe = getattr(diffusers, base.architecture.pipeline_class)(transformer=fresh.denoiser, vae=None, scheduler=None,
                                                                **others)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(str(path), adapter_name="aspect")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert [m for m in messages if ("missing" in m.lower() or "unexpected" in m.lower()) and "NoneType" not in m] == []
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = fresh.denoiser.state_dict()
    assert max(float((fused[k] - merged[k]).abs().max()) for k in merged) < 1e-5
