"""A test-only ComfyUI node pack: linked into a *test* server's custom_nodes beside the real pack
(tests/server/test_workflows.py); never shipped, never installed for users.

Why it exists: ComfyUI's checkpoint detection only accepts real-size models (SD1.5 needs
model_channels 320 and context_dim 768), so the tiny SD1.5-shaped checkpoint the tests train on
cannot go through CheckpointLoaderSimple. ``VersaT2ITest_TinyCheckpointLoader`` has the same input
(``ckpt_name`` from models/checkpoints) and the same outputs (MODEL, CLIP, VAE) and stands in for it
in the converted API prompt. It loads the very file the trainer nodes train on, with ComfyUI's own
code (``detect_unet_config`` -> ``supported_models.SD15`` -> ``load_model_weights``, ``comfy.sd.CLIP``,
``comfy.sd.VAE``), sized by the checkpoint's sidecar ``<stem>.configs/`` folder (the diffusers configs
models/loading.py reads too). So a LoRA trained by Train Aspect LoRA on that file applies to
exactly the weights it was trained on.

Only ComfyUI and torch are imported: the server runs this with the project's python, but the pack's
tests/ folder is not on its path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import torch

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SIDECAR_SUFFIX = ".configs"


def sidecar_configs(checkpoint: Path) -> dict:
    folder = checkpoint.with_name(checkpoint.stem + SIDECAR_SUFFIX)
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint.name}: no sidecar configs in {folder} (the tiny loader needs them)")
    return {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}


def load_tiny_checkpoint(path: Path):
    """(ModelPatcher, CLIP, VAE) of a small SD1.5-shaped original-layout checkpoint, in float32."""
    configs = sidecar_configs(path)
    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    device = comfy.model_management.get_torch_device()

    unet_config = comfy.model_detection.detect_unet_config(state_dict, UNET_PREFIX)
    model_config = comfy.supported_models.SD15(unet_config)  # detection would refuse the tiny widths
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict, UNET_PREFIX, device=torch.device("cpu"))
    model.load_model_weights(state_dict, UNET_PREFIX)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())

    text = configs["text_encoder"]
    clip_options = {"clip_l_model_config": {key: text[key] for key in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "hidden_act")}
        | {"projection_dim": text.get("projection_dim", text["hidden_size"])}, "dtype": torch.float32}
    clip_state_dict = model_config.process_clip_state_dict(
        {k: v for k, v in state_dict.items() if k.startswith("cond_stage_model.")})
    clip = comfy.sd.CLIP(model_config.clip_target(state_dict), model_options=clip_options)
    missing, unexpected = clip.load_sd(clip_state_dict, full_model=True)
    missing = [k for k in missing if not k.endswith(("position_ids", "logit_scale", "text_projection.weight"))]
    if missing or unexpected:
        raise ValueError(f"{path.name}: text encoder keys missing {missing[:5]} / unexpected {unexpected[:5]}")

    vae = configs["vae"]
    channels = list(vae["block_out_channels"])
    ddconfig = {"double_z": True, "z_channels": vae["latent_channels"], "resolution": vae.get("sample_size", 64),
                "in_channels": vae.get("in_channels", 3), "out_ch": vae.get("out_channels", 3), "ch": channels[0],
                "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": vae["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    vae_state_dict = comfy.utils.state_dict_prefix_replace(state_dict, {VAE_PREFIX: ""}, filter_keys=True)
    vae_model = comfy.sd.VAE(sd=vae_state_dict, config={"params": {"embed_dim": vae["latent_channels"],
                                                                   "ddconfig": ddconfig}}, dtype=torch.float32)
    return patcher, clip, vae_model


class TinyCheckpointLoader:
    """CheckpointLoaderSimple for the tests' tiny checkpoints (same input, same outputs)."""

    CATEGORY = "VersaT2I tests"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    DESCRIPTION = "Test only: loads a tiny SD1.5-shaped checkpoint sized by its <stem>.configs/ sidecar."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    def load(self, ckpt_name):
        return load_tiny_checkpoint(Path(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)))


NODE_CLASS_MAPPINGS = {"VersaT2ITest_TinyCheckpointLoader": TinyCheckpointLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"VersaT2ITest_TinyCheckpointLoader": "Tiny Checkpoint Loader (VersaT2I tests)"}
