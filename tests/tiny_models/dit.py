"""Tiny random-weight DiT models (FLUX.1-dev / -schnell, FLUX.2-klein, Z-Image) in the files ComfyUI
users have: a diffusion model in ComfyUI's layout (``diffusion_models/``), text encoders as ComfyUI's
loaders read them (``text_encoders/``), a VAE in the ldm layout (``vae/``), and next to the diffusion
model a ``<stem>.configs/`` folder describing the tiny sizes (the shipped configs describe the
released sizes; the tokenizers in it are the real, shipped ones).

How the diffusion-model file is written: a diffusers transformer at the tiny size, mapped to ComfyUI's
keys by inverting diffusers' own single-file converter (``to_comfy_layout`` feeds the converter
tensors of element ids and reads where each id lands), against ComfyUI's key -> shape table for that
size. The tables are recorded in ``tests/data/dit_layouts.json`` by this file run as a script with
ComfyUI importable (``COMFYUI_PATH=... python tests/tiny_models/dit.py``); with COMFYUI_PATH the tests
check that ComfyUI 0.33 still builds exactly those tables and detects and loads the files.

Sizes where one file fits ComfyUI's model and diffusers' (FINDINGS.md Q1): FLUX.1 / klein at width
128 (one head of 128: ComfyUI fixes the head width), one double and one single block; Z-Image at width
1152 (9 heads of 128 with the real rope axes; ComfyUI's and diffusers' FFN and timestep MLP agree only
for widths >= 1056 that are multiples of 96), one layer. ComfyUI detects Z-Image only at width 3840, so
its tests build ComfyUI's ZImage model directly (``comfy_zimage_unet_config``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

LAYOUTS_FILE = Path(__file__).resolve().parents[1] / "data" / "dit_layouts.json"
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "models" / "configs"

TINY = {
    "flux_hidden": 128, "flux_double": 1, "flux_single": 1,
    "t5_dim": 32, "clip_dim": 32, "qwen_dim": 32,
    "qwen_layers": {"flux2_klein": 28, "zimage": 3},  # klein reads layers 9/18/27; ComfyUI needs |-2| < n for Z-Image
    "zimage_dim": 1152, "zimage_heads": 9, "zimage_axes": (32, 48, 48), "zimage_layers": 1,
}
# name -> (family, shipped variant whose non-size facts it takes)
MODELS = {"flux1-dev": ("flux1", "flux1-dev"), "flux1-schnell": ("flux1", "flux1-schnell"),
          "flux2-klein": ("flux2_klein", "flux2-klein-4b"), "zimage": ("zimage", "zimage")}
TINY_RESOLUTION = 64


def init_weights_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Deterministic random weights: N(0, std) matrices, norm scales 1, small biases (no denormals:
    they slow CPUs ~100x)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            low = name.lower()
            if param.ndim == 1 and ("norm" in low or low.endswith("scale")):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
            elif param.is_floating_point():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


# -- tiny diffusers modules --------------------------------------------------------------------------

def tiny_transformer(name: str, seed: int = 0):
    import diffusers

    family = MODELS[name][0]
    if family == "flux1":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=TINY["flux_double"], num_single_layers=TINY["flux_single"],
            attention_head_dim=128, num_attention_heads=1, joint_attention_dim=TINY["t5_dim"],
            pooled_projection_dim=TINY["clip_dim"], guidance_embeds=name == "flux1-dev", axes_dims_rope=(16, 56, 56))
    elif family == "flux2_klein":
        model = diffusers.Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=TINY["flux_double"], num_single_layers=TINY["flux_single"],
            attention_head_dim=128, num_attention_heads=1, joint_attention_dim=3 * TINY["qwen_dim"],
            timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
            eps=1e-6, guidance_embeds=False)
    else:
        model = diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=TINY["zimage_dim"],
            n_layers=TINY["zimage_layers"], n_refiner_layers=2, n_heads=TINY["zimage_heads"],
            n_kv_heads=TINY["zimage_heads"], norm_eps=1e-5, qk_norm=True, cap_feat_dim=TINY["qwen_dim"],
            rope_theta=256.0, t_scale=1000.0, axes_dims=list(TINY["zimage_axes"]), axes_lens=[1536, 512, 512])
    return init_weights_(model, seed).eval()


def tiny_vae(family: str, seed: int = 0):
    import diffusers

    common = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
              "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (32, 32, 32, 32),
              "layers_per_block": 1, "norm_num_groups": 32, "sample_size": TINY_RESOLUTION}
    if family == "flux2_klein":
        vae = diffusers.AutoencoderKLFlux2(**common, latent_channels=32)
        init_weights_(vae, seed, std=0.05)
        with torch.no_grad():  # batch-norm statistics that change the latents (not 0 / 1)
            generator = torch.Generator().manual_seed(seed + 1)
            vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
            vae.bn.running_var.copy_(1.0 + torch.rand(vae.bn.running_var.shape, generator=generator))
        return vae.eval()
    vae = diffusers.AutoencoderKL(**common, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                  scaling_factor=0.3611, shift_factor=0.1159)
    return init_weights_(vae, seed, std=0.05).eval()


def tiny_text_encoders(family: str, seed: int = 0) -> list:
    """The family's text encoders (table order) at the tiny width, full vocabularies (the shipped
    tokenizers' ids index them)."""
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    if family == "flux1":
        clip = CLIPTextModel(CLIPTextConfig(
            hidden_size=TINY["clip_dim"], intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            projection_dim=TINY["clip_dim"], vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1))
        t5 = T5EncoderModel(T5Config(
            vocab_size=32128, d_model=TINY["t5_dim"], d_kv=16, d_ff=64, num_layers=2, num_heads=2,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False))
        return [init_weights_(clip, seed + 1).eval(), init_weights_(t5, seed + 2).eval()]
    qwen = Qwen3Model(Qwen3Config(
        vocab_size=151936, hidden_size=TINY["qwen_dim"], intermediate_size=64,
        num_hidden_layers=TINY["qwen_layers"][family], num_attention_heads=1, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True))
    return [init_weights_(qwen, seed + 3).eval()]


