"""The DiT families against real code on both sides (ComfyUI 0.33 in-process, diffusers; skipped
without COMFYUI_PATH, and with the reason on a ComfyUI that lacks a family).

Per family, a tiny random-weight model written in ComfyUI's own file layout (``tiny_models/dit.py``):

1. ComfyUI detects the diffusion-model file as that family (its own ``load_diffusion_model``, no
   mock) and loads every tensor (no "unet missing / unexpected").
2. ``versat2i train-lora`` trains a LoRA on it from the three files.
3. ComfyUI's stock LoraLoaderModelOnly node applies the LoRA: no "lora key not loaded", and the
   model's output changes.
4. diffusers' pipeline ``load_lora_weights`` reports no missing or unexpected keys, and its fused
   weights, mapped to ComfyUI's layout, equal ComfyUI's patched weights (q / k / v fused by ComfyUI
   at row offsets included): both apply the same deltas.

Z-Image: ComfyUI recognises it only at width 3840 (a complete file is >= 1.3 GB). What each test
proves: ``test_comfyui_detects_zimage_at_its_width`` gives ComfyUI a file with the two tensors its
detector reads at the real shapes (ComfyUI says ZImage; so do we); the round trip uses the tiny
width-1152 file, built into ComfyUI's own ``supported_models.ZImage`` model with the detector's
width-3840 settings at that width (``comfy_zimage_unet_config``) and loaded with ComfyUI's
``load_model_weights``: the numerics are ComfyUI's, the detection step is the only bypass.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models.dit import (
    COMFY_CLASSES,
    MODELS,
    comfy_layout_shapes,
    comfy_layouts,
    comfy_model_patcher,
    require_comfy_family,
    to_comfy_layout,
)
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config

pytestmark = [pytest.mark.comfy, pytest.mark.family, pytest.mark.usefixtures("t5_tokenizer_for_flux1")]

PIPELINE_OTHERS = {"flux1": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                   "flux2_klein": ("text_encoder", "tokenizer"), "zimage": ("text_encoder", "tokenizer")}


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def capture(*loggers: str):
    handler = Messages()
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    return handler


def release(handler, *loggers: str):
    for name in loggers:
        logging.getLogger(name).removeHandler(handler)


@pytest.fixture(scope="module")
def tiny_models(tiny_dits):
    return tiny_dits  # tests/conftest.py


def comfy_model(name: str, tiny):
    """ComfyUI's ModelPatcher of the tiny diffusion-model file (fp32, CPU)."""
    return comfy_model_patcher(name, tiny)


def comfy_inputs(name: str, seed: int = 0):
    """(x_t, sigma, apply_model kwargs) at the tiny widths."""
    generator = torch.Generator().manual_seed(seed)
    family = MODELS[name][0]
    channels, side = {"flux1": (16, 8), "flux2_klein": (128, 4), "zimage": (16, 8)}[family]
    x = torch.randn(1, channels, side, side, generator=generator)
    width = {"flux1": 32, "flux2_klein": 96, "zimage": 32}[family]
    context = torch.randn(1, 7, width, generator=generator)
    kwargs = {"c_crossattn": context}
    if family == "flux1":
        kwargs["y"] = torch.randn(1, 32, generator=generator)
        kwargs["guidance"] = torch.tensor([3.5])
    if family == "zimage":
        kwargs["num_tokens"] = context.shape[1]
    return x, torch.tensor([0.6]), kwargs


def train_with_cli(tiny, root: Path) -> Path:
    from versat2i.cli import main
    from versat2i.rewards import registry

    dataset = make_kohya_dataset(root / "dataset", aspects={"aesthetics": 2}, images_per_aspect=2)
    config = tiny_lora_config(root, tiny.diffusion_model, dataset, text_encoders=tuple(map(str, tiny.text_encoders)),
                              vae=str(tiny.vae), max_train_steps=3, checkpointing_steps=100, learning_rate=5e-3,
                              train_feed_forward=True)
    # The command registers the demo world's scorers in this process, which ComfyUI never does:
    # restored, so the in-process tests after this one see the scorer lists ComfyUI shows.
    scorers = dict(registry.SCORERS)
    try:
        assert main(["train-lora", "--config", str(config.save(root / "lora.toml")), "--cpu", "--quiet"]) == 0
    finally:
        registry.SCORERS.clear()
        registry.SCORERS.update(scorers)
    return config.output_path


