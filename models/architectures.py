"""The model families the pack trains and samples, one table entry each: everything that differs
between them lives here, so the code that loads, trains, samples and gates a model asks the entry
instead of testing a family's name (ComfyUI-GGUF keeps its per-architecture facts the same way).

An entry says

* how the family is **detected**: from the keys and shapes of a single-file checkpoint in the
  original layout ComfyUI users have (``detect_single_file``) or from a diffusers folder's
  ``model_index.json`` (``detect_diffusers_folder``);
* its **components**: the denoiser (diffusers class and component name), the text encoders with
  their tokenizers, the VAE's scaling factor for files that ship none, and the configs shipped in
  ``models/configs/<name>/`` for single files;
* its **training objective** (DDPM with epsilon / v / x0 prediction for the SD families) and the
  extra conditioning the denoiser takes (SDXL's pooled text embedding and size/crop ids);
* its **LoRA** targets (peft module names) and file format (kohya names: the ``lora_unet_`` /
  ``lora_te`` prefixes ComfyUI's loader, A1111/Forge and diffusers map; kohya's metadata);
* the diffusers **pipeline** that samples it, the size of the **gate's prompt input** and the span of
  the **gate's timestep input**;
* what a training step keeps in **memory** per pixel (``trainer/memory.py`` estimates a run's peak
  from it before the run starts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..safe_io import readable_name

# -- table fields ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and its tokenizer."""

    component: str  # diffusers component / sub-folder, and the prefix of its LoRA keys: "text_encoder"
    tokenizer: str  # its tokenizer's component / sub-folder: "tokenizer"
    model_class: str  # transformers class: "CLIPTextModel"


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring for what each group of fields is for)."""

    name: str  # "sd15": the value of ``arch`` in configs and metadata
    label: str  # "SD1.x": for people
    # components
    denoiser_class: str  # diffusers class of the denoiser
    denoiser_component: str  # its diffusers component / sub-folder name (and pipeline keyword)
    text_encoders: tuple[TextEncoderSpec, ...]
    vae_scaling_factor: float  # latent scale when a single file ships no VAE
    # denoiser config overrides for a single file read with the shipped configs, by prediction type
    # (one shipped SD2 config serves both the 512 base and the 768-v model: only the sample size differs)
    single_file_denoiser_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # training objective and conditioning
    objective: str = "ddpm"  # ddpm: add_noise + epsilon / v / x0 target
    penultimate_text_hidden_states: bool = False  # the denoiser reads the encoders' second-to-last layer
    pooled_text_embeds: bool = False  # it also takes the last encoder's pooled projection ("text_embeds")
    size_conditioning: bool = False  # and the (original size, crop, target size) ids ("time_ids")
    vae_fp16_overflows: bool = False  # its VAE overflows in float16 (encode in float32 then)
    # a single file's tensor whose spread tells v-prediction from epsilon (ComfyUI's SD2 heuristic)
    v_prediction_probe: str = ""
    # LoRA: peft target names, and the names kohya-style tools give this family
    lora_attention_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_feed_forward_modules: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")
    kohya_base_model_version: str = ""  # kohya's ss_base_model_version
    kohya_v2: bool = False  # kohya's ss_v2 (SD2.x)
    # sampling and the gate
    pipeline_class: str = "StableDiffusionPipeline"
    pipeline_options: Mapping[str, Any] = field(default_factory=dict)
    gate_prompt_features_key: str = "cross_attention_dim"  # denoiser config key: width of the text context
    # training memory (trainer/memory.py): activation bytes per pixel of a training image at batch 1,
    # float32, no gradient checkpointing (a step's VAE encode, text encoder and denoiser forward and
    # backward); and the share of it gradient checkpointing keeps
    activation_bytes_per_pixel: float = 0.0
    checkpointed_activation_share: float = 1.0
    # The denoiser's timestep input at noise level 1 (a timestep gate reads timestep / range): DDPM's
    # num_train_timesteps, what both diffusers and ComfyUI pass the UNet families (0..999). Recorded in
    # the MoL file, so every loader normalises as the trainer did.
    gate_timestep_range: float = 1000.0

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        return tuple(spec.component for spec in self.text_encoders)

    @property
    def tokenizer_components(self) -> tuple[str, ...]:
        return tuple(spec.tokenizer for spec in self.text_encoders)

    def gate_prompt_features(self, denoiser_config: Mapping[str, Any]) -> int:
        """Width of the prompt vector the gate reads (the text context the denoiser attends to)."""
        return int(denoiser_config[self.gate_prompt_features_key])


# Prefixes of the original (ldm / sgm) single-file layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_SD1_CLIP = "cond_stage_model.transformer."
_SD2_OPEN_CLIP = "cond_stage_model.model."
_SDXL_CLIP_L = "conditioner.embedders.0.transformer."
_SDXL_CLIP_G = "conditioner.embedders.1.model."
_SDXL_REFINER_CLIP_G = "conditioner.embedders.0.model."
# Where each family's text encoders sit in a single file, in table order.
SINGLE_FILE_TEXT_ENCODER_PREFIXES = {"sd15": (_SD1_CLIP,), "sd2": (_SD2_OPEN_CLIP,),
                                     "sdxl": (_SDXL_CLIP_L, _SDXL_CLIP_G)}
# ComfyUI's SD2 v-prediction heuristic (comfy/supported_models.py, SD20.model_type).
SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


# -- the table ---------------------------------------------------------------------------------------

# SD1.x's CLIP-L and SD2.x's OpenCLIP-H are both a transformers CLIPTextModel (their tokenizer configs
# in models/configs differ: SD2 pads with "!"); SDXL adds OpenCLIP-G with its text projection.
_CLIP = TextEncoderSpec("text_encoder", "tokenizer", "CLIPTextModel")
_OPEN_CLIP_G = TextEncoderSpec("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")
# The safety checker is a separate download and not a quality model; the pack never runs it.
_SD_PIPELINE_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

_UNET_FAMILY = {"denoiser_class": "UNet2DConditionModel", "denoiser_component": "unet"}
# Training memory, measured on the full-size SD1.5 (random weights, CPU, float32, batch 1, rank 16):
# the trainer's peak RSS at 128 / 256 / 384 px is 5282 / 5875 / 6862 MiB, a straight line of 12.6 KB
# per pixel over 5084 MiB (4067 MiB of weights, the rest the process). With gradient checkpointing,
# 5417 / 6155 MiB at 256 / 384 px: 0.42 / 0.60 of the activations (the VAE encode and the block being
# recomputed stay); 0.6 is taken.
_SD15_ACTIVATION_BYTES_PER_PIXEL = 12_600
_SD15_CHECKPOINTED_SHARE = 0.6

ARCHITECTURES: dict[str, Architecture] = {
    "sd15": Architecture(
        name="sd15", label="SD1.x", **_UNET_FAMILY, text_encoders=(_CLIP,), vae_scaling_factor=0.18215,
        kohya_base_model_version="sd_v1", pipeline_options=_SD_PIPELINE_OPTIONS,
        activation_bytes_per_pixel=_SD15_ACTIVATION_BYTES_PER_PIXEL,
        checkpointed_activation_share=_SD15_CHECKPOINTED_SHARE,
    ),
    "sd2": Architecture(
        name="sd2", label="SD2.x", **_UNET_FAMILY, text_encoders=(_CLIP,), vae_scaling_factor=0.18215,
        single_file_denoiser_overrides={"v_prediction": {"sample_size": 96}, "epsilon": {"sample_size": 64},
                                        "sample": {"sample_size": 64}},
        v_prediction_probe=SD2_V_PROBE, kohya_base_model_version="sd_v2", kohya_v2=True,
        pipeline_options=_SD_PIPELINE_OPTIONS,
        # not measured: SD1.x's UNet layout and widths (linear projections, other head counts)
        activation_bytes_per_pixel=_SD15_ACTIVATION_BYTES_PER_PIXEL,
        checkpointed_activation_share=_SD15_CHECKPOINTED_SHARE,
    ),
    "sdxl": Architecture(
        name="sdxl", label="SDXL", **_UNET_FAMILY, text_encoders=(_CLIP, _OPEN_CLIP_G), vae_scaling_factor=0.13025,
        penultimate_text_hidden_states=True, pooled_text_embeds=True, size_conditioning=True,
        vae_fp16_overflows=True, kohya_base_model_version="sdxl_base_v1-0",
        pipeline_class="StableDiffusionXLPipeline",
        pipeline_options={"force_zeros_for_empty_prompt": True, "add_watermarker": False},
        # not measured (its UNet does not fit this 24 GB build machine beside others): SD1.x's figure
        # lowered by a quarter, as SDXL's largest latent level has no attention; an estimate that errs low
        activation_bytes_per_pixel=0.75 * _SD15_ACTIVATION_BYTES_PER_PIXEL,
        checkpointed_activation_share=_SD15_CHECKPOINTED_SHARE,
    ),
}
ARCHITECTURE_NAMES = tuple(ARCHITECTURES)
SUPPORTED = ("SD1.x, SD2.x (epsilon or v-prediction) and SDXL base, as a single .safetensors checkpoint or a "
             "diffusers folder")


def architecture(name: str) -> Architecture:
    """The table entry called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"arch={name!r}: unknown model family; known: {', '.join(ARCHITECTURES)}") from None


