"""How the flow-matching DiT families are called: prompts to conditioning, images to the latents the
denoiser reads, and the denoiser's velocity prediction, each as diffusers' training recipe for the
family does it (``examples/dreambooth/train_dreambooth_lora_{flux,flux2_klein,z_image}.py``).

The family's table entry picks its call convention (``denoiser_call``: how latents are packed and
positions given to the transformer: the only part that is code rather than data) and supplies the
facts the conventions read: the latent normalisation, the text length, the guidance input, the
timestep direction and the sign of the output. Prompts are encoded with the family pipeline's own
``encode_prompt`` (so the chat template, the hidden layers read and the padding are diffusers'),
latents are packed and unpacked with the pipelines' own static helpers.

Conventions (all return the velocity ``noise - x0`` in the ``(B, C, h, w)`` latent layout):

* ``flux`` (FLUX.1): 2x2 patches packed to tokens, ``img_ids`` (0, row, col), zero ``txt_ids``, the
  pooled CLIP-L vector, FLUX.1-dev's guidance input, timestep = sigma.
* ``flux2`` (klein): one token per (already patchified) latent cell, 4-axis ids, timestep = sigma.
* ``zimage``: a list of ``(C, 1, h, w)`` latents and of real-token text embeddings; its timestep is
  ``1 - sigma`` and it predicts ``x0 - noise`` (both from the table: ``timestep_reversed``,
  ``negated_prediction``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _pipeline_class(architecture):
    import diffusers

    return getattr(diffusers, architecture.pipeline_class)


def text_encoding_pipeline(base):
    """The family's pipeline over the base model's text encoders and tokenizers only (no denoiser,
    VAE or scheduler): its ``encode_prompt`` is the recipe's prompt encoding."""
    components = {"scheduler": None, "vae": None, base.architecture.denoiser_component: None}
    for spec, encoder, tokenizer in zip(base.architecture.text_encoders, base.text_encoders, base.tokenizers,
                                        strict=True):
        components[spec.component], components[spec.tokenizer] = encoder, tokenizer
    pipe = _pipeline_class(base.architecture)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- latents ------------------------------------------------------------------------------------------

