"""Our kohya LoRA files in real ComfyUI (skipped without COMFYUI_PATH).

The comfy-side model is built from the very same weights: the tiny model's original-layout single
file goes through ComfyUI's own model detection (``detect_unet_config``), its SD15 / SDXL model
classes, ``load_model_weights`` and text-encoder state-dict processing. The LoRA then goes through
``comfy.sd.load_lora_for_models`` (what the stock LoraLoader node calls): every key must map (no
"lora key not loaded" / "NOT LOADED" warning), and the patched UNet must give the output of the
peft-applied diffusers UNet on the same input; patched text-encoder weights must equal peft's
merged weights.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models.sd import (
    SDXL_TE1_HIDDEN,
    SDXL_TE2_HIDDEN,
    build_tiny_model,
    diffusers_to_ldm_state_dict,
    unet_inputs,
)

from versat2i.models.loading import CONFIG_ROOT, load_base_model
from versat2i.models.lora_files import load_kohya_lora, save_kohya_lora

pytestmark = pytest.mark.comfy

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_PREFIX = "model.diffusion_model."


def _tiny_clip_overrides(hidden: int, layers: int, act: str) -> dict:
    return {"hidden_size": hidden, "intermediate_size": hidden * 2, "num_attention_heads": 4,
            "num_hidden_layers": layers, "hidden_act": act, "projection_dim": hidden}


def comfy_models(arch: str, ldm_state_dict: dict):
    """(ModelPatcher, comfy.sd.CLIP) for a tiny original-layout state dict, built by ComfyUI's code."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    cpu = torch.device("cpu")
    unet_config = comfy.model_detection.detect_unet_config(ldm_state_dict, UNET_PREFIX)
    model_config = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[arch](unet_config)
    if arch == "sdxl":
        model_config.unet_config["num_head_channels"] = 16  # the tiny UNet's head width (SDXL: 64)
    model = model_config.get_model(ldm_state_dict, UNET_PREFIX, device=cpu)
    model.load_model_weights(dict(ldm_state_dict), UNET_PREFIX)
    # ComfyUI's loader accepted every UNet tensor of our single-file layout, unchanged.
    loaded = model.diffusion_model.state_dict()
    ours = {k[len(UNET_PREFIX):]: v for k, v in ldm_state_dict.items() if k.startswith(UNET_PREFIX)}
    assert loaded.keys() == ours.keys()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    if arch == "sd15":
        options = {"clip_l_model_config": _tiny_clip_overrides(32, 2, "quick_gelu")}
    else:
        options = {"clip_l_model_config": _tiny_clip_overrides(SDXL_TE1_HIDDEN, 3, "quick_gelu"),
                   "clip_g_model_config": _tiny_clip_overrides(SDXL_TE2_HIDDEN, 3, "gelu")}
    clip = comfy.sd.CLIP(model_config.clip_target(ldm_state_dict),
                         model_options={**options, "load_device": cpu, "offload_device": cpu, "dtype": torch.float32})
    clip_state_dict = model_config.process_clip_state_dict(
        {k: v for k, v in ldm_state_dict.items() if k.startswith(("cond_stage_model.", "conditioner."))})
    missing, unexpected = clip.load_sd(clip_state_dict, full_model=True)
    # Real SD1.5 / SDXL checkpoints carry no CLIP-L projection or logit scale either (ComfyUI drops
    # them when saving); everything else must load.
    ignorable = ("position_ids", "logit_scale", "clip_l.transformer.text_projection.weight")
    assert [k for k in missing if not k.endswith(ignorable)] == [], missing
    assert unexpected == [], unexpected
    return patcher, clip


def add_lora(base, seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    base.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS))
    for encoder in base.text_encoders:
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=4, target_modules=TE_TARGETS), encoder)
    generator = torch.Generator().manual_seed(seed)
    for module in (base.denoiser, *base.text_encoders):
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.05
    return base


