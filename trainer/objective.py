"""What the denoiser learns from a batch: the noised latents, the conditioning it reads and the
loss against its prediction target, as diffusers' training examples compute them (DDPM noising;
epsilon, v or x0 targets; optional min-SNR weighting and offset noise). The families' differences
(pooled text embeddings, size ids) come from the architecture table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.loading import encode_prompts
from .training_loop import encode_images


def noised_latents(batch: dict, base, device, *, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                   noise_generator: torch.Generator, noise_offset: float = 0.0):
    """(latents, noise, timesteps, noisy latents) of one batch: cached latents or the VAE's, noise
    and uniform timesteps, all drawn from ``noise_generator`` (saved in checkpoints: exact resume)."""
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        with torch.no_grad():
            latents = encode_images(base, batch["pixel_values"], device, vae_dtype, noise_generator)
    latents = latents.to(weight_dtype)
    noise = torch.randn(latents.shape, generator=noise_generator, device=device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=noise_generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=noise_generator, device=device).long()
    return latents, noise, timesteps, base.noise_scheduler.add_noise(latents, noise, timesteps)


def denoiser_conditioning(batch: dict, base, device, *, weight_dtype: torch.dtype, text_grad: bool):
    """(encoder_hidden_states, added_cond_kwargs) of one batch: cached embeddings or the text
    encoders' (with gradients when ``text_grad``), plus the pooled text embedding and the size /
    crop ids for families whose denoiser takes them (SDXL)."""

    if "encoder_hidden_states" in batch:
        hidden = batch["encoder_hidden_states"].to(device, dtype=weight_dtype)
        added = None
        if base.architecture.pooled_text_embeds:
            added = {"text_embeds": batch["pooled_text_embeds"].to(device, dtype=weight_dtype)}
    else:
        with torch.set_grad_enabled(text_grad):
            hidden, added = encode_prompts(base, batch["caption"], device)
    if base.architecture.size_conditioning:
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        added = {"text_embeds": added["text_embeds"], "time_ids": time_ids.to(device=device, dtype=hidden.dtype)}
    return hidden, added


def compute_loss(model_pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 noise_scheduler, prediction_type: str, snr_gamma: float, *, per_sample: bool = False) -> torch.Tensor:
    """MSE against the target of ``prediction_type``, optionally min-SNR-gamma weighted
    (https://arxiv.org/abs/2303.09556; weights as in diffusers' examples): the batch mean, or one
    value per sample ``[B]`` with ``per_sample``."""
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    if not snr_gamma and not per_sample:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if not snr_gamma:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        return loss.mean(dim=list(range(1, loss.ndim)))
    from diffusers.training_utils import compute_snr  # diffusers: imported when min-SNR is on

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = clipped / snr
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    else:  # an x0 loss is already snr-times an epsilon loss: min(snr, gamma) / snr * snr
        weights = clipped
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim))) * weights
    return loss if per_sample else loss.mean()