def diffusers_fused(tiny, lora_path: Path) -> tuple[dict, list[str]]:
    """The diffusers transformer (loaded from the tiny files by our loader) after the family
    pipeline's ``load_lora_weights`` + ``fuse_lora``; and the loader's warnings."""
    import diffusers

    from versat2i.models.split_files import inspect_model_files, load_model_files

    files = inspect_model_files(tiny.diffusion_model, tiny.text_encoders, tiny.vae)
    transformer = load_model_files(files)["denoiser"]
    others = {name: None for name in PIPELINE_OTHERS[tiny.family]}
    pipe = getattr(diffusers, files.architecture.pipeline_class)(transformer=transformer, scheduler=None, vae=None,
                                                                 **others)
    handler = capture("diffusers")
    try:
        pipe.load_lora_weights(str(lora_path), adapter_name="aspect")
    finally:
        release(handler, "diffusers")
    # FluxPipeline notes that its (absent) text encoders got no LoRA keys: not a key problem.
    warnings = [m for m in handler.lines if ("missing" in m.lower() or "unexpected" in m.lower()
                                             or "not found" in m.lower()) and "NoneType" not in m]
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the peft wrappers
    return {k: v.detach().clone() for k, v in transformer.state_dict().items()}, warnings


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_trained_lora_loads_fully_in_comfyui_and_diffusers(comfy, comfy_dirs, tiny_models, tmp_path, name):
    import comfy.utils

    import nodes as comfy_nodes

    require_comfy_family(name)
    tiny = tiny_models(name)
    handler = capture("")
    try:
        patcher = comfy_model(name, tiny)
    finally:
        release(handler, "")
    assert type(patcher.model.model_config).__name__ == COMFY_CLASSES[name]
    assert not [m for m in handler.lines if "unet missing" in m or "unet unexpected" in m], handler.lines

    lora_path = train_with_cli(tiny, tmp_path)
    lora = comfy.utils.load_torch_file(str(lora_path))
    modules = {k.rsplit(".lora_", 1)[0] for k in lora}
    assert modules and all(k.startswith("transformer.") for k in lora)
    (comfy_dirs["models"] / "loras").mkdir(exist_ok=True)
    shutil.copyfile(lora_path, comfy_dirs["models"] / "loras" / "aspect.safetensors")

    x, sigma, kwargs = comfy_inputs(name)
    base_weights = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    with torch.no_grad():
        before = patcher.model.apply_model(x, sigma, **kwargs)
    handler = capture("")
    try:  # the stock node, as a workflow runs it
        (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "aspect.safetensors", 1.0)
    finally:
        release(handler, "")
    assert [m for m in handler.lines if "lora key not loaded" in m] == []
    assert patched.patches, "ComfyUI applied no patch"
    patched.patch_model()
    try:
        comfy_weights = {k: v.detach().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
        with torch.no_grad():
            after = patched.model.apply_model(x, sigma, **kwargs)
    finally:
        patched.unpatch_model()
    assert (after - before).abs().max() > 1e-4, "the LoRA does not change ComfyUI's output"

    fused, warnings = diffusers_fused(tiny, lora_path)
    assert warnings == []
    shapes = comfy_layouts()[name]
    family = MODELS[name][0]
    from versat2i.models.architectures import architecture

    expected = to_comfy_layout(architecture(family).denoiser_converter, fused, shapes)
    comfy_keys = {k.replace("_norm.scale", "_norm.weight"): k for k in shapes}
    changed = 0
    for comfy_key, file_key in comfy_keys.items():
        got, want, base = comfy_weights[comfy_key], expected[file_key], base_weights[comfy_key]
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), comfy_key
        changed += not torch.equal(got, base)
    # every LoRA module moved a ComfyUI weight (ComfyUI fuses q / k / v: fewer weights than modules)
    assert 0 < changed <= len(modules)
    assert len(patched.patches) == changed


@pytest.mark.parametrize("name", list(MODELS))
def test_dit_layouts_are_comfyuis(comfy, name):
    """The recorded key -> shape tables the tiny files are written from are what this ComfyUI builds."""
    require_comfy_family(name)
    assert comfy_layout_shapes(name) == comfy_layouts()[name]


