"""models.loading: base models from diffusers folders and ComfyUI-layout single files.

Offline: tiny random-weight models built in code (tests/tiny_models/sd.py); the shipped full-size
configs are checked on the meta device (no weights allocated).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models.sd import build_tiny_model, unet_inputs

from versat2i.models import loading as model_loading
from versat2i.models.architectures import ARCHITECTURES
from versat2i.models.loading import (
    CONFIG_ROOT,
    build_clip_tokenizer,
    detect_checkpoint_architecture,
    detect_checkpoint_prediction_type,
    encode_prompts,
    load_base_model,
)

CAPTIONS = ["a red cube on a table", "portrait of an old man, oil painting"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root) for arch in ("sd15", "sd2", "sdxl")}


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_single_file_and_folder_load_identical_models(tiny, arch):
    model = tiny[arch]
    from_folder = load_base_model(model.folder)
    from_file = load_base_model(model.checkpoint, config_dir=model.folder,
                                prediction_type=from_folder.prediction_type)
    assert from_folder.arch == from_file.arch == arch
    assert from_folder.source_format == "diffusers" and from_file.source_format == "single_file"

    # Every tensor survives diffusers -> ldm file -> diffusers' single-file loader unchanged.
    assert _state_dicts_equal(from_file.denoiser, model.components["unet"]) == []
    assert _state_dicts_equal(from_file.vae, model.components["vae"]) == []
    names = ["text_encoder", "text_encoder_2"][: len(from_file.text_encoders)]
    for name, encoder in zip(names, from_file.text_encoders):
        assert _state_dicts_equal(encoder, model.components[name]) == []

    inputs = unet_inputs(arch)
    with torch.no_grad():
        out_folder = from_folder.denoiser(**inputs).sample
        out_file = from_file.denoiser(**inputs).sample
        hidden_folder, added_folder = encode_prompts(from_folder, CAPTIONS, "cpu")
        hidden_file, added_file = encode_prompts(from_file, CAPTIONS, "cpu")
    assert out_folder.abs().max() > 0
    assert torch.equal(out_folder, out_file)
    assert torch.equal(hidden_folder, hidden_file)
    if arch == "sdxl":
        assert torch.equal(added_folder["text_embeds"], added_file["text_embeds"])
    assert from_file.vae_scaling_factor == from_folder.vae_scaling_factor
    assert from_file.resolution == from_folder.resolution == 64


def test_hashes_identify_the_source(tiny):
    import hashlib

    model = tiny["sd15"]
    base = load_base_model(model.checkpoint, config_dir=model.folder)
    assert base.source_sha256 == hashlib.sha256(model.checkpoint.read_bytes()).hexdigest()
    assert base.source_path == str(model.checkpoint)
    folder_hash = load_base_model(model.folder).source_sha256
    assert len(folder_hash) == 64 and folder_hash != base.source_sha256
    assert load_base_model(model.folder, compute_hash=False).source_sha256 == ""


def test_folder_with_only_fp16_variant_weights(tiny, tmp_path):
    import shutil

    from tiny_models.sd import save_diffusers_folder

    folder = tmp_path / "variant"
    save_diffusers_folder("sd15", tiny["sd15"].components, folder)
    for name in ("unet", "vae", "text_encoder"):
        for weights in (folder / name).glob("*.safetensors"):
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    base = load_base_model(folder)
    assert _state_dicts_equal(base.denoiser, tiny["sd15"].components["unet"]) == []
    # Files outside the loaded components do not change the model's identity.
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "model.bin").write_bytes(b"x")
    assert load_base_model(folder).source_sha256 == base.source_sha256
    shutil.rmtree(folder / "safety_checker")


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_arch_detected_from_single_file_keys(tiny, arch):
    assert detect_checkpoint_architecture(load_file(str(tiny[arch].checkpoint))).name == arch


def test_requested_arch_must_match(tiny):
    with pytest.raises(ValueError, match="arch='sdxl' was requested but the checkpoint is sd15"):
        load_base_model(tiny["sd15"].checkpoint, arch="sdxl", config_dir=tiny["sd15"].folder)
    with pytest.raises(ValueError, match="arch"):
        load_base_model(tiny["sd15"].folder, arch="flux")


def test_sdxl_encoding_follows_the_diffusers_recipe(tiny):
    base = load_base_model(tiny["sdxl"].folder)
    te1, te2 = base.text_encoders
    with torch.no_grad():
        hidden, added = encode_prompts(base, CAPTIONS, "cpu", original_sizes=[(96, 64), (64, 64)],
                                       crop_top_lefts=(8, 0), target_sizes=(64, 64))
        ids1 = base.tokenizers[0](CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        ids2 = base.tokenizers[1](CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        penultimate1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids2, output_hidden_states=True)
    assert torch.equal(hidden, torch.cat([penultimate1, out2.hidden_states[-2]], dim=-1))
    assert torch.equal(added["text_embeds"], out2.text_embeds)
    assert added["time_ids"].tolist() == [[96, 64, 8, 0, 64, 64], [64, 64, 8, 0, 64, 64]]
    # The second tokenizer pads with "!" like SDXL's OpenCLIP tokenizer, the first with the end token.
    assert ids2[0, -1] != ids1[0, -1]
    with pytest.raises(ValueError, match="original_sizes"):
        encode_prompts(base, CAPTIONS, "cpu", original_sizes=[(1, 2), (3, 4), (5, 6)])


def test_sd15_encoding_is_the_last_hidden_state(tiny):
    base = load_base_model(tiny["sd15"].folder)
    with torch.no_grad():
        hidden, added = encode_prompts(base, CAPTIONS, "cpu")
        ids = base.tokenizers[0](CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        expected = base.text_encoders[0](ids).last_hidden_state
    assert added is None
    assert torch.equal(hidden, expected)


def test_extra_keys_of_real_checkpoints_are_tolerated(tmp_path):
    """Real files also carry schedules, EMA counters, position ids, logit scales: all ignored."""
    extras = {"betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000),
              "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(10),
              "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6)}
    model = build_tiny_model("sdxl", tmp_path, extra_keys=extras)
    base = load_base_model(model.checkpoint, config_dir=model.folder)
    assert _state_dicts_equal(base.denoiser, model.components["unet"]) == []


def test_sd2_single_file_drops_the_unused_last_text_layer(tmp_path):
    """SD2 files hold all 24 OpenCLIP-H layers; SD2 conditions on the 23rd, so the diffusers config
    (ours too) has 23 and diffusers' converter skips layer 23."""
    import shutil

    model = build_tiny_model("sd2", tmp_path, text_layers=24)
    config_dir = tmp_path / "configs"
    shutil.copytree(model.folder, config_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    config_file = config_dir / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_hidden_layers": 23}))
    base = load_base_model(model.checkpoint, config_dir=config_dir)
    encoder, full = base.text_encoders[0], model.components["text_encoder"]
    assert encoder.config.num_hidden_layers == 23
    full_state = full.state_dict()
    assert all(torch.equal(value, full_state[key]) for key, value in encoder.state_dict().items())


def test_shipped_sd2_config_sample_size_follows_prediction_type(tiny, tmp_path, monkeypatch):
    """One shipped SD2 config serves the 512 base (epsilon) and the 768-v model."""
    import shutil

    fake_root = tmp_path / "model_configs"
    shutil.copytree(tiny["sd2"].folder, fake_root / "sd2", ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.setattr(model_loading, "CONFIG_ROOT", fake_root)
    base = load_base_model(tiny["sd2"].checkpoint)  # no v-prediction evidence: epsilon, 512
    assert (base.prediction_type, base.resolution, base.config_dir) == ("epsilon", 512, str(fake_root / "sd2"))
    v_model = load_base_model(tiny["sd2"].checkpoint, prediction_type="v_prediction")
    assert (v_model.prediction_type, v_model.resolution) == ("v_prediction", 768)


# -- prediction type ---------------------------------------------------------------------------


def test_prediction_type_from_folder_scheduler(tiny):
    base = load_base_model(tiny["sd2"].folder)  # built with a v_prediction scheduler
    assert base.prediction_type == "v_prediction"
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    assert type(base.noise_scheduler).__name__ == "DDPMScheduler"
    assert load_base_model(tiny["sd15"].folder).prediction_type == "epsilon"


def test_prediction_type_option_overrides_detection(tiny):
    base = load_base_model(tiny["sd15"].checkpoint, config_dir=tiny["sd15"].folder, prediction_type="v_prediction")
    assert base.prediction_type == base.noise_scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        load_base_model(tiny["sd15"].folder, prediction_type="x0")


def test_v_pred_and_ztsnr_markers_in_a_single_file(tiny, tmp_path):
    state_dict = load_file(str(tiny["sdxl"].checkpoint))
    state_dict.update({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    path = tmp_path / "vpred.safetensors"
    save_file(state_dict, str(path))
    base = load_base_model(path, config_dir=tiny["sdxl"].folder)
    assert base.prediction_type == "v_prediction"
    assert base.noise_scheduler.config.rescale_betas_zero_snr is True
    assert any("v_pred" in note for note in base.notes)


def test_sd2_v_prediction_heuristic_matches_comfyui():
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    generator = torch.Generator().manual_seed(0)
    wide = {probe: torch.randn(640, generator=generator) * 0.2}
    narrow = {probe: torch.randn(640, generator=generator) * 0.01}
    assert detect_checkpoint_prediction_type(ARCHITECTURES["sd2"], wide)[0] == "v_prediction"
    assert detect_checkpoint_prediction_type(ARCHITECTURES["sd2"], narrow)[0] == "epsilon"
    assert detect_checkpoint_prediction_type(ARCHITECTURES["sd15"], wide)[0] == "epsilon"  # SD1 has no v models
    with pytest.raises(ValueError, match="EDM"):
        detect_checkpoint_prediction_type(ARCHITECTURES["sdxl"], {"edm_vpred.sigma_max": torch.tensor(80.0)})


# -- bad input ---------------------------------------------------------------------------------


def _save(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_unknown_architecture_names_what_was_found(tmp_path):
    flux_like = {"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(128),
                 "img_in.weight": torch.ones(8, 64), "img_in.bias": torch.ones(8)}
    with pytest.raises(ValueError) as info:
        load_base_model(_save(tmp_path, "flux.safetensors", flux_like))
    message = str(info.value)
    assert "unsupported checkpoint architecture" in message
    assert "double_blocks" in message and "flux" in message  # what was found, and diffusers' name for it
    assert "SD1.x" in message and "SDXL" in message             # what is supported


def test_lora_file_and_other_sd_variants_are_refused(tmp_path, tiny):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32)}
    with pytest.raises(ValueError, match="LoRA file, not a base model"):
        load_base_model(_save(tmp_path, "lora.safetensors", lora))

    state_dict = load_file(str(tiny["sd15"].checkpoint))
    inpaint = dict(state_dict)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint[key] = torch.ones(inpaint[key].shape[0], 9, 3, 3)
    with pytest.raises(ValueError, match="9 input channels"):
        load_base_model(_save(tmp_path, "inpaint.safetensors", inpaint))

    sdxl = load_file(str(tiny["sdxl"].checkpoint))
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in sdxl.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ValueError, match="SDXL refiner"):
        load_base_model(_save(tmp_path, "refiner.safetensors", refiner))

    no_text = {k: v for k, v in state_dict.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ValueError, match="no text encoder weights"):
        load_base_model(_save(tmp_path, "unet-vae.safetensors", no_text))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors") as info:
        load_base_model(tmp_path / "missing.safetensors")
    assert "models/checkpoints" in str(info.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_base_model(tmp_path / "empty_dir")


def test_folder_with_missing_component(tiny, tmp_path):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(tiny["sd15"].folder, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        load_base_model(folder)


def test_corrupt_files_are_clear_errors(tiny, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny["sd15"].checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot read this checkpoint"):
        load_base_model(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read this checkpoint"):
        load_base_model(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        load_base_model(text)


def test_weights_not_fitting_the_configs(tiny):
    # The tiny checkpoint against the shipped full-size SD1.5 configs.
    with pytest.raises(ValueError, match="do not fit the sd15 config") as info:
        load_base_model(tiny["sd15"].checkpoint)
    assert "config_dir" in str(info.value)


# -- shipped configs and tokenizer -------------------------------------------------------------

# Parameter counts of the published models (diffusers / transformers modules).
PUBLISHED_SIZES = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    # SD2's text encoder: OpenCLIP ViT-H/14 text tower minus its last layer (penultimate conditioning).
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_shipped_configs_describe_the_published_models(arch):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIG_ROOT / arch
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet"))),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"))),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))),
    }
    for name, expected in PUBLISHED_SIZES[arch].items():
        with init_empty_weights():
            module = builders[name]()
        assert sum(p.numel() for p in module.parameters()) == expected, (arch, name)
    index = json.loads((folder / "model_index.json").read_text())
    assert {k for k, v in index.items() if isinstance(v, list) and v[0]} == {
        p.name for p in folder.iterdir() if p.is_dir()}
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"] == 1000


def test_offline_clip_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    ours = build_clip_tokenizer()
    reference = SimpleTokenizer()
    for text in ["a photo of a cat", "Portrait, oil-painting; 4k!!", "naïve café — über"]:
        ids = ours(text).input_ids
        assert ids == [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]
    assert len(ours) == 49408
    padded = build_clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=77).input_ids
    assert padded[-1] == 0 and len(padded) == 77  # "!" is id 0, SD2 / SDXL-G padding


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_shipped_tokenizers_load(arch):
    folder = CONFIG_ROOT / arch
    names = ["tokenizer", "tokenizer_2"] if arch == "sdxl" else ["tokenizer"]
    for name in names:
        tokenizer = model_loading.load_clip_tokenizer(folder / name)
        assert tokenizer.model_max_length == 77
        assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
