"""Tiny *real* ComfyUI models for in-process tests: an SD1.5-architecture UNet (ComfyUI's own
``comfy.supported_models.SD15`` at width 32, ~1 M parameters) wrapped in a ``ModelPatcher``, a
tiny CLIP-L-shaped text encoder as a ``comfy.sd.CLIP`` (ComfyUI's SD1 tokenizer, 2 layers, hidden
64), and kohya-format LoRAs for them. Random weights, built from configs in code: nothing is read
from disk or downloaded.

Import only after ComfyUI is importable with ``args.cpu = True`` (use the ``comfy`` fixture from
tests/conftest.py). ComfyUI's layers skip weight initialisation (they expect a checkpoint), so
``init_weights_`` fills every tensor: small random weights (not denormal: CPU denormals slow
everything ~100x), norms at 1, biases at 0.
"""

from __future__ import annotations

import math

import torch

TINY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "num_heads": 4,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

TINY_CLIP_CONFIG = {
    "hidden_size": 64,  # = TINY_UNET_CONFIG["context_dim"]
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 64,
}

# Transformer Linears of an SD1.5 UNet block, as diffusers names them (kohya LoRAs use these).
UNET_TRANSFORMER_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
# The transformers' input / output projections: 1x1 Conv2d in SD1.5 (use_linear_in_transformer False),
# which kohya SD1.5 LoRAs commonly include (weights [out, in, 1, 1]).
UNET_TRANSFORMER_CONVS = ("proj_in", "proj_out")
CLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def init_weights_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for submodule in module.modules():
            for leaf, tensor in submodule.named_parameters(recurse=False):
                if not tensor.is_floating_point():
                    continue
                if isinstance(submodule, norms) and leaf == "weight":
                    tensor.fill_(1.0)
                elif leaf == "bias" or tensor.ndim < 2:
                    tensor.zero_()
                else:
                    fan_in = tensor[0].numel()
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))


def build_tiny_sd15(seed: int = 0, unet_config: dict | None = None):
    """A ``ModelPatcher`` around a tiny SD1.5-architecture ``BaseModel`` on ComfyUI's devices."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(unet_config or TINY_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights_(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def build_tiny_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` with ComfyUI's SD1 tokenizer and a 2-layer, 64-wide CLIP-L text model."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    # float32: on CPU ComfyUI would pick float16 for text encoders, and merged weights are then
    # rounded to float16, which hides 1e-3-sized differences between LoRA code paths.
    options = {"clip_l_model_config": dict(TINY_CLIP_CONFIG), "dtype": torch.float32}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    init_weights_(clip.cond_stage_model, seed + 1000)
    return clip


def encode(clip, text: str):
    """CONDITIONING for ``text``, as CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def unet_lora_module_names(model_patcher, *, convs: bool = True) -> dict[str, str]:
    """kohya module name (diffusers-style, as the trainer writes) -> ComfyUI weight key, for every
    transformer Linear of the UNet, and (``convs``) every transformer's proj_in / proj_out."""
    import comfy.utils

    names = {}
    unet_config = model_patcher.model.model_config.unet_config
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if not diffusers_key.endswith(".weight") or ".attentions." not in diffusers_key:
            continue
        module = diffusers_key[: -len(".weight")]
        linear = ".transformer_blocks." in module and module.endswith(UNET_TRANSFORMER_LINEARS)
        conv = convs and module.rsplit(".", 1)[-1] in UNET_TRANSFORMER_CONVS
        if linear or conv:
            names["lora_unet_" + module.replace(".", "_")] = "diffusion_model." + ldm_key
    return names


def clip_lora_module_names(clip) -> dict[str, str]:
    names = {}
    for key in clip.cond_stage_model.state_dict():
        prefix = "clip_l.transformer.text_model.encoder.layers."
        if key.startswith(prefix) and key.endswith(".weight"):
            rest = key[len(prefix) : -len(".weight")]
            block, module = rest.split(".", 1)
            if module in CLIP_LINEARS:
                names[f"lora_te_text_model_encoder_layers_{block}_{module.replace('.', '_')}"] = key
    return names


def make_kohya_lora(
    model_patcher,
    clip=None,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    magnitude: float = 0.5,
    modules: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (``lora_unet_…`` / ``lora_te_…`` with ``.lora_down/.lora_up/.alpha``)
    on the UNet's transformer Linears and 1x1-conv proj_in / proj_out (kohya's 4-d factors
    ``[r, in, 1, 1]`` / ``[out, r, 1, 1]``), and the text encoder's Linears when ``clip`` is given;
    ``modules`` keeps only the named ones. Non-zero up weights, so it visibly changes the model."""
    generator = torch.Generator().manual_seed(seed)
    names = unet_lora_module_names(model_patcher)
    weights = dict(model_patcher.model.state_dict())
    if clip is not None:
        names.update(clip_lora_module_names(clip))
        weights.update(clip.cond_stage_model.state_dict())
    lora = {}
    for name in sorted(names):
        if modules is not None and name not in modules:
            continue
        weight = weights[names[name]]
        out_features, in_features = weight.shape[:2]
        kernel = tuple(weight.shape[2:])  # (1, 1) for the convs
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        up = torch.randn(out_features, rank, generator=generator) * magnitude / math.sqrt(rank)
        lora[f"{name}.lora_down.weight"] = down.reshape(rank, in_features, *kernel)
        lora[f"{name}.lora_up.weight"] = up.reshape(out_features, rank, *([1] * len(kernel)))
        lora[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    return lora
