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

The DiT families (FLUX.1, FLUX.2-klein, Z-Image) come as the split files ComfyUI's Load Diffusion
Model / Load CLIP / Load VAE nodes read. Their entries add: the key rules that recognise each file
(``KeyRule``: structural, so tiny test models are classified like the real ones), the **variants**
of a family (FLUX.1-dev / schnell, klein 4B / 9B: each its own config folder and training /
sampling facts), the diffusers converter of the denoiser, the VAE class and its latent
normalisation, the flow-matching call convention, the LoRA file format ComfyUI and diffusers both
read in full, and the block structure the memory estimate needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..safe_io import readable_name

# -- table fields ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """A test on a file's tensor table (key -> shape): ``key`` is present (absent when ``present`` is
    False), and when ``dim`` is given its shape there equals ``value``. A ``key`` starting with
    ``*`` matches any key ending with the rest."""

    key: str
    dim: int | None = None
    value: int | None = None
    present: bool = True

    def find(self, shapes: Mapping[str, Sequence[int]]) -> Sequence[int] | None:
        if self.key.startswith("*"):
            return next((shape for name, shape in shapes.items() if name.endswith(self.key[1:])), None)
        return shapes.get(self.key)

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        shape = self.find(shapes)
        if shape is None:
            return not self.present
        if not self.present:
            return False
        return self.dim is None or (len(shape) > self.dim and shape[self.dim] == self.value)

    def width(self, shapes: Mapping[str, Sequence[int]]) -> int | None:
        """The size at ``dim`` of the matched key (None when absent)."""
        shape = self.find(shapes)
        return None if shape is None or self.dim is None or len(shape) <= self.dim else int(shape[self.dim])


def all_hold(rules: Iterable[KeyRule], shapes: Mapping[str, Sequence[int]]) -> bool:
    return all(rule.holds(shapes) for rule in rules)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and its tokenizer."""

    component: str  # diffusers component / sub-folder, and the prefix of its LoRA keys: "text_encoder"
    tokenizer: str  # its tokenizer's component / sub-folder: "tokenizer"
    model_class: str  # transformers class: "CLIPTextModel"
    # split files (DiT families): what the user's file is called and how it is recognised
    label: str = ""  # "CLIP-L", "T5-XXL", "Qwen3"
    user_file: str = ""  # the file ComfyUI users have: "clip_l.safetensors"
    file_rules: tuple[KeyRule, ...] = ()  # recognise the file (any prefix: matched by key suffix)
    width_rule: KeyRule | None = None  # the encoder's output width, read from the file


@dataclass(frozen=True)
class MemoryFacts:
    """What the memory estimate needs of a denoiser: its blocks (``(config key of the count,
    activation factor k)``: bytes autograd keeps per block without checkpointing = k * batch *
    tokens * hidden * 2, measured at full width in bf16) and its width (product of config keys)."""

    blocks: tuple[tuple[str, float], ...]
    hidden_keys: tuple[str, ...]
    text_tokens: int  # conditioning tokens next to the image tokens at training time