# -- detection: single-file checkpoints in the original (ldm / sgm) layout ---------------------------

@readable_name
class UnsupportedModel(ValueError):
    """The files are no model family of the table (the message says what was found)."""


def _has_prefix(state_dict: Mapping, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def detect_single_file(state_dict: Mapping[str, Any]) -> Architecture:
    """The family of an original-layout state dict, from which key groups exist, the denoiser's
    input channels and its class embedding (structural tests, not exact widths, so tiny test models
    are classified like the real ones). ``UnsupportedModel`` says what the file is instead."""
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(("lora_", "lora_unet_", "lora_te")) for k in state_dict):
            raise UnsupportedModel("this is a LoRA file, not a base model")
        raise UnsupportedModel("no SD-style UNet (model.diffusion_model.input_blocks.*)")
    if conv_in.ndim != 4 or conv_in.shape[1] != 4:
        raise UnsupportedModel(f"UNet takes {conv_in.shape[1] if conv_in.ndim == 4 else '?'} input channels "
                               "(inpainting / instruct-pix2pix models are not supported, only 4-channel text-to-image)")
    if (UNET_PREFIX + "label_emb.0.0.weight") in state_dict:
        if _has_prefix(state_dict, _SDXL_CLIP_L) and _has_prefix(state_dict, _SDXL_CLIP_G):
            return ARCHITECTURES["sdxl"]
        if _has_prefix(state_dict, _SDXL_REFINER_CLIP_G):
            raise UnsupportedModel("SDXL refiner (one OpenCLIP-G text encoder)")
        if _has_prefix(state_dict, _SD2_OPEN_CLIP):
            raise UnsupportedModel("SD2 unCLIP (image-conditioned UNet)")
        raise UnsupportedModel("UNet with a class embedding but no SDXL text encoders (conditioner.embedders.0/1)")
    if _has_prefix(state_dict, _SD1_CLIP):
        return ARCHITECTURES["sd15"]
    if _has_prefix(state_dict, _SD2_OPEN_CLIP):
        return ARCHITECTURES["sd2"]
    raise UnsupportedModel("no text encoder weights (cond_stage_model.transformer.* for SD1.x, "
                           "cond_stage_model.model.* for SD2.x)")