def test_comfyui_detects_zimage_at_its_width(comfy, tmp_path):
    """A file with only the tensors ComfyUI's detector reads, at Z-Image's real shapes (3840 wide):
    ComfyUI's detector and ours both call it Z-Image."""
    import comfy.model_detection
    from safetensors.torch import save_file

    from versat2i.models.architectures import detect_diffusion_model, detect_variant

    require_comfy_family("zimage")
    tensors = {"cap_embedder.1.weight": torch.zeros(3840, 2560, dtype=torch.bfloat16),
               "noise_refiner.0.attention.k_norm.weight": torch.ones(128, dtype=torch.bfloat16)}
    assert type(comfy.model_detection.model_config_from_unet(tensors, "")).__name__ == "ZImage"
    path = tmp_path / "zimage_detect.safetensors"
    save_file(tensors, str(path))
    from versat2i.models.comfy_layout import read_header

    shapes = read_header(path).shapes
    architecture = detect_diffusion_model(shapes)
    assert architecture.name == "zimage" and detect_variant(architecture, shapes).name == "zimage"


@pytest.mark.parametrize("family, folder, comfy_tokenizer", [
    ("flux1", "flux1-dev/tokenizer_2", ("comfy.text_encoders.sd3_clip", "T5XXLTokenizer")),
    ("flux2_klein", "flux2-klein-4b/tokenizer", ("comfy.text_encoders.flux", "KleinTokenizer")),
    ("zimage", "zimage/tokenizer", ("comfy.text_encoders.z_image", "ZImageTokenizer")),
])
def test_shipped_tokenizers_give_comfyuis_ids(comfy, family, folder, comfy_tokenizer):
    """The tokenizers shipped for training give the ids ComfyUI's tokenizers give the same prompt
    (through the diffusers pipeline's own prompt template)."""
    import importlib

    from versat2i.models.loading import CONFIG_ROOT
    from versat2i.models.split_files import load_tokenizer

    try:
        module = importlib.import_module(comfy_tokenizer[0])
    except ModuleNotFoundError:
        module = None
    if not hasattr(module, comfy_tokenizer[1]):
        pytest.skip(f"this ComfyUI has no {comfy_tokenizer[1]}")
    theirs = getattr(module, comfy_tokenizer[1])()
    ours = load_tokenizer(CONFIG_ROOT / folder)
    for prompt in ("a photo of a cat", "Ein Hund, 3 Äpfel & 東京タワー at 5:30pm!!"):
        tokens = theirs.tokenize_with_weights(prompt)  # {encoder: batches} or, for one tokenizer, the batches
        batches = next(iter(tokens.values())) if isinstance(tokens, dict) else tokens
        comfy_ids = [t[0] for t in batches[0]]
        if family == "flux1":  # T5: no template
            text = prompt
        else:  # the pipelines' Qwen3 chat template (klein without thinking, Z-Image with)
            text = ours.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=family == "zimage")
        ids = ours(text)["input_ids"]
        assert comfy_ids[: len(ids)] == ids, prompt


# -- DiT Model Files -> Train Aspect LoRA / Train Gate, with the files ComfyUI users pick ------------------------

def place_in_comfyui(tiny, models: Path) -> dict[str, str]:
    """The tiny model's files in ComfyUI's folders; the DiT Model Files input values that pick them."""
    import folder_paths

    for folder in ("diffusion_models", "text_encoders", "vae"):
        shutil.copytree(tiny.diffusion_model.parents[1] / folder, models / folder, dirs_exist_ok=True)
    folder_paths.filename_list_cache.clear()
    names = [p.name for p in tiny.text_encoders]
    return {"diffusion_model": tiny.diffusion_model.name, "text_encoder": names[0],
            "text_encoder_2": names[1] if len(names) > 1 else "none", "vae": tiny.vae.name}