def _comfy_unet_output(patcher, diffusers_unet, inputs):
    """Run ComfyUI's UNet on the diffusers inputs; SDXL's ``y`` is built by the diffusers UNet's own
    time projection so both sides see the same added conditioning."""
    kwargs = {}
    added = inputs.get("added_cond_kwargs")
    if added is not None:
        time_embeds = diffusers_unet.add_time_proj(added["time_ids"].flatten()).reshape(added["time_ids"].shape[0], -1)
        kwargs["y"] = torch.cat([added["text_embeds"], time_embeds], dim=-1)
    patcher.patch_model()
    try:
        return patcher.model.diffusion_model(inputs["sample"], timesteps=inputs["timestep"],
                                             context=inputs["encoder_hidden_states"], **kwargs)
    finally:
        patcher.unpatch_model()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_comfyui_loads_every_key_and_matches_diffusers(comfy, tmp_path, caplog, arch):
    import comfy.lora
    import comfy.sd

    tiny = build_tiny_model(arch, tmp_path)
    ldm = diffusers_to_ldm_state_dict(arch, tiny.components)
    patcher, clip = comfy_models(arch, ldm)
    base = load_base_model(tiny.checkpoint, config_dir=tiny.folder)
    inputs = unet_inputs(arch)
    with torch.no_grad():
        base_out = base.denoiser(**inputs).sample
        comfy_base_out = _comfy_unet_output(patcher, base.denoiser, inputs)
    assert (comfy_base_out - base_out).abs().max() <= 1e-4  # same model on both sides before any LoRA

    add_lora(base)
    path = save_kohya_lora(tmp_path / "aspect.safetensors", denoiser=base.denoiser, text_encoders=base.text_encoders,
                           metadata={"versat2i_aspect": "test"})
    lora, _ = load_kohya_lora(path)
    modules = {key.split(".")[0] for key in lora}

    # ComfyUI's own key mapping, step by step as comfy.sd.load_lora_for_models does it.
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not_loaded == []
    assert len(patches) == len(modules)  # every module of the file became one weight patch
    applied = set(model_lora.patches) | set(clip_lora.patcher.patches)
    assert set(patches) <= applied
    te_prefixes = {m.split("_")[1] for m in modules if not m.startswith("lora_unet_")}
    assert te_prefixes == ({"te"} if arch == "sd15" else {"te1", "te2"})

    with torch.no_grad():
        expected = base.denoiser(**inputs).sample
        got = _comfy_unet_output(model_lora, base.denoiser, inputs)
    assert (expected - base_out).abs().max() > 1e-3  # the LoRA matters
    max_diff = (got - expected).abs().max().item()
    logging.getLogger(__name__).info("%s: ComfyUI vs diffusers+peft max abs diff %.3g over %d modules",
                                     arch, max_diff, len(modules))
    assert max_diff <= 1e-4

    # Text encoders: ComfyUI's patched weights equal peft's merged weights.
    import comfy.model_management
    from peft.tuners.lora import LoraLayer

    # As ComfyUI does before encoding: load the LoRA'd CLIP patcher (this swaps out the plain one,
    # which comfy.sd.CLIP loaded at construction).
    comfy.model_management.load_models_gpu([clip_lora.patcher], force_full_load=True)
    try:
        comfy_sd = clip_lora.cond_stage_model.state_dict()
        names = ["clip_l"] if arch == "sd15" else ["clip_l", "clip_g"]
        checked = 0
        for name, encoder in zip(names, base.text_encoders):
            for path, layer in encoder.named_modules():
                if not isinstance(layer, LoraLayer):
                    continue
                path = path if path.startswith("text_model.") else "text_model." + path
                merged = layer.base_layer.weight + layer.get_delta_weight("default")
                assert (comfy_sd[f"{name}.transformer.{path}.weight"] - merged).abs().max() <= 1e-5, path
                checked += 1
        assert checked == len([m for m in modules if not m.startswith("lora_unet_")])
    finally:
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("arch, comfy_class", [("sd15", "SD15"), ("sd2", "SD20"), ("sdxl", "SDXL")])
def test_shipped_configs_are_what_comfyui_detects(comfy, arch, comfy_class):
    """The full-size UNet configs we ship, written out in the original layout (meta tensors, no
    memory), are detected by ComfyUI as the architecture they claim to be, and ComfyUI's own UNet
    for that architecture has exactly the same keys and shapes."""
    import comfy.model_detection
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from tiny_models.sd import unet_to_ldm

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_ROOT / arch / "unet")))
    ldm = unet_to_ldm(unet)
    model_config = comfy.model_detection.model_config_from_unet(ldm, UNET_PREFIX)
    assert type(model_config).__name__ == comfy_class
    comfy_unet = model_config.get_model({}, UNET_PREFIX, device=torch.device("meta")).diffusion_model
    comfy_shapes = {UNET_PREFIX + k: tuple(v.shape) for k, v in comfy_unet.state_dict().items()}
    assert comfy_shapes == {k: tuple(v.shape) for k, v in ldm.items()}


