"""models.lora_files: peft LoRA -> kohya file -> back, and what diffusers makes of the file.

Offline, tiny random-weight models (tests/tiny_models/sd.py). LoRA B matrices are randomised (peft
initialises them to zero, which would make every output comparison trivially pass).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from tiny_models.sd import build_tiny_model, unet_inputs

from versat2i.models.loading import load_base_model, tokenize_prompts
from versat2i.models.lora_files import get_lora_target, kohya_to_peft, load_kohya_lora, peft_to_kohya, save_kohya_lora

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
KEY_PATTERN = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lora")
    return {arch: build_tiny_model(arch, root) for arch in ("sd15", "sdxl")}


def add_lora(base, *, unet_alpha=2.0, te_alpha=8.0, rank=4, text_encoders=True, seed=0, **config):
    """Inject peft LoRA into the UNet (and text encoders) with random, non-zero B matrices."""
    from peft import LoraConfig, inject_adapter_in_model

    base.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=unet_alpha, target_modules=UNET_TARGETS,
                                     init_lora_weights="gaussian", **config))
    if text_encoders:
        for encoder in base.text_encoders:
            # transformers 5.24's add_adapter refuses peft 0.21; peft's own injection works.
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=te_alpha, target_modules=TE_TARGETS,
                                               init_lora_weights="gaussian"), encoder)
    generator = torch.Generator().manual_seed(seed)
    for module in (base.denoiser, *base.text_encoders):
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.05
    return base


def _lora_layers(module):
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_saved_keys_are_kohya_with_the_real_alpha(tiny, tmp_path, arch):
    base = add_lora(load_base_model(tiny[arch].folder))
    path = save_kohya_lora(tmp_path / "aspect.safetensors", denoiser=base.denoiser, text_encoders=base.text_encoders,
                           metadata={"versat2i_aspect": "aesthetic", "ss_steps": 40, "hyper": {"lr": 1e-4}})
    state_dict, metadata = load_kohya_lora(path)

    assert all(KEY_PATTERN.match(key) for key in state_dict), [k for k in state_dict if not KEY_PATTERN.match(k)][:5]
    modules = {key.split(".")[0] for key in state_dict}
    for module in modules:  # every module has its down, up and alpha
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= state_dict.keys()
    prefixes = {module.split("_")[1] for module in modules}
    assert prefixes == ({"unet", "te"} if arch == "sd15" else {"unet", "te1", "te2"})

    expected_modules = len(_lora_layers(base.denoiser)) + sum(len(_lora_layers(te)) for te in base.text_encoders)
    assert len(modules) == expected_modules
    for module in modules:
        alpha = float(state_dict[f"{module}.alpha"])
        assert alpha == (2.0 if module.startswith("lora_unet_") else 8.0), module  # lora_alpha, not the rank (4)
        assert state_dict[f"{module}.lora_down.weight"].shape[0] == 4

    assert metadata["versat2i_aspect"] == "aesthetic"
    assert metadata["ss_steps"] == "40" and metadata["hyper"] == '{"lr": 0.0001}'
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["versat2i_modules"] == str(expected_modules)


def test_alpha_reproduces_per_module_and_rslora_scaling(tiny, tmp_path):
    base = add_lora(load_base_model(tiny["sd15"].folder), text_encoders=False, use_rslora=True,
                    alpha_pattern={"to_k": 16.0})
    state_dict, _ = peft_to_kohya(denoiser=base.denoiser)
    layers = _lora_layers(base.denoiser)
    for path, layer in layers.items():
        name = "lora_unet_" + path.replace(".", "_")
        rank = state_dict[f"{name}.lora_down.weight"].shape[0]
        assert float(state_dict[f"{name}.alpha"]) / rank == pytest.approx(layer.scaling["default"], rel=1e-6)
    to_k = next(p for p in layers if p.endswith("to_k"))
    assert layers[to_k].scaling["default"] == pytest.approx(16.0 / math.sqrt(4))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_to_peft_recovers_every_module(tiny, tmp_path, arch):
    base = add_lora(load_base_model(tiny[arch].folder))
    path = save_kohya_lora(tmp_path / "x.safetensors", denoiser=base.denoiser, text_encoders=base.text_encoders,
                           metadata={})
    weights = kohya_to_peft(load_kohya_lora(path)[0], base)

    components = {"unet": base.denoiser, "text_encoder": base.text_encoders[0]}
    if arch == "sdxl":
        components["text_encoder_2"] = base.text_encoders[1]
    expected = {f"{name}.{path}": layer for name, module in components.items()
                for path, layer in _lora_layers(module).items()}
    assert weights.keys() == expected.keys()
    for key, layer in expected.items():
        got = weights[key]
        assert torch.equal(got.down, layer.lora_A["default"].weight), key
        assert torch.equal(got.up, layer.lora_B["default"].weight), key
        assert got.scale == pytest.approx(layer.scaling["default"])
        assert get_lora_target(base, key) is layer.base_layer
    state_dict, _ = load_kohya_lora(path)
    assert {w.kohya_name for w in weights.values()} == {k.split(".")[0] for k in state_dict}


def _pipeline(arch, folder):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_reproduces_the_peft_model(tiny, tmp_path, arch):
    base = add_lora(load_base_model(tiny[arch].folder))
    path = save_kohya_lora(tmp_path / "x.safetensors", denoiser=base.denoiser, text_encoders=base.text_encoders,
                           metadata={})
    pipe = _pipeline(arch, tiny[arch].folder)
    inputs = unet_inputs(arch)
    with torch.no_grad():
        before = pipe.unet(**inputs).sample
        pipe.load_lora_weights(str(path))
        expected = base.denoiser(**inputs).sample
        got = pipe.unet(**inputs).sample
    assert (expected - before).abs().max() > 1e-3  # the LoRA changes the output...
    assert (got - expected).abs().max() <= 1e-5   # ...and diffusers applies exactly the trained one

    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    for tokenizer, ours, theirs in zip(base.tokenizers, base.text_encoders, encoders):
        ids = tokenize_prompts(tokenizer, ["a red cube", "a blue sphere"])
        with torch.no_grad():
            assert (ours(ids, output_hidden_states=True).hidden_states[-2]
                    - theirs(ids, output_hidden_states=True).hidden_states[-2]).abs().max() <= 1e-5


def test_overwrite_is_refused_unless_asked(tiny, tmp_path):
    from versat2i.safe_io import TargetExistsError

    base = add_lora(load_base_model(tiny["sd15"].folder), text_encoders=False)
    path = save_kohya_lora(tmp_path / "x.safetensors", denoiser=base.denoiser, metadata={"run": "1"})
    with pytest.raises(TargetExistsError, match="already exists"):
        save_kohya_lora(path, denoiser=base.denoiser, metadata={"run": "2"})
    assert load_kohya_lora(path)[1]["run"] == "1"
    save_kohya_lora(path, denoiser=base.denoiser, metadata={"run": "2"}, overwrite=True)
    assert load_kohya_lora(path)[1]["run"] == "2"


def test_failed_write_leaves_no_file(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    base = add_lora(load_base_model(tiny["sd15"].folder), text_encoders=False)
    real_save = safetensors.torch.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:3]), filename, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_fail)
    out = tmp_path / "loras"
    with pytest.raises(OSError, match="disk full"):
        save_kohya_lora(out / "x.safetensors", denoiser=base.denoiser, metadata={})
    assert not (out / "x.safetensors").exists()
    assert not out.exists() or list(out.iterdir()) == []  # no temp file left behind either


def test_bad_inputs(tiny, tmp_path):
    base = load_base_model(tiny["sd15"].folder)
    with pytest.raises(ValueError, match="no LoRA adapter named 'default'"):
        save_kohya_lora(tmp_path / "x.safetensors", denoiser=base.denoiser, metadata={})
    add_lora(base, text_encoders=False)
    with pytest.raises(ValueError, match=".safetensors"):
        save_kohya_lora(tmp_path / "x.ckpt", denoiser=base.denoiser, metadata={})
    with pytest.raises(TypeError, match="metadata key"):
        save_kohya_lora(tmp_path / "x.safetensors", denoiser=base.denoiser, metadata={1: "a"})
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_kohya_lora(tmp_path / "nothing.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="LoRA file .*broken.safetensors.*: cannot be read"):
        load_kohya_lora(tmp_path / "broken.safetensors")


def test_kohya_to_peft_refuses_keys_that_do_not_map(tiny, tmp_path):
    sd15 = add_lora(load_base_model(tiny["sd15"].folder))
    state_dict, _ = peft_to_kohya(denoiser=sd15.denoiser, text_encoders=sd15.text_encoders)
    sdxl = load_base_model(tiny["sdxl"].folder)
    with pytest.raises(ValueError, match="do not map onto the sdxl base model"):
        kohya_to_peft(state_dict, sdxl)  # an SD1.5 LoRA on an SDXL model
    broken = dict(state_dict)
    broken["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 32)
    broken["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(ValueError, match="not_a_module"):
        kohya_to_peft(broken, sd15)
    orphan = {k: v for k, v in state_dict.items() if not k.endswith(".lora_up.weight")}
    with pytest.raises(ValueError):
        kohya_to_peft(orphan, sd15)