NODE_TRAINING = dict(steps=2, learning_rate=1e-2, rank=4, alpha=4.0, batch_size=2, resolution=64, seed=3,
                     mixed_precision="no", checkpoint_every=100, cache_latents=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_the_train_node_trains_from_split_files(comfy, comfy_dirs, tiny_models, name):
    import comfy.utils

    import nodes as comfy_nodes
    from versat2i.nodes import dit_model_files, train_aspect_lora

    require_comfy_family(name)
    tiny = tiny_models(name)
    files = place_in_comfyui(tiny, comfy_dirs["models"])
    make_kohya_dataset(comfy_dirs["output"] / "versat2i" / "ds", images_per_aspect=2)
    assert dit_model_files.DiTModelFiles.validate_inputs(**files) is True
    (model_files,) = dit_model_files.DiTModelFiles.execute(**files).result
    previews = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: previews.append(preview) if preview else None)
    try:
        output = train_aspect_lora.TrainAspectLora.execute(
            dataset="versat2i/ds", aspect="aesthetics", ckpt_name="none", lora_name="", sample_every_n_steps=2,
            model_files=model_files, **NODE_TRAINING)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    lora_name = output.result[0]
    assert previews and previews[-1][0] == "PNG" and previews[-1][1].size == (64, 64)  # the node showed a preview

    patcher = comfy_model(name, tiny)
    x, sigma, kwargs = comfy_inputs(name)
    with torch.no_grad():
        before = patcher.model.apply_model(x, sigma, **kwargs)
    handler = capture("")
    try:
        (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, lora_name, 1.0)
    finally:
        release(handler, "")
    assert [m for m in handler.lines if "lora key not loaded" in m] == []
    patched.patch_model()
    try:
        with torch.no_grad():
            after = patched.model.apply_model(x, sigma, **kwargs)
    finally:
        patched.unpatch_model()
    assert (after - before).abs().max() > 1e-5


def test_dit_model_files_refuses_mismatched_files_at_queue_time(comfy, comfy_dirs, tiny_models):
    """validate_inputs reads the files' headers and names the input at fault."""
    from versat2i.nodes import dit_model_files

    klein, flux = tiny_models("flux2-klein"), tiny_models("flux1-dev")
    files = place_in_comfyui(klein, comfy_dirs["models"])
    flux_files = place_in_comfyui(flux, comfy_dirs["models"])
    validate = dit_model_files.DiTModelFiles.validate_inputs
    message = validate(**{**files, "vae": flux_files["vae"]})
    assert message.startswith("vae: ") and "FLUX.1's VAE" in message and "flux2-vae.safetensors" in message
    message = validate(**{**files, "text_encoder": flux_files["text_encoder_2"]})
    assert message.startswith("text_encoder: ") and "T5-XXL" in message
    message = validate(**{**flux_files, "text_encoder_2": "none"})
    assert message.startswith("text_encoder: ") and "T5-XXL" in message and "t5xxl_fp16.safetensors" in message
    message = validate(**{**files, "diffusion_model": "missing.safetensors"})
    assert message.startswith("diffusion_model 'missing.safetensors'")
    with pytest.raises(ValueError, match="^vae: "):  # when the node runs too (a prompt that skipped validation)
        dit_model_files.DiTModelFiles.execute(**{**files, "vae": flux_files["vae"]})


def test_a_dit_mismatch_is_reported_on_dit_model_files_inputs_only(comfy, comfy_dirs, comfy_nodes, tiny_models,
                                                                  monkeypatch):
    """Through ComfyUI's own queue-time validation: a FLUX.1 VAE with FLUX.2-klein is an error on the
    DiT Model Files node's file inputs (ComfyUI attaches its validate_inputs message to each input it
    takes); the trainers it feeds report nothing of their own, and nothing runs."""
    import folder_paths
    from queue_check import api_node, queue_errors

    files = place_in_comfyui(tiny_models("flux2-klein"), comfy_dirs["models"])
    flux_files = place_in_comfyui(tiny_models("flux1-dev"), comfy_dirs["models"])
    (comfy_dirs["models"] / "checkpoints").mkdir()
    folder_paths.filename_list_cache.clear()
    dit, lora, gate = (comfy_nodes[f"VersaT2I_{name}"] for name in ("DiTModelFiles", "TrainAspectLoRA", "TrainGate"))
    before = sorted(comfy_dirs["output"].rglob("*"))
    prompt = {"1": api_node(dit, **{**files, "vae": flux_files["vae"]}),
              "2": api_node(lora, ckpt_name="none", model_files=["1", 0]),
              "3": api_node(gate, ckpt_name="none", model_files=["1", 0], lora_1=["2", 0],
                            loras="versat2i/other.safetensors")}
    errors = queue_errors(monkeypatch, [dit, lora, gate], prompt)
    assert list(errors) == ["1"], errors
    assert sorted(error["extra_info"]["input_name"] for error in errors["1"]) == sorted(
        ["diffusion_model", "text_encoder", "text_encoder_2", "vae"])
    assert all("vae: " in error["details"] and "FLUX.1's VAE" in error["details"] for error in errors["1"])
    assert sorted(comfy_dirs["output"].rglob("*")) == before
    prompt["1"] = api_node(dit, **files)  # the matching files: the whole prompt passes
    assert queue_errors(monkeypatch, [dit, lora, gate], prompt) == {}