def encode_latents(base, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The denoiser's latents of ``pixels`` [B,3,H,W] in -1..1, normalised as the family's recipe does:
    a posterior sample or its mode, then ``(z - shift) * scale`` or FLUX.2's 2x2 patchify and
    batch-norm statistics."""
    architecture = base.architecture
    posterior = base.vae.encode(pixels).latent_dist
    z = posterior.sample(generator=generator) if architecture.latent_sampling == "sample" else posterior.mode()
    if architecture.latent_normalization == "batch_norm":
        z = _pipeline_class(architecture)._patchify_latents(z)
        mean, std = _batch_norm_stats(base.vae, z)
        return (z - mean) / std
    if architecture.latent_normalization == "shift_scale":
        return (z - base.vae_shift_factor) * base.vae_scaling_factor
    return z * base.vae_scaling_factor


def decode_latents(base, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in -1..1 of the denoiser's latents (the inverse of ``encode_latents``)."""
    architecture = base.architecture
    if architecture.latent_normalization == "batch_norm":
        mean, std = _batch_norm_stats(base.vae, latents)
        latents = _pipeline_class(architecture)._unpatchify_latents(latents * std + mean)
    elif architecture.latent_normalization == "shift_scale":
        latents = latents / base.vae_scaling_factor + base.vae_shift_factor
    else:
        latents = latents / base.vae_scaling_factor
    return base.vae.decode(latents).sample


def _batch_norm_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


# -- conventions -----------------------------------------------------------------------------------------

class FluxCall:
    """FLUX.1: ``FluxPipeline``'s packing and ids, CLIP-L pooled + T5 context, dev's guidance input."""

    @staticmethod
    def encode_prompts(base, captions: Sequence[str], device) -> dict[str, Any]:
        prompt_embeds, pooled, _text_ids = text_encoding_pipeline(base).encode_prompt(
            list(captions), prompt_2=None, device=device,
            max_sequence_length=base.architecture.text_max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    @staticmethod
    def predict(base, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict, guidance: float | None):
        pipeline = _pipeline_class(base.architecture)
        batch, channels, height, width = noisy.shape
        packed = pipeline._pack_latents(noisy, batch, channels, height, width)
        img_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        context = cond["prompt_embeds"]
        txt_ids = torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance_input = None
        if transformer.config.guidance_embeds:
            guidance_input = torch.full((batch,), 3.5 if guidance is None else guidance, device=noisy.device,
                                        dtype=noisy.dtype)
        out = transformer(hidden_states=packed, timestep=sigmas.to(noisy.dtype), guidance=guidance_input,
                          pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=context,
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = base.architecture.latent_scale  # _unpack_latents takes pixel sizes
        return pipeline._unpack_latents(out, height * scale, width * scale, scale)


class Flux2Call:
    """FLUX.2-klein: ``Flux2KleinPipeline``'s packing and 4-axis ids, Qwen3 layers 9/18/27 as context."""

    @staticmethod
    def encode_prompts(base, captions: Sequence[str], device) -> dict[str, Any]:
        prompt_embeds, _text_ids = text_encoding_pipeline(base).encode_prompt(
            list(captions), device=device, max_sequence_length=base.architecture.text_max_sequence_length)
        return {"prompt_embeds": prompt_embeds}

    @staticmethod
    def predict(base, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict, guidance: float | None):
        pipeline = _pipeline_class(base.architecture)
        context = cond["prompt_embeds"]
        img_ids = pipeline._prepare_latent_ids(noisy).to(noisy.device)
        txt_ids = pipeline._prepare_text_ids(context).to(noisy.device)
        out = transformer(hidden_states=pipeline._pack_latents(noisy), timestep=sigmas.to(noisy.dtype), guidance=None,
                          encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return pipeline._unpack_latents_with_ids(out[:, : noisy.shape[2] * noisy.shape[3]], img_ids)


class ZImageCall:
    """Z-Image: lists of latents and of real-token Qwen3 states (second-to-last layer)."""

    @staticmethod
    def encode_prompts(base, captions: Sequence[str], device) -> dict[str, Any]:
        prompt_embeds, _negative = text_encoding_pipeline(base).encode_prompt(
            list(captions), device=device, do_classifier_free_guidance=False,
            max_sequence_length=base.architecture.text_max_sequence_length)
        return {"prompt_embeds": list(prompt_embeds)}

    @staticmethod
    def predict(base, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict, guidance: float | None):
        context = cond["prompt_embeds"]
        context = list(context.unbind(0)) if isinstance(context, torch.Tensor) else list(context)
        latents = list(noisy.unsqueeze(2).unbind(0))  # (C, 1, h, w) each
        out = transformer(latents, sigmas.to(noisy.dtype), context, return_dict=False)[0]
        return torch.stack(out, 0).squeeze(2)


CALLS = {"flux": FluxCall, "flux2": Flux2Call, "zimage": ZImageCall}


def call_convention(architecture):
    try:
        return CALLS[architecture.denoiser_call]
    except KeyError:
        raise ValueError(f"{architecture.label}: no flow-matching call convention {architecture.denoiser_call!r}; "
                         f"known: {', '.join(CALLS)}") from None


def encode_prompts(base, captions: Sequence[str], device) -> dict[str, Any]:
    """The conditioning of ``captions`` (no gradients: the DiT families train the denoiser only)."""
    with torch.no_grad():
        return call_convention(base.architecture).encode_prompts(base, captions, device)


def predict_velocity(base, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, cond: dict,
                     guidance: float | None = None) -> torch.Tensor:
    """The denoiser's prediction of ``noise - x0`` at noise levels ``sigmas`` [B] (x_t = (1 - sigma)
    x0 + sigma noise), in the ``(B, C, h, w)`` layout of ``noisy``."""
    architecture = base.architecture
    timesteps = 1.0 - sigmas if architecture.timestep_reversed else sigmas
    out = call_convention(architecture).predict(base, transformer, noisy, timesteps, cond, guidance)
    return -out if architecture.negated_prediction else out
