"""Tiny random-weight Stable Diffusion models (SD1.5-, SD2- and SDXL-shaped) for offline tests.

Each builder makes the real diffusers / transformers classes with tiny widths (a UNet forward on an
8x8 latent takes milliseconds on one thread) and saves them in the two layouts users have:

* a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder[_2]/``,
  ``tokenizer[_2]/``, ``scheduler/``), and
* a single-file checkpoint in the original (ldm / sgm) layout that ComfyUI users download and that
  ComfyUI's own checkpoint saving writes: ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*`` (SD1.5), ``cond_stage_model.model.*`` (SD2, open_clip layout),
  ``conditioner.embedders.0.transformer.*`` + ``conditioner.embedders.1.model.*`` (SDXL).

diffusers ships only the ldm -> diffusers direction in the library (its inverse lives in repo
scripts, not in the package), so ``diffusers_to_ldm_state_dict`` below writes the inverse by hand;
the tests check it round-trips through diffusers' single-file loader to identical tensors, and,
with ``COMFYUI_PATH``, that ComfyUI's own model detection accepts the same keys.

The tokenizer is a byte-level CLIP BPE vocabulary with no merges (514 tokens): it works offline and
splits any text. The text encoders keep the real 49408-row embedding table anyway (1.6 M
parameters at width 32), because ComfyUI's CLIP model hard-codes that size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 8 like the real one -> 8x8 latents

# --------------------------------------------------------------------------------------------
# tokenizer


def _byte_level_vocab() -> dict[str, int]:
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


TINY_VOCAB_SIZE = 514       # tokens of the byte-level tokenizer
TINY_BOS_ID = 512
TINY_EOS_ID = 513
TEXT_ENCODER_VOCAB = 49408  # embedding rows: ComfyUI's CLIP hard-codes the real vocabulary size


def build_tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over single bytes (no merges): offline, any text, 514 ids.

    ``pad_token="!"`` mirrors the SD2 / SDXL second tokenizer, which pad with "!" instead of the
    end token.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], pad_token=pad_token, model_max_length=77)


# --------------------------------------------------------------------------------------------
# components


def _text_config(hidden: int, layers: int, *, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TEXT_ENCODER_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID,
        pad_token_id=TINY_EOS_ID,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Four levels like the real VAE (8x downsampling, so trainer resolution rules hold), 32 channels
    # (ComfyUI's VAE hard-codes 32 GroupNorm groups).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
    )


def _well_conditioned(*modules: torch.nn.Module) -> None:
    """Norm weights 1 / bias 0; other weights stay at their (small, non-denormal) default init."""
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
                torch.nn.init.ones_(sub.weight)
                torch.nn.init.zeros_(sub.bias)


def tiny_sd15_components(seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler of a tiny SD1.5-shaped model."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,  # SD1.x convention: this is the number of heads (8), as in ComfyUI's SD15
        use_linear_projection=False,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(32, 2, act="quick_gelu"))
    _well_conditioned(unet, vae, text_encoder)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_tiny_tokenizer(),
        "scheduler": DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        ),
    }


def tiny_sd2_components(seed: int = 0, *, prediction_type: str = "v_prediction", text_layers: int = 2) -> dict:
    """A tiny SD2-shaped model: linear transformer projections, open_clip text encoder layout.

    ``text_layers=24`` mirrors the real OpenCLIP-H tower, whose last layer SD2 does not use.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(32, text_layers, act="gelu"))
    _well_conditioned(unet, vae, text_encoder)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_tiny_tokenizer(pad_token="!"),
        "scheduler": DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
        ),
    }