def single_file_prediction_type(arch: Architecture, state_dict: Mapping[str, Any]) -> tuple[str, str]:
    """(prediction_type, why) for a single-file checkpoint, mirroring ComfyUI's model detection: a
    ``v_pred`` key marks v-prediction (``ztsnr`` adds zero-terminal-SNR betas); for SD2 ComfyUI's
    heuristic (std of one norm bias > 0.09 means the 768-v model) decides; else epsilon."""
    import torch

    if "edm_vpred.sigma_max" in state_dict or ("edm_mean" in state_dict and "edm_std" in state_dict):
        raise UnsupportedModel("EDM-parameterised checkpoints (Playground v2.5, EDM v-pred) are not supported for "
                               "LoRA training")
    if "v_pred" in state_dict:
        return "v_prediction", "the checkpoint has a 'v_pred' key"
    if arch.v_prediction_probe:
        probe = state_dict.get(arch.v_prediction_probe)
        if probe is None:
            return "epsilon", ("SD2 checkpoint without ComfyUI's v-prediction probe tensor: assumed epsilon "
                               "(pass prediction_type='v_prediction' for a 768-v model)")
        std = float(torch.std(probe.float(), unbiased=False))
        if std > 0.09:
            return "v_prediction", f"SD2 heuristic (ComfyUI): norm1 bias std {std:.3f} > 0.09 -> 768-v model"
        return "epsilon", f"SD2 heuristic (ComfyUI): norm1 bias std {std:.3f} <= 0.09 -> 512-base model"
    return "epsilon", f"{arch.name} checkpoint without a 'v_pred' key"


# -- detection: diffusers folders -----------------------------------------------------------------------

def detect_diffusers_folder(index: Mapping[str, Any], denoiser_config: Mapping[str, Any] | None) -> tuple[
        Architecture, str]:
    """(family, why) from a diffusers folder's ``model_index.json`` (``index``) and, where the
    pipeline class is shared, its denoiser config (SD2.x switched the transformer projections to
    Linear; ComfyUI tells SD1.x and SD2.x apart the same way)."""
    class_name = index.get("_class_name", "?")
    if class_name == "StableDiffusionXLPipeline":
        if index.get("text_encoder", [None])[0] is None:
            raise UnsupportedModel("SDXL refiner (no first text encoder)")
        return ARCHITECTURES["sdxl"], f"model_index.json: {class_name}"
    if class_name == "StableDiffusionPipeline":
        config = denoiser_config or {}
        if config.get("in_channels", 4) != 4:
            raise UnsupportedModel(f"UNet with {config.get('in_channels')} input channels (inpainting)")
        linear = bool(config.get("use_linear_projection"))
        return (ARCHITECTURES["sd2" if linear else "sd15"],
                f"model_index.json: {class_name}, use_linear_projection={linear}")
    raise UnsupportedModel(f"pipeline {class_name}")
