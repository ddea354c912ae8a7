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

The same holds for the DiT split files (ComfyUI 0.33 detects Z-Image only at its real width 3840 and
builds Qwen3-4B and the VAE encoder at fixed sizes): ``VersaT2ITest_TinyUNETLoader``,
``VersaT2ITest_TinyCLIPLoader`` and ``VersaT2ITest_TinyVAELoader`` stand in for UNETLoader, CLIPLoader
and VAELoader (same inputs, same outputs) for the tiny Z-Image files of tests/tiny_models/dit.py. They
build ComfyUI's own ``supported_models.ZImage`` model, Z-Image text encoder and ldm VAE at the sizes
the files' tensors have (the detector's Z-Image settings otherwise) and load the files with ComfyUI's
code, so what Train Aspect LoRA trains on those files is what they sample with.

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


# -- tiny Z-Image split files ------------------------------------------------------------------------------

def _count(state_dict: dict, prefix: str) -> int:
    """How many numbered children ``prefix<N>.`` the state dict has."""
    return len({key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)})


def zimage_unet_config(state_dict: dict) -> dict:
    """comfy/model_detection.py's Z-Image config (its width-3840 branch), with the sizes of this file."""
    dim, cap_feat_dim = state_dict["cap_embedder.1.weight"].shape
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": cap_feat_dim,
            "n_layers": _count(state_dict, "layers."), "qk_norm": True, "n_heads": dim // 128,
            "n_kv_heads": dim // 128, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
            "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
            "pad_tokens_multiple": 32}


def load_tiny_zimage(path: Path):
    state_dict = {k: v.float() for k, v in comfy.utils.load_torch_file(str(path), safe_load=True).items()}
    if "cap_embedder.1.weight" not in state_dict:
        raise ValueError(f"{path.name}: not a Z-Image diffusion model (the tiny loaders read Z-Image only)")
    model_config = comfy.supported_models.ZImage(zimage_unet_config(state_dict))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict, "", device=torch.device("cpu"))
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_tiny_qwen3_clip(path: Path):
    """ComfyUI's Z-Image text encoder (Qwen3, read at layer -2) at the file's sizes."""
    import comfy.text_encoders.z_image
    from comfy.supported_models_base import ClipTarget

    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    vocab, hidden = state_dict["model.embed_tokens.weight"].shape
    head_dim = state_dict["model.layers.0.self_attn.q_norm.weight"].shape[0]
    config = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": _count(state_dict, "model.layers."),
              "intermediate_size": state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0],
              "num_attention_heads": state_dict["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
              "num_key_value_heads": state_dict["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim}
    target = ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer, comfy.text_encoders.z_image.te())
    return comfy.sd.CLIP(target=target, state_dict=[state_dict],
                         model_options={"qwen3_4b_model_config": config, "dtype": torch.float32})


def load_tiny_vae(path: Path):
    """An ldm-layout KL VAE (FLUX.1's ae.safetensors layout) at the file's widths."""
    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    levels = _count(state_dict, "encoder.down.")
    ddconfig = {"double_z": True, "z_channels": state_dict["decoder.conv_in.weight"].shape[1], "resolution": 64,
                "in_channels": 3, "out_ch": 3, "ch": ch, "dropout": 0.0, "attn_resolutions": [],
                "ch_mult": [state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)],
                "num_res_blocks": _count(state_dict, "encoder.down.0.block.")}
    z = ddconfig["z_channels"]
    # ComfyUI's configured AutoencoderKL has the 1x1 quant convs FLUX.1's VAE lacks: identities (exact).
    state_dict.setdefault("quant_conv.weight", torch.eye(2 * z)[:, :, None, None])
    state_dict.setdefault("quant_conv.bias", torch.zeros(2 * z))
    state_dict.setdefault("post_quant_conv.weight", torch.eye(z)[:, :, None, None])
    state_dict.setdefault("post_quant_conv.bias", torch.zeros(z))
    vae = comfy.sd.VAE(sd=state_dict, config={"params": {"embed_dim": z, "ddconfig": ddconfig}}, dtype=torch.float32)
    vae.latent_channels = z
    return vae


class TinyUNETLoader:
    """UNETLoader for the tests' tiny Z-Image files (same inputs, same output)."""

    CATEGORY = "VersaT2I tests"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "Test only: loads a tiny Z-Image diffusion model sized by its tensors."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}}

    def load(self, unet_name, weight_dtype):
        return (load_tiny_zimage(Path(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))),)


class TinyCLIPLoader:
    """CLIPLoader (type lumina2: Z-Image's Qwen3) for the tests' tiny text encoder."""

    CATEGORY = "VersaT2I tests"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    DESCRIPTION = "Test only: loads a tiny Qwen3 text encoder as Z-Image's."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "type": (["lumina2"],), "device": (["default", "cpu"],)}}

    def load(self, clip_name, type, device):  # noqa: A002 - CLIPLoader's input name
        return (load_tiny_qwen3_clip(Path(folder_paths.get_full_path_or_raise("text_encoders", clip_name))),)


class TinyVAELoader:
    """VAELoader for the tests' tiny ldm-layout VAE files."""

    CATEGORY = "VersaT2I tests"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    DESCRIPTION = "Test only: loads a tiny KL VAE sized by its tensors."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),)}}

    def load(self, vae_name):
        return (load_tiny_vae(Path(folder_paths.get_full_path_or_raise("vae", vae_name))),)


NODE_CLASS_MAPPINGS = {"VersaT2ITest_TinyCheckpointLoader": TinyCheckpointLoader,
                       "VersaT2ITest_TinyUNETLoader": TinyUNETLoader,
                       "VersaT2ITest_TinyCLIPLoader": TinyCLIPLoader,
                       "VersaT2ITest_TinyVAELoader": TinyVAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"VersaT2ITest_TinyCheckpointLoader": "Tiny Checkpoint Loader (VersaT2I tests)",
                              "VersaT2ITest_TinyUNETLoader": "Tiny UNET Loader (VersaT2I tests)",
                              "VersaT2ITest_TinyCLIPLoader": "Tiny CLIP Loader (VersaT2I tests)",
                              "VersaT2ITest_TinyVAELoader": "Tiny VAE Loader (VersaT2I tests)"}