SDXL_TE1_HIDDEN = 32
SDXL_TE2_HIDDEN = 64  # must differ from te1: diffusers tells the two encoders apart by width
SDXL_TE2_PROJECTION = SDXL_TE2_HIDDEN  # square, like SDXL's 1280x1280 (ComfyUI's CLIP assumes it)
SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_components(seed: int = 0) -> dict:
    """unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler (SDXL-shaped)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=SDXL_TE1_HIDDEN + SDXL_TE2_HIDDEN,
        attention_head_dim=(2, 4),  # 16 channels per head at both levels (ComfyUI: num_head_channels=16)
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TE2_PROJECTION + 6 * SDXL_TIME_EMBED_DIM,
    )
    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)
    text_encoder = CLIPTextModel(_text_config(SDXL_TE1_HIDDEN, 3, act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(SDXL_TE2_HIDDEN, 3, act="gelu", projection_dim=SDXL_TE2_PROJECTION)
    )
    _well_conditioned(unet, vae, text_encoder, text_encoder_2)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": build_tiny_tokenizer(),
        "tokenizer_2": build_tiny_tokenizer(pad_token="!"),
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading", prediction_type="epsilon",
        ),
    }


COMPONENT_BUILDERS = {"sd15": tiny_sd15_components, "sd2": tiny_sd2_components, "sdxl": tiny_sdxl_components}


# --------------------------------------------------------------------------------------------
# diffusers -> original (ldm / sgm) keys


def _unet_module_map(unet) -> dict[str, str]:
    """diffusers UNet module path -> ldm module path (prefix level), for any depth / block count.

    Mirrors the tables of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py,
    generalised from the hard-coded SD layout to the config (levels, resnets per level).
    """
    config = unet.config
    levels = len(config.block_out_channels)
    per_block = config.layers_per_block
    assert isinstance(per_block, int), "tiny builders use one layers_per_block for every level"
    modules = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for level in range(levels):
        for j in range(per_block):
            index = 1 + level * (per_block + 1) + j
            modules[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            modules[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        if level < levels - 1:
            index = 1 + level * (per_block + 1) + per_block
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
        has_attention = hasattr(unet.up_blocks[level], "attentions")
        for j in range(per_block + 1):
            index = level * (per_block + 1) + j
            modules[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            modules[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
        if level < levels - 1:
            index = level * (per_block + 1) + per_block
            modules[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if has_attention else 1}.conv"
    return modules


_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _replace_prefix(key: str, table: dict[str, str]) -> str | None:
    # Longest prefix first, so "down_blocks.0.resnets.1" wins over shorter matches.
    for prefix in sorted(table, key=len, reverse=True):
        if key.startswith(prefix + "."):
            return table[prefix] + key[len(prefix):]
    return None


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    modules = _unet_module_map(unet)
    out = {}
    for key, value in unet.state_dict().items():
        new_key = _replace_prefix(key, modules)
        if new_key is None:
            raise KeyError(f"no ldm name for UNet key {key}")
        if ".resnets." in key:
            head, leaf = new_key.rsplit(".", 1)
            block, part = head.rsplit(".", 1)
            new_key = f"{block}.{_UNET_RESNET_PARTS.get(part, part)}.{leaf}"
        out["model.diffusion_model." + new_key] = value.detach().clone()
    return out


_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    modules = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
               "encoder.mid_block.attentions.0": "encoder.mid.attn_1",
               "decoder.mid_block.attentions.0": "decoder.mid.attn_1"}
    for side in ("encoder", "decoder"):
        for k in range(2):
            modules[f"{side}.mid_block.resnets.{k}"] = f"{side}.mid.block_{k + 1}"
    for i in range(levels):
        for j in range(vae.config.layers_per_block + 1):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    out = {}
    for key, value in vae.state_dict().items():
        new_key = _replace_prefix(key, modules) or key
        value = value.detach().clone()
        if ".attn_1." in new_key:
            head, leaf = new_key.rsplit(".", 1)
            for part, ldm_part in _VAE_ATTENTION_PARTS.items():
                if head.endswith("." + part):
                    head = head[: -len(part)] + ldm_part
                    break
            new_key = f"{head}.{leaf}"
            if leaf == "weight" and value.ndim == 2:  # ldm attention projections are 1x1 convs
                value = value[:, :, None, None]
        elif ".block." in new_key or ".block_" in new_key:
            head, leaf = new_key.rsplit(".", 1)
            block, part = head.rsplit(".", 1)
            new_key = f"{block}.{_VAE_RESNET_PARTS.get(part, part)}.{leaf}"
        out["first_stage_model." + new_key] = value
    return out


def _hf_clip_text_keys(text_encoder) -> dict[str, torch.Tensor]:
    """State dict with the ``text_model.`` prefix whatever the transformers version (5.6+ flattened
    CLIPTextModel; CLIPTextModelWithProjection still nests)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value.detach().clone()
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP layout (SD1.5 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``)."""
    return {prefix + key: value for key, value in _hf_clip_text_keys(text_encoder).items()
            if not key.startswith("text_projection.")}


_OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """open_clip layout (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``):
    fused in_proj q/k/v, ``resblocks``, [width, embed] text projection."""
    sd = _hf_clip_text_keys(text_encoder)
    out = {
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    sd.pop("text_model.embeddings.position_ids", None)
    projection = sd.pop("text_projection.weight", None)
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{leaf}") for p in ("q", "k", "v")]
            )
            for part, ldm_part in _OPEN_CLIP_LAYER_PARTS.items():
                out[dst + f"{ldm_part}.{leaf}"] = sd.pop(src + f"{part}.{leaf}")
    if sd:
        raise KeyError(f"unmapped text encoder keys: {sorted(sd)[:5]}")
    return {prefix + key: value for key, value in out.items()}


def diffusers_to_ldm_state_dict(arch: str, components: dict) -> dict[str, torch.Tensor]:
    """One original-layout checkpoint state dict from diffusers components."""
    sd = unet_to_ldm(components["unet"])
    sd.update(vae_to_ldm(components["vae"]))
    if arch == "sd15":
        sd.update(clip_to_ldm(components["text_encoder"], "cond_stage_model.transformer."))
    elif arch == "sd2":
        sd.update(open_clip_to_ldm(components["text_encoder"], "cond_stage_model.model."))
    elif arch == "sdxl":
        sd.update(clip_to_ldm(components["text_encoder"], "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(components["text_encoder_2"], "conditioner.embedders.1.model."))
    else:
        raise ValueError(arch)
    return sd


# --------------------------------------------------------------------------------------------
# saving


_PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                   "sdxl": "StableDiffusionXLPipeline"}


@dataclass(frozen=True)
class TinyModel:
    arch: str
    folder: Path        # diffusers pipeline folder (also usable as ``config_dir``)
    checkpoint: Path    # single-file original-layout .safetensors
    components: dict    # the in-memory modules the files were written from


def save_diffusers_folder(arch: str, components: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": _PIPELINE_CLASS[arch], "_diffusers_version": "0.42.1"}
    libraries = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers",
                 "text_encoder": "transformers", "text_encoder_2": "transformers",
                 "tokenizer": "transformers", "tokenizer_2": "transformers"}
    for name, component in components.items():
        component.save_pretrained(folder / name)
        index[name] = [libraries[name], type(component).__name__]
    if arch != "sdxl":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_model(arch: str, root: Path, *, seed: int = 0, extra_keys: dict | None = None, **kwargs) -> TinyModel:
    """Build, save (folder + single file) and return a tiny model of ``arch`` (sd15 | sd2 | sdxl).

    ``extra_keys`` are added to the single file (e.g. ``{"v_pred": torch.tensor([])}``, the marker
    SDXL v-prediction checkpoints carry).
    """
    from safetensors.torch import save_file

    components = COMPONENT_BUILDERS[arch](seed, **kwargs)
    root = Path(root)
    folder = save_diffusers_folder(arch, components, root / f"tiny-{arch}")
    state_dict = diffusers_to_ldm_state_dict(arch, components)
    state_dict.update(extra_keys or {})
    checkpoint = root / f"tiny-{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(checkpoint))
    return TinyModel(arch=arch, folder=folder, checkpoint=checkpoint, components=components)


def build_tiny_sd15(root: Path, *, seed: int = 0) -> TinyModel:
    return build_tiny_model("sd15", root, seed=seed)


def build_tiny_sd2(root: Path, *, seed: int = 0, prediction_type: str = "v_prediction") -> TinyModel:
    return build_tiny_model("sd2", root, seed=seed, prediction_type=prediction_type)


def build_tiny_sdxl(root: Path, *, seed: int = 0) -> TinyModel:
    return build_tiny_model("sdxl", root, seed=seed)


def unet_inputs(arch: str, *, batch: int = 2, seed: int = 1) -> dict:
    """Deterministic UNet inputs for a tiny model (8x8 latents, 77-token context)."""
    gen = torch.Generator().manual_seed(seed)
    context = {"sd15": 32, "sd2": 32, "sdxl": SDXL_TE1_HIDDEN + SDXL_TE2_HIDDEN}[arch]
    inputs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 77, context, generator=gen),
    }
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, SDXL_TE2_PROJECTION, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


# --------------------------------------------------------------------------------------------
# kohya LoRAs for the tiny models

# SD1.5 kohya LoRAs commonly cover the attention Linears and each transformer's proj_in / proj_out,
# which are 1x1 Conv2d in SD1.5 (use_linear_projection False; kohya writes [r, in, 1, 1] factors).
UNET_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
# The trainer's attention set plus fc1. (Text-encoder attention LoRAs without out_proj, e.g. q/v
# only, are not read by models.lora_files.kohya_to_peft: diffusers' converter cannot infer their format.)
TEXT_ENCODER_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def make_kohya_lora(arch: str, path: Path, *, seed: int, rank: int = 4, alpha: float | None = None,
                    unet_modules=UNET_LORA_MODULES, text_encoder_modules=TEXT_ENCODER_LORA_MODULES,
                    exclude: tuple[str, ...] = (), magnitude: float = 0.3, metadata: dict | None = None) -> Path:
    """A random kohya LoRA file for the tiny ``arch`` model, written as the LoRA trainer writes
    them (peft adapters -> ``models.lora_files.save_kohya_lora``). ``text_encoder_modules=()``: UNet only;
    ``exclude``: module paths containing any of these substrings are left out (a LoRA that skips
    some layers). Up weights are non-zero, so the LoRA visibly changes the model."""
    from peft import LoraConfig, inject_adapter_in_model

    from versat2i.models.lora_files import save_kohya_lora

    with torch.random.fork_rng():
        components = COMPONENT_BUILDERS[arch](0)  # the architecture only: LoRA factors depend on shapes
    unet = components["unet"]
    encoders = [components[name] for name in ("text_encoder", "text_encoder_2") if name in components]

    def targets(module: torch.nn.Module, suffixes) -> list[str]:
        return [name for name, sub in module.named_modules()
                if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(tuple(suffixes))
                and not any(part in name for part in exclude)]

    lora_alpha = alpha if alpha is not None else rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=targets(unet, unet_modules)))
    adapted = []
    for encoder in encoders if text_encoder_modules else ():
        names = targets(encoder, text_encoder_modules)
        if names:
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=names), encoder,
                                    adapter_name="default")
            adapted.append(encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, *adapted):
            for name, parameter in module.named_parameters():
                if "lora_A" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5)
                elif "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * magnitude / rank ** 0.5)
    return save_kohya_lora(path, denoiser=unet, text_encoders=adapted, metadata=metadata or {}, overwrite=True)