# -- files in ComfyUI's layout ------------------------------------------------------------------------

def comfy_layouts() -> dict[str, dict[str, list[int]]]:
    return json.loads(LAYOUTS_FILE.read_text())


def to_comfy_layout(converter: str, diffusers_sd: dict[str, torch.Tensor],
                    shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The ComfyUI-layout state dict whose conversion (``models.comfy_layout.convert_denoiser``) is
    ``diffusers_sd``: every ComfyUI tensor is filled with element ids, converted, and each id is
    looked up where it lands. Keys the converter drops get ones (1-D) or zeros."""
    from versat2i.models.comfy_layout import convert_denoiser

    ids, offset = {}, 0
    for key, shape in shapes.items():
        count = math.prod(shape)
        ids[key] = torch.arange(offset, offset + count, dtype=torch.float64).reshape(shape)
        offset += count
    traced = convert_denoiser(converter, ids)
    unknown = sorted(set(traced) ^ set(diffusers_sd))
    if unknown:
        raise KeyError(f"{converter}: converter and model disagree on {unknown[:5]}")
    flat = torch.zeros(offset, dtype=torch.float64)
    seen = torch.zeros(offset, dtype=torch.bool)
    for key, id_tensor in traced.items():
        index = id_tensor.flatten().long()
        flat[index] = diffusers_sd[key].detach().flatten().double()
        seen[index] = True
    dtype = next(iter(diffusers_sd.values())).dtype
    out = {}
    for key, shape in shapes.items():
        index = ids[key].flatten().long()
        if seen[index].all():
            out[key] = flat[index].reshape(shape).to(dtype)
        else:
            out[key] = (torch.ones(shape) if len(shape) == 1 else torch.zeros(shape)).to(dtype)
    return out


def text_encoder_file_state(encoder) -> dict[str, torch.Tensor]:
    """A text encoder's tensors as ComfyUI's files hold them: CLIP-L under ``text_model.`` (which
    transformers 5 no longer writes), T5 with ``shared.weight`` only, Qwen3 under ``model.``."""
    from transformers import CLIPTextModel, Qwen3Model

    state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}
    if isinstance(encoder, CLIPTextModel):
        return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
    if isinstance(encoder, Qwen3Model):
        return {"model." + k: v for k, v in state.items()}
    state.pop("encoder.embed_tokens.weight", None)
    return state


def vae_file_state(vae) -> dict[str, torch.Tensor]:
    """The VAE in the ldm layout of ``ae.safetensors`` / ``flux2-vae.safetensors``."""
    from tiny_models.sd import vae_to_ldm

    return {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(vae).items()}


@dataclass
class TinyDit:
    """The files of one tiny DiT model, and the diffusers modules they were written from."""

    name: str
    family: str
    diffusion_model: Path
    text_encoders: list[Path]
    vae: Path
    configs: Path  # the <stem>.configs/ sidecar next to the diffusion model
    modules: dict = field(default_factory=dict)


def write_config_folder(name: str, folder: Path, transformer, vae, text_encoders) -> Path:
    """The shipped variant's config folder, with the tiny modules' own configs."""
    family, variant = MODELS[name]
    shutil.copytree(SHIPPED_CONFIGS / variant, folder, dirs_exist_ok=True)
    transformer.save_config(folder / "transformer")
    vae.save_config(folder / "vae")
    from versat2i.models.architectures import architecture

    for spec, encoder in zip(architecture(family).text_encoders, text_encoders, strict=True):
        encoder.config.save_pretrained(folder / spec.component)
    return folder


def write_tiny_dit(name: str, root: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyDit:
    """``root/diffusion_models/tiny_<name>.safetensors`` (+ its ``.configs/`` sidecar),
    ``root/text_encoders/tiny_<name>_<label>.safetensors`` and ``root/vae/tiny_<name>_vae.safetensors``."""
    from safetensors.torch import save_file

    from versat2i.models.architectures import architecture

    family, _variant = MODELS[name]
    entry = architecture(family)
    transformer = tiny_transformer(name, seed)
    vae = tiny_vae(family, seed)
    encoders = tiny_text_encoders(family, seed)
    folders = {part: root / part for part in ("diffusion_models", "text_encoders", "vae")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    state = to_comfy_layout(entry.denoiser_converter, transformer.state_dict(), comfy_layouts()[name])
    diffusion_model = folders["diffusion_models"] / f"tiny_{name}.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(diffusion_model))
    text_files = []
    for spec, encoder in zip(entry.text_encoders, encoders, strict=True):
        path = folders["text_encoders"] / f"tiny_{name}_{spec.label.lower().replace('-', '')}.safetensors"
        save_file(text_encoder_file_state(encoder), str(path))
        text_files.append(path)
    vae_path = folders["vae"] / f"tiny_{name}_vae.safetensors"
    save_file(vae_file_state(vae), str(vae_path))
    configs = write_config_folder(name, diffusion_model.with_name(diffusion_model.stem + ".configs"), transformer,
                                  vae, encoders)
    return TinyDit(name=name, family=family, diffusion_model=diffusion_model, text_encoders=text_files, vae=vae_path,
                   configs=configs, modules={"transformer": transformer, "vae": vae, "text_encoders": encoders})


# -- ComfyUI's side (import only with ComfyUI importable) ---------------------------------------------------

def comfy_zimage_unet_config(dim: int | None = None, n_layers: int | None = None, cap_feat_dim: int | None = None):
    """The unet config ComfyUI's detector makes for a Z-Image file (comfy/model_detection.py, its
    width-3840 branch) at another width: only dim, heads and axes differ."""
    dim = dim or TINY["zimage_dim"]
    tiny = dim == TINY["zimage_dim"]
    heads = TINY["zimage_heads"] if tiny else dim // 128
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim,
            "cap_feat_dim": cap_feat_dim or TINY["qwen_dim"], "n_layers": n_layers or TINY["zimage_layers"],
            "qk_norm": True, "n_heads": heads, "n_kv_heads": heads,
            "axes_dims": list(TINY["zimage_axes"]) if tiny else [32, 48, 48], "axes_lens": [1536, 512, 512],
            "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
            "pad_tokens_multiple": 32}


def comfy_model_config(name: str):
    """ComfyUI's model config for a tiny model: its own detector on the keys it reads (meta tensors
    at the tiny shapes), or for Z-Image ``supported_models.ZImage`` built directly."""
    import comfy.model_detection
    import comfy.supported_models

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    hidden = TINY["flux_hidden"]
    if name == "zimage":
        return comfy.supported_models.ZImage(comfy_zimage_unet_config())
    skeleton = {"double_blocks.0.img_attn.norm.key_norm.scale": meta(128), "single_blocks.0.linear1.weight": meta(1, 1)}
    if name == "flux2-klein":
        skeleton.update({"img_in.weight": meta(hidden, 128), "txt_in.weight": meta(hidden, 3 * TINY["qwen_dim"]),
                         "double_stream_modulation_img.lin.weight": meta(6 * hidden, hidden)})
    else:
        skeleton.update({"img_in.weight": meta(hidden, 64), "txt_in.weight": meta(hidden, TINY["t5_dim"]),
                         "vector_in.in_layer.weight": meta(hidden, TINY["clip_dim"])})
        if name == "flux1-dev":
            skeleton["guidance_in.in_layer.weight"] = meta(hidden, 256)
    return comfy.model_detection.model_config_from_unet(skeleton, "")


COMFY_CLASSES = {"flux1-dev": "Flux", "flux1-schnell": "FluxSchnell", "flux2-klein": "Flux2", "zimage": "ZImage"}


def require_comfy_family(name: str) -> None:
    """Skip, with the reason, on a ComfyUI that cannot read the tiny model of ``name``."""
    import comfy.supported_models
    import comfyui_version
    import pytest

    if not hasattr(comfy.supported_models, COMFY_CLASSES[name]):
        pytest.skip(f"this ComfyUI ({comfyui_version.__version__}) has no {COMFY_CLASSES[name]} model "
                    "(FLUX.2-klein and Z-Image need ComfyUI 0.33)")
    version = tuple(int(part) for part in comfyui_version.__version__.split(".")[:2])
    if version < (0, 33):
        pytest.skip(f"ComfyUI {comfyui_version.__version__} builds FLUX.1 at width 3072 whatever the file holds "
                    "(its detector hard-codes hidden_size), so the tiny width-128 models need ComfyUI 0.33")


def comfy_model_patcher(name: str, tiny, dtype: torch.dtype = torch.float32):
    """ComfyUI's ModelPatcher of the tiny diffusion-model file (CPU, weights stored in ``dtype``)."""
    import comfy.model_patcher
    import comfy.sd
    from safetensors.torch import load_file

    cpu = torch.device("cpu")
    if name == "zimage":  # detection needs width 3840; the rest is ComfyUI's own code
        state_dict = {k: v.float() for k, v in load_file(str(tiny.diffusion_model)).items()}
        model_config = comfy_model_config(name)
        model_config.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
        model = model_config.get_model(state_dict, "", device=cpu)
        model.load_model_weights(dict(state_dict), "")
        return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    return comfy.sd.load_diffusion_model(str(tiny.diffusion_model), model_options={"dtype": dtype})


