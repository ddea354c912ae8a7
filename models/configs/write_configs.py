"""Write the diffusers configs shipped in this folder (run: ``python write_configs.py``).

The values are those of the public diffusers releases of each architecture
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0), written out here so single-file checkpoints load with
no model-hub access. Keys a class defaults identically are left out. Tokenizers are not shipped
as vocab files: ``tokenizer_config.json`` only records the pad token and length, and
``models.loading.build_clip_tokenizer`` builds the CLIP BPE from the vocabulary open_clip
ships in its wheel. tests/unit/trainer/test_model_loading.py checks every config against the
tensor shapes a real checkpoint of that architecture has (and, with COMFYUI_PATH, against
ComfyUI's own model definitions).
"""

import json
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


def main() -> None:
    for arch, files in CONFIGS.items():
        for relative, content in files.items():
            target = HERE / arch / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