def test_shipped_text_encoder_configs_match_comfyui(comfyui_path):
    import json

    comfy_dir = comfyui_path / "comfy"
    fields = ["hidden_size", "intermediate_size", "num_attention_heads", "hidden_act", "vocab_size",
              "max_position_embeddings"]
    pairs = [(CONFIG_ROOT / "sd15/text_encoder", "sd1_clip_config.json"),
             (CONFIG_ROOT / "sdxl/text_encoder", "sd1_clip_config.json"),
             (CONFIG_ROOT / "sdxl/text_encoder_2", "clip_config_bigg.json"),
             (CONFIG_ROOT / "sd2/text_encoder", "text_encoders/sd2_clip_config.json")]
    for ours_dir, theirs_name in pairs:
        ours = json.loads((ours_dir / "config.json").read_text())
        theirs = json.loads((comfy_dir / theirs_name).read_text())
        assert {f: ours[f] for f in fields} == {f: theirs[f] for f in fields}, ours_dir
        # SD2 conditions on the penultimate layer: diffusers keeps 23 of the 24 layers ComfyUI builds.
        assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] - (1 if "sd2" in str(ours_dir) else 0)


def test_a_lora_the_trainer_wrote_loads_in_comfyui_like_in_diffusers(comfy, tmp_path, caplog, capsys):
    """The trainer's own file (not one built by hand): a few CPU steps on the tiny SD1.5 single file
    with LoRA layers on the UNet (attention + feed-forward) and the text encoder, alpha != rank. ComfyUI
    maps every key, and its patched UNet gives what diffusers gives with the same file loaded through
    its kohya converter into peft layers."""
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer
    from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config

    from versat2i.trainer import train_lora

    tiny = build_tiny_model("sd15", tmp_path)
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=2)
    config = tiny_lora_config(tmp_path, tiny.checkpoint, dataset, model_config_dir=str(tiny.folder),
                              max_train_steps=4, checkpointing_steps=100, learning_rate=5e-2, alpha=2.0,
                              train_text_encoder=True, train_feed_forward=True)
    path = train_lora.main(train_lora.parse_args(["--config", str(config.save(tmp_path / "c.toml"))]))
    lora, _ = load_kohya_lora(path)
    modules = {key.split(".")[0] for key in lora}
    assert {m.split("_")[1] for m in modules} == {"unet", "te"}

    patcher, clip = comfy_models("sd15", diffusers_to_ldm_state_dict("sd15", tiny.components))
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(patcher.model, {}))
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(patcher, clip, lora, 1.0, 1.0)
    assert [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()] == []
    assert len(patches) == len(modules) and set(patches) <= set(model_lora.patches) | set(clip_lora.patcher.patches)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny.folder), safety_checker=None)
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        base_out = pipe.unet(**inputs).sample
        pipe.load_lora_weights(str(path))
        expected = pipe.unet(**inputs).sample
        got = _comfy_unet_output(model_lora, pipe.unet, inputs)
    effect, max_diff = (expected - base_out).abs().max().item(), (got - expected).abs().max().item()
    logging.getLogger(__name__).info("trained LoRA: effect %.3g, ComfyUI vs diffusers+peft max abs diff %.3g "
                                     "over %d modules", effect, max_diff, len(modules))
    assert effect > 1e-3  # the trained LoRA matters
    assert max_diff <= 1e-4

    comfy.model_management.load_models_gpu([clip_lora.patcher], force_full_load=True)
    try:
        comfy_sd = clip_lora.cond_stage_model.state_dict()
        checked = 0
        for name, layer in pipe.text_encoder.named_modules():
            if isinstance(layer, LoraLayer):
                merged = layer.base_layer.weight + layer.get_delta_weight(layer.active_adapters[0])
                name = name if name.startswith("text_model.") else "text_model." + name
                assert (comfy_sd[f"clip_l.transformer.{name}.weight"] - merged).abs().max() <= 1e-5, name
                checked += 1
        assert checked == len([m for m in modules if m.startswith("lora_te_")])
    finally:
        comfy.model_management.unload_all_models()