@dataclass(frozen=True)
class Variant:
    """One released model of a family: its own shipped configs (``models/configs/<name>/``), how its
    diffusion-model file is told apart (``rules``: structure; ``size_rules``: the released size,
    waived when the caller supplies configs, e.g. for a tiny test model), and its training and
    sampling facts."""

    name: str  # "flux1-dev": also its config folder
    label: str  # "FLUX.1-dev"
    rules: tuple[KeyRule, ...] = ()
    size_rules: tuple[KeyRule, ...] = ()
    training_guidance: float | None = None  # the guidance input while training (guidance-distilled FLUX.1-dev)
    sampling: Mapping[str, Any] = field(default_factory=dict)  # pipeline call defaults (steps, guidance)
    pipeline_options: Mapping[str, Any] = field(default_factory=dict)  # pipeline constructor extras
    native_resolution: int = 1024
    text_encoder_files: tuple[str, ...] = ()  # the files users have, when not the family's (klein 9B: Qwen3-8B)


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
    objective: str = "ddpm"  # ddpm: add_noise + epsilon / v / x0 target; flow_matching: velocity (DiTs)
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
    # Where a forward pre-hook on the diffusers denoiser finds the gate's inputs: the names of the
    # denoiser's forward arguments holding the latent batch (a tensor, or Z-Image's list), the timestep
    # and the prompt input (``gate_prompt_input``'s tensor), bound by the forward's signature (FLUX.1
    # takes them by keyword, Z-Image by position). A family whose timestep runs the other way
    # (``timestep_reversed``) is read as ``gate_timestep_range - t``: the gate always reads the noise level.
    gate_call_arguments: tuple[str, str, str] = ("sample", "timestep", "encoder_hidden_states")
    # -- the DiT families (split files, flow matching); the SD entries keep the defaults -----------------
    # recognising the diffusion-model file (ComfyUI layout, a full checkpoint's prefix removed)
    denoiser_rules: tuple[KeyRule, ...] = ()
    variants: tuple[Variant, ...] = ()
    denoiser_converter: str = ""  # models.comfy_layout.CONVERTERS: ComfyUI layout -> diffusers keys
    # the denoiser's text-input width, checked against the text encoders' (``width_rule``) x multiplier
    denoiser_text_width: tuple[tuple[KeyRule, int, int], ...] = ()  # (rule, text encoder index, multiplier)
    # the VAE: diffusers class, what its file looks like (ldm layout), the latent normalisation
    vae_class: str = "AutoencoderKL"
    vae_rules: tuple[KeyRule, ...] = ()
    vae_user_file: str = ""  # "ae.safetensors"
    # "scale": z * scaling_factor (SD); "shift_scale": (z - shift_factor) * scaling_factor (FLUX.1 VAE);
    # "batch_norm": 2x2-patchified z normalised by the VAE's batch-norm statistics (FLUX.2)
    latent_normalization: str = "scale"
    latent_sampling: str = "sample"  # "sample" (a posterior sample) | "mode" (its mean), as the recipe does
    latent_scale: int = 8  # pixels per cell of the latents the denoiser reads (FLUX.2: /8 VAE, 2x2 patchified)
    latent_patch: int = 1  # the denoiser packs p x p latent cells into one token
    # flow matching: the call convention of the denoiser (models/flow_matching.py), its timestep
    # direction and the sign of its output
    denoiser_call: str = "unet"
    timestep_reversed: bool = False  # the denoiser's t runs 1 (clean) -> 0 (noise) (Z-Image)
    negated_prediction: bool = False  # it predicts x0 - noise instead of noise - x0 (Z-Image)
    text_max_sequence_length: int = 77
    lora_format: str = "kohya"  # "kohya" (lora_unet_*) | "diffusers" (transformer.<module>.lora_A/B)
    checkpoint_vae_prefix: str = "first_stage_model."  # the VAE's part of a full checkpoint
    memory: MemoryFacts | None = None
    # what the gate (issue 13) reads of the prompt: "context" (the text tokens the denoiser attends to,
    # averaged) | "pooled" (FLUX.1's CLIP-L vector: identical in ComfyUI and diffusers, where T5's
    # context differs by its padding)
    gate_prompt_input: str = "context"

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this (the latents' scale x the denoiser's patch)."""
        return self.latent_scale * self.latent_patch

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise ValueError(f"{self.label}: no variant {name!r}; known: {', '.join(v.name for v in self.variants)}")

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        return tuple(spec.component for spec in self.text_encoders)

    @property
    def tokenizer_components(self) -> tuple[str, ...]:
        return tuple(spec.tokenizer for spec in self.text_encoders)

    def gate_prompt_features(self, denoiser_config: Mapping[str, Any]) -> int:
        """Width of the prompt vector the gate reads (the text context the denoiser attends to, or
        FLUX.1's pooled CLIP-L vector)."""
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

SD_ARCHITECTURES: dict[str, Architecture] = {
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

# -- the DiT families --------------------------------------------------------------------------------
# Facts from diffusers' DreamBooth-LoRA recipes (train_dreambooth_lora_{flux,flux2_klein,z_image}.py),
# its pipelines and single-file converters, and ComfyUI 0.33's detection (comfy/model_detection.py);
# /work/research/dit/FINDINGS.md has the measurements behind each.

_CLIP_L = TextEncoderSpec(
    "text_encoder", "tokenizer", "CLIPTextModel", label="CLIP-L", user_file="clip_l.safetensors",
    file_rules=(KeyRule("*embeddings.token_embedding.weight"), KeyRule("*self_attn.q_proj.weight")),
    width_rule=KeyRule("*final_layer_norm.weight", 0))
_T5_XXL = TextEncoderSpec(
    "text_encoder_2", "tokenizer_2", "T5EncoderModel", label="T5-XXL", user_file="t5xxl_fp16.safetensors",
    file_rules=(KeyRule("*SelfAttention.q.weight"),), width_rule=KeyRule("*final_layer_norm.weight", 0))
# ComfyUI's Qwen3 text-encoder files hold the decoder only (no lm_head): transformers' Qwen3Model.
_QWEN3 = TextEncoderSpec(
    "text_encoder", "tokenizer", "Qwen3Model", label="Qwen3", user_file="qwen_3_4b.safetensors",
    file_rules=(KeyRule("*self_attn.q_norm.weight"), KeyRule("*embed_tokens.weight")),
    width_rule=KeyRule("*embed_tokens.weight", 1))
_FLUX1_VAE = {"vae_class": "AutoencoderKL", "vae_user_file": "ae.safetensors",
              "vae_rules": (KeyRule("decoder.conv_in.weight", 1, 16), KeyRule("bn.running_mean", present=False))}
# Shared by every DiT family: split files, flow matching, LoRA files in diffusers' keys.
# The gate's timestep input: the denoiser's t is the noise level sigma in 0..1 (ComfyUI's FLUX, FLUX.2 and
# Z-Image models all take sigma with multiplier 1; diffusers' FLUX and klein too, Z-Image 1 - sigma).
_DIT = {"denoiser_class": "", "denoiser_component": "transformer", "vae_scaling_factor": 1.0,
        "lora_format": "diffusers", "checkpoint_vae_prefix": "vae.", "objective": "flow_matching",
        "gate_timestep_range": 1.0, "gate_call_arguments": ("hidden_states", "timestep", "encoder_hidden_states")}


DIT_ARCHITECTURES: dict[str, Architecture] = {
    "flux1": Architecture(
        name="flux1", label="FLUX.1",
        **{**_DIT, "denoiser_class": "FluxTransformer2DModel",
           "gate_call_arguments": ("hidden_states", "timestep", "pooled_projections")},
        text_encoders=(_CLIP_L, _T5_XXL), **_FLUX1_VAE,
        denoiser_rules=(KeyRule("double_blocks.0.img_attn.qkv.weight"), KeyRule("img_in.weight"),
                        KeyRule("vector_in.in_layer.weight"),
                        KeyRule("double_stream_modulation_img.lin.weight", present=False)),
        variants=(
            Variant("flux1-dev", "FLUX.1-dev", rules=(KeyRule("guidance_in.in_layer.weight"),),
                    size_rules=(KeyRule("img_in.weight", 0, 3072),), training_guidance=3.5,
                    sampling={"num_inference_steps": 28, "guidance_scale": 3.5}),
            # schnell is timestep-distilled: no guidance input, 1-4 steps without CFG.
            Variant("flux1-schnell", "FLUX.1-schnell", rules=(KeyRule("guidance_in.in_layer.weight", present=False),),
                    size_rules=(KeyRule("img_in.weight", 0, 3072),),
                    sampling={"num_inference_steps": 4, "guidance_scale": 0.0}),
        ),
        denoiser_converter="flux1",
        denoiser_text_width=((KeyRule("txt_in.weight", 1), 1, 1), (KeyRule("vector_in.in_layer.weight", 1), 0, 1)),
        latent_normalization="shift_scale", latent_sampling="sample", latent_patch=2, denoiser_call="flux",
        # ComfyUI pads T5 to 256 tokens without a mask, so the real tokens' states depend on the pad
        # count: train on what ComfyUI feeds the model (diffusers' pipeline default is 512).
        text_max_sequence_length=256,
        # recipe targets (attention and the double blocks' MLPs); train_feed_forward adds the single
        # blocks' fused MLP-in and output projections
        lora_attention_modules=("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
        lora_feed_forward_modules=("proj_mlp", "proj_out"),
        pipeline_class="FluxPipeline", gate_prompt_features_key="pooled_projection_dim", gate_prompt_input="pooled",
        memory=MemoryFacts(blocks=(("num_layers", 31.0), ("num_single_layers", 18.0)),
                           hidden_keys=("num_attention_heads", "attention_head_dim"), text_tokens=256),
    ),
    "flux2_klein": Architecture(
        name="flux2_klein", label="FLUX.2-klein", **{**_DIT, "denoiser_class": "Flux2Transformer2DModel"},
        text_encoders=(_QWEN3,), vae_class="AutoencoderKLFlux2", vae_user_file="flux2-vae.safetensors",
        vae_rules=(KeyRule("decoder.conv_in.weight", 1, 32), KeyRule("bn.running_mean")),
        # FLUX.2-dev (32B, Mistral text encoder) has a guidance input; klein has none.
        denoiser_rules=(KeyRule("double_stream_modulation_img.lin.weight"), KeyRule("img_in.weight"),
                        KeyRule("guidance_in.in_layer.weight", present=False)),
        variants=(
            # The distilled releases sample in 4 steps without CFG (the "base" releases share the weights'
            # layout; pass guidance and steps for those).
            Variant("flux2-klein-4b", "FLUX.2-klein 4B", size_rules=(KeyRule("txt_in.weight", 1, 7680),),
                    sampling={"num_inference_steps": 4, "guidance_scale": 1.0},
                    pipeline_options={"is_distilled": True}),
            Variant("flux2-klein-9b", "FLUX.2-klein 9B", size_rules=(KeyRule("txt_in.weight", 1, 12288),),
                    sampling={"num_inference_steps": 4, "guidance_scale": 1.0}, pipeline_options={"is_distilled": True},
                    text_encoder_files=("qwen_3_8b.safetensors",)),
        ),
        denoiser_converter="flux2",
        # klein reads three Qwen3 layers (9, 18, 27) side by side
        denoiser_text_width=((KeyRule("txt_in.weight", 1), 0, 3),),
        latent_normalization="batch_norm", latent_sampling="mode", latent_scale=16, latent_patch=1,
        denoiser_call="flux2", text_max_sequence_length=512,
        lora_attention_modules=("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                                "single_transformer_blocks.*.attn.to_out"),
        lora_feed_forward_modules=("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.linear_in",
                                   "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"),
        pipeline_class="Flux2KleinPipeline", gate_prompt_features_key="joint_attention_dim",
        memory=MemoryFacts(blocks=(("num_layers", 21.0), ("num_single_layers", 29.0)),
                           hidden_keys=("num_attention_heads", "attention_head_dim"), text_tokens=512),
    ),
    "zimage": Architecture(
        name="zimage", label="Z-Image",
        **{**_DIT, "denoiser_class": "ZImageTransformer2DModel", "gate_call_arguments": ("x", "t", "cap_feats")},
        text_encoders=(_QWEN3,), **_FLUX1_VAE,  # Z-Image uses FLUX.1's VAE
        denoiser_rules=(KeyRule("cap_embedder.1.weight"), KeyRule("noise_refiner.0.attention.k_norm.weight")),
        # Turbo (8-9 steps, no CFG) and the undistilled base share the layout; sampling defaults are Turbo's.
        variants=(Variant("zimage", "Z-Image", size_rules=(KeyRule("cap_embedder.1.weight", 0, 3840),),
                          sampling={"num_inference_steps": 9, "guidance_scale": 0.0}),),
        denoiser_converter="z_image",
        denoiser_text_width=((KeyRule("cap_embedder.1.weight", 1), 0, 1),),
        latent_normalization="shift_scale", latent_sampling="mode", latent_patch=2, denoiser_call="zimage",
        timestep_reversed=True, negated_prediction=True, text_max_sequence_length=512,
        lora_attention_modules=("to_k", "to_q", "to_v", "to_out.0"),
        lora_feed_forward_modules=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
        pipeline_class="ZImagePipeline", gate_prompt_features_key="cap_feat_dim",
        memory=MemoryFacts(blocks=(("n_layers", 36.0), ("n_refiner_layers", 36.0), ("n_refiner_layers", 36.0)),
                           hidden_keys=("dim",), text_tokens=128),
    ),
}
ARCHITECTURES: dict[str, Architecture] = {**SD_ARCHITECTURES, **DIT_ARCHITECTURES}
ARCHITECTURE_NAMES = tuple(ARCHITECTURES)
SUPPORTED = ("SD1.x, SD2.x (epsilon or v-prediction) and SDXL base, as a single .safetensors checkpoint or a "
             "diffusers folder; FLUX.1 (dev, schnell), FLUX.2-klein (4B, 9B) and Z-Image, as ComfyUI's split files "
             "(diffusion model + text encoder(s) + VAE), a full checkpoint or a diffusers folder")


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


# -- detection: the DiT families' files (ComfyUI layout) ---------------------------------------------------

# Diffusion models the table does not train, recognised to say what they are (key -> what and why).
_KNOWN_UNSUPPORTED_DENOISERS = (
    (KeyRule("distilled_guidance_layer.in_proj.weight"),
     "Chroma (FLUX.1-schnell's transformer without the CLIP-L input; its modulation comes from a distilled "
     "guidance network): not supported yet. It needs its own table entry: diffusers' ChromaTransformer2DModel "
     "and chroma converter, a T5-only text encoder, ChromaPipeline"),
    (KeyRule("double_stream_modulation_img.lin.weight"),
     "FLUX.2-dev (32B, Mistral text encoder): not supported; FLUX.2-klein 4B / 9B are"),
    (KeyRule("joint_blocks.0.x_block.attn.qkv.weight"), "Stable Diffusion 3: not supported"),
    (KeyRule("txt_norm.weight"), "Qwen-Image: not supported yet"),
    (KeyRule("input_blocks.0.0.weight"), "an SD / SDXL UNet: give its full checkpoint (models/checkpoints)"),
)


def detect_diffusion_model(shapes: Mapping[str, Sequence[int]]) -> Architecture:
    """The DiT family of a diffusion-model tensor table (ComfyUI layout, a full checkpoint's
    ``model.diffusion_model.`` prefix removed). ``UnsupportedModel`` says what the file is instead."""
    for architecture in DIT_ARCHITECTURES.values():
        if all_hold(architecture.denoiser_rules, shapes):
            return architecture
    for rule, what in _KNOWN_UNSUPPORTED_DENOISERS:
        if rule.holds(shapes):
            raise UnsupportedModel(what)
    if any(".lora_" in key or key.startswith("lora_") for key in shapes):
        raise UnsupportedModel("this is a LoRA file, not a diffusion model")
    raise UnsupportedModel("no diffusion model of a known family (FLUX.1, FLUX.2-klein, Z-Image)")


def detect_variant(architecture: Architecture, shapes: Mapping[str, Sequence[int]], *,
                   own_configs: bool = False) -> Variant:
    """The family's variant a diffusion model is: the first whose structural rules hold and whose
    released size matches; with ``own_configs`` (the caller supplies the configs: a fine-tune of
    another size, a tiny test model) the size is not required. ``UnsupportedModel`` otherwise."""
    fitting = [v for v in architecture.variants if all_hold(v.rules, shapes)]
    for variant in fitting:
        if all_hold(variant.size_rules, shapes):
            return variant
    if fitting and own_configs:
        return fitting[0]
    sizes = "; ".join(f"{v.label}: " + ", ".join(f"{r.key} size {r.value}" for r in v.size_rules) for v in fitting)
    found = ", ".join(f"{r.key} size {r.width(shapes)}" for v in fitting[:1] for r in v.size_rules)
    raise UnsupportedModel(f"a {architecture.label} diffusion model of a size no release has ({found}; released: "
                           f"{sizes or 'none with this structure'}); pass configs that describe it (model_config_dir)")


def text_encoder_width_expected(architecture: Architecture, shapes: Mapping[str, Sequence[int]]) -> dict[int, int]:
    """text encoder index -> the output width the diffusion model's text input expects."""
    expected = {}
    for rule, index, multiplier in architecture.denoiser_text_width:
        width = rule.width(shapes)
        if width is not None:
            expected[index] = width // multiplier
    return expected


def identify_text_encoder(architecture: Architecture, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Index (in the entry's ``text_encoders``) of the encoder a text-encoder file is, or None."""
    for index, spec in enumerate(architecture.text_encoders):
        if spec.file_rules and all_hold(spec.file_rules, shapes):
            return index
    return None


def describe_text_encoder(shapes: Mapping[str, Sequence[int]]) -> str:
    """What a text-encoder file is, for messages ("T5-XXL, width 4096")."""
    for spec in (_CLIP_L, _T5_XXL, _QWEN3):
        if all_hold(spec.file_rules, shapes):
            return f"{spec.label}, width {spec.width_rule.width(shapes)}"
    return "no text encoder the table knows (CLIP-L, T5-XXL, Qwen3)"


def vae_problem(architecture: Architecture, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Why a VAE tensor table (ldm layout) is not this family's VAE (None when it is)."""
    if all_hold(architecture.vae_rules, shapes):
        return None
    channels = KeyRule("decoder.conv_in.weight", 1).width(shapes)
    if channels is None:
        return "no VAE decoder in it (decoder.conv_in.weight)"
    kind = {4: "an SD / SDXL VAE (4 latent channels)", 16: "FLUX.1's VAE (16 latent channels; also Z-Image's)",
            32: "FLUX.2's VAE (32 latent channels, batch-norm latents)"}.get(channels, f"a VAE with {channels} latent "
                                                                                       f"channels")
    if channels == 32 and "bn.running_mean" not in shapes:
        kind = "a VAE with 32 latent channels and no batch-norm statistics (not FLUX.2's)"
    return f"it is {kind}; {architecture.label} needs {architecture.vae_user_file}"