@pytest.mark.slow
def test_train_gate_trains_a_gate_over_two_dit_loras_from_dit_model_files(comfy, comfy_dirs, tiny_models):
    """DiT Model Files feeds Train Aspect LoRA and Train Gate (issue 13): the LoRA trains on the DiT,
    and the gate trains over it and a second LoRA of another aspect, on the same DiT, with ckpt_name
    'none'. The MoL file names the DiT's LoRAs and records its steps."""
    from safetensors.torch import load_file, save_file

    from versat2i.models.lora_files import read_lora_metadata
    from versat2i.nodes import dit_model_files, train_aspect_lora, train_gate
    from versat2i.trainer.mol_file import read_mol

    require_comfy_family("zimage")
    files = place_in_comfyui(tiny_models("zimage"), comfy_dirs["models"])
    make_kohya_dataset(comfy_dirs["output"] / "versat2i" / "ds", aspects={"aesthetics": 1, "geometry": 1},
                       images_per_aspect=2)
    (model_files,) = dit_model_files.DiTModelFiles.execute(**files).result
    trained = train_aspect_lora.TrainAspectLora.execute(
        dataset="versat2i/ds", aspect="aesthetics", ckpt_name="none", lora_name="dit_aesthetics",
        model_files=model_files, **{**NODE_TRAINING, "steps": 1})
    (lora_name, _curve) = trained.result
    assert lora_name == "versat2i/dit_aesthetics.safetensors"
    loras = comfy_dirs["models"] / "loras" / "versat2i"
    state, metadata = load_file(str(loras / "dit_aesthetics.safetensors")), read_lora_metadata(
        loras / "dit_aesthetics.safetensors")
    save_file({k: -v if ".lora_B." in k or "lora_up" in k else v for k, v in state.items()},
              str(loras / "dit_geometry.safetensors"), metadata={**metadata, "versat2i_aspect": "geometry"})

    output = train_gate.TrainGate.execute(
        dataset="versat2i/ds", ckpt_name="none", loras="", mol_name="dit_mix", lora_1=lora_name,
        lora_2="versat2i/dit_geometry.safetensors", model_files=model_files, granularity="layer",
        gate_kind="sigmoid", timestep_knots=0, balance_loss="mole", objective="denoise", balance_weight=0.01,
        steps=2, learning_rate=1e-2, batch_size=2, resolution=64, seed=0, mixed_precision="no",
        cache_latents=False, checkpoint_every=100)
    assert output.result[0] == "versat2i/dit_mix.mol.safetensors"
    mol = read_mol(loras / "dit_mix.mol.safetensors")
    assert mol.aspects == ("aesthetics", "geometry") and mol.training["steps"] == 2


# -- Generate Candidates with each family's MODEL / CLIP / VAE in ComfyUI -----------------------------------