def comfy_layout_shapes(name: str) -> dict[str, list[int]]:
    """ComfyUI's key -> shape table of the tiny model, as the real files name the keys (BFL files
    keep ``*_norm.scale``, which ComfyUI renames to ``.weight`` on load)."""
    import comfy.supported_models

    model_config = comfy_model_config(name)
    with torch.device("meta"):
        model = model_config.get_model({}, "")
    shapes = {}
    for key, value in model.diffusion_model.state_dict().items():
        if isinstance(model_config, comfy.supported_models.Flux) and key.endswith("_norm.weight"):
            key = key[: -len(".weight")] + ".scale"
        shapes[key] = list(value.shape)
    return shapes


if __name__ == "__main__":  # record the layouts: COMFYUI_PATH=... python tests/tiny_models/dit.py
    import os

    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(here)]  # its comfy.py shadows ComfyUI
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    LAYOUTS_FILE.write_text(json.dumps({name: comfy_layout_shapes(name) for name in MODELS}, indent=1,
                                       sort_keys=True) + "\n")
    print(f"wrote {LAYOUTS_FILE}")


def write_t5_tokenizer_stand_in(folder: Path) -> Path:
    """A small T5-style tokenizer (``tokenizer.json``: unigram over letters and digits, T5's special
    tokens at T5's ids, ``</s>`` appended) for tests without ComfyUI: FLUX.1's real T5 tokenizer is
    not shipped with the pack (models/split_files.py, ``T5_TOKENIZER_ENV``). Its ids stay below the
    tiny T5's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(symbol, -5.0) for symbol in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.-"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