def comfy_clip(name: str, tiny):
    """ComfyUI's CLIP for the tiny text-encoder files. ComfyUI builds CLIP-L, T5-XXL and Qwen3 from
    fixed configs, so the tiny widths go in as config overrides (FINDINGS Q2); the files and the
    loader code are ComfyUI's own."""
    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.text_encoders.z_image
    from comfy.supported_models_base import ClipTarget
    from safetensors.torch import load_file

    family = MODELS[name][0]
    encoders = tiny.modules["text_encoders"]
    if family == "flux1":
        clip_config, t5_config = encoders[0].config, encoders[1].config
        options = {"model_config": {k: getattr(clip_config, k) for k in (
                       "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                                                         "projection_dim")},
                   "t5xxl_model_config": {k: getattr(t5_config, k) for k in (
                       "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                       "relative_attention_max_distance")},
                   "dtype": torch.float32}
        return comfy.sd.load_clip([str(p) for p in tiny.text_encoders], clip_type=comfy.sd.CLIPType.FLUX,
                                  model_options=options)
    config = encoders[0].config
    overrides = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads")}
    target = (ClipTarget(comfy.text_encoders.flux.KleinTokenizer,
                         comfy.text_encoders.flux.klein_te(model_type="qwen3_4b"))
              if family == "flux2_klein" else
              ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer, comfy.text_encoders.z_image.te()))
    return comfy.sd.CLIP(target=target, state_dict=[load_file(str(tiny.text_encoders[0]))],
                         model_options={"qwen3_4b_model_config": overrides, "dtype": torch.float32})


def comfy_vae(family: str, folder: Path):
    """ComfyUI's VAE from an ldm-layout file ComfyUI reads as this family's (its VAE loader fixes the
    encoder at 128 channels, the real width; the decoder is small)."""
    import comfy.sd
    import diffusers
    from safetensors.torch import save_file
    from tiny_models.dit import init_weights_, vae_file_state

    common = {"block_out_channels": (128, 256, 512, 512), "decoder_block_out_channels": None, "layers_per_block": 2,
              "norm_num_groups": 32, "sample_size": 64}
    if family == "flux2_klein":
        vae = diffusers.AutoencoderKLFlux2(**{**common, "decoder_block_out_channels": (32, 64, 128, 128)},
                                           latent_channels=32)
    else:
        common.pop("decoder_block_out_channels")
        vae = diffusers.AutoencoderKL(**common, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",
                                                                                                    ) * 4)
    init_weights_(vae, 5, std=0.02)
    path = folder / f"{family}_comfy_vae.safetensors"
    save_file(vae_file_state(vae), str(path))
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-dev", "flux2-klein", "zimage"])
def test_generate_candidates_samples_each_family_as_a_core_ksampler(comfy, tiny_models, tmp_path, name):
    """Image i of Generate Candidates equals ComfyUI's core KSampler with seed i on the family's own
    empty latent (EmptySD3LatentImage's 16 channels at 1/8, EmptyFlux2LatentImage's 128 at 1/16)."""
    import importlib

    import comfy.utils  # noqa: F401

    import nodes as comfy_nodes

    require_comfy_family(name)
    tiny = tiny_models(name)
    family = MODELS[name][0]
    model, clip, vae = comfy_model(name, tiny), comfy_clip(name, tiny), comfy_vae(family, tmp_path)
    node = importlib.import_module("versat2i.nodes.generate_candidates")
    output = node.GenerateCandidates.execute(
        model=model, clip=clip, vae=vae, prompts="a red circle\na blue square", k=2, seed=40, steps=2, cfg=1.0,
        sampler_name="euler", scheduler="simple", width=64, height=64, batch_size=2, negative_prompt="",
        prompts_file="")
    images, candidates, latent = output.args
    channels, side = {"flux2_klein": (128, 4)}.get(family, (16, 8))
    assert images.shape == (4, 64, 64, 3) and latent["samples"].shape == (4, channels, side, side)
    assert candidates["seeds"] == [40, 41, 42, 43]
    for index, (prompt, seed) in enumerate(zip(candidates["prompts"], candidates["seeds"], strict=True)):
        positive = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        empty = torch.zeros(1, channels, side, side)
        expected = comfy_nodes.common_ksampler(model, seed, 2, 1.0, "euler", "simple", positive, negative,
                                               {"samples": empty})[0]["samples"]
        got = latent["samples"][index:index + 1]
        assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max())), (name, index)
    assert torch.isfinite(images).all() and images.std() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_training_convention_is_what_comfyui_samples(comfy, tiny_models, name):
    """On the same weights, ComfyUI's denoised prediction x0 equals x_t - sigma * v with v from the
    trainer's call convention (packing, ids, timestep direction, sign, FLUX.1-dev's guidance): what
    a LoRA learns is what ComfyUI samples with."""
    from versat2i.models.flow_matching import predict_velocity
    from versat2i.models.loading import load_base_model

    require_comfy_family(name)
    tiny = tiny_models(name)
    patcher = comfy_model(name, tiny)
    base = load_base_model(tiny.diffusion_model, text_encoders=tiny.text_encoders, vae=tiny.vae, compute_hash=False)
    x0, _, kwargs = comfy_inputs(name, seed=1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    cond = {"prompt_embeds": kwargs["c_crossattn"]}
    if "y" in kwargs:
        cond["pooled_prompt_embeds"] = kwargs["y"]
    for sigma in (0.9, 0.5, 0.1):
        x_t = (1 - sigma) * x0 + sigma * noise
        with torch.no_grad():
            velocity = predict_velocity(base, base.denoiser, x_t, torch.tensor([sigma]), cond, guidance=3.5)
            comfy_x0 = patcher.model.apply_model(x_t, torch.tensor([sigma]), **kwargs)
        ours = x_t - sigma * velocity
        assert (comfy_x0 - ours).abs().max() <= 1e-4 * max(1.0, float(ours.abs().max())), (name, sigma)
