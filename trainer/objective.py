"""What the denoiser learns from a batch: the noised latents, the conditioning it reads and the
loss against its prediction target, as diffusers' training examples compute them. The families'
differences come from the architecture table.

* SD families (``objective = "ddpm"``): DDPM noising; epsilon, v or x0 targets; optional min-SNR
  weighting and offset noise; SDXL's pooled text embeddings and size ids.
* DiT families (``objective = "flow_matching"``), as diffusers' DreamBooth-LoRA recipes for FLUX.1,
  FLUX.2-klein and Z-Image: ``u`` from ``compute_density_for_timestep_sampling`` (uniform,
  logit-normal or mode; ``weighting_scheme``), ``sigma`` = the model's training scheduler's sigma at
  index ``u * 1000`` (its static shift applied when the scheduler config has no dynamic shifting:
  Z-Image 3.0, FLUX.1-schnell 1.0; unshifted for FLUX.1-dev and klein, as the recipes do),
  ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``, loss weighted per
  ``compute_loss_weighting_for_sd3``. Packing, ids, guidance, timestep direction and sign are the
  family's call convention (``models/flow_matching.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.flow_matching import encode_prompts as encode_flow_prompts
from ..models.flow_matching import predict_velocity
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




# -- flow matching (the DiT families) ---------------------------------------------------------------------

def batch_latents(batch: dict, base, device, *, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                  noise_generator: torch.Generator) -> torch.Tensor:
    """Cached latents or the VAE's (``encode_images``), in ``weight_dtype``."""
    if "latents" in batch:
        return batch["latents"].to(device, dtype=weight_dtype)
    with torch.no_grad():
        return encode_images(base, batch["pixel_values"], device, vae_dtype, noise_generator).to(weight_dtype)


def flow_noised_latents(batch: dict, base, device, *, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                        noise_generator: torch.Generator, sigma_table: torch.Tensor, config):
    """(latents, noise, sigmas [B], noisy latents) of one batch, every random draw from
    ``noise_generator`` (saved in checkpoints: exact resume). ``sigma_table``: the training
    scheduler's 1000 sigmas."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    latents = batch_latents(batch, base, device, weight_dtype=weight_dtype, vae_dtype=vae_dtype,
                            noise_generator=noise_generator)
    noise = torch.randn(latents.shape, generator=noise_generator, device=device, dtype=latents.dtype)
    u = compute_density_for_timestep_sampling(config.weighting_scheme, latents.shape[0], logit_mean=config.logit_mean,
                                              logit_std=config.logit_std, mode_scale=config.mode_scale, device=device,
                                              generator=noise_generator)
    indices = (u * len(sigma_table)).long().clamp(0, len(sigma_table) - 1)
    sigmas = sigma_table.to(device)[indices]
    shaped = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return latents, noise, sigmas, (1.0 - shaped) * latents + shaped * noise


def flow_conditioning(batch: dict, base, device, *, weight_dtype: torch.dtype) -> dict:
    """The batch's cached conditioning (``prompt_embeds``...) or the text encoders', in ``weight_dtype``."""
    if "prompt_embeds" in batch:
        cond = {k: batch[k] for k in ("prompt_embeds", "pooled_prompt_embeds") if k in batch}
    else:
        cond = encode_flow_prompts(base, batch["caption"], device)

    def cast(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype=weight_dtype)
        return [v.to(device, dtype=weight_dtype) for v in value]

    return {k: cast(v) for k, v in cond.items()}


def flow_loss(base, denoiser, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
              noisy: torch.Tensor, cond: dict, *, weighting_scheme: str, guidance: float | None,
              per_sample: bool = False) -> torch.Tensor:
    """The recipe's weighted MSE between the denoiser's velocity and ``noise - latents``: the batch
    mean, or one value per sample ``[B]`` with ``per_sample``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    prediction = predict_velocity(base, denoiser, noisy, sigmas, cond, guidance)
    target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.view(-1, *([1] * (latents.ndim - 1))))
    squared = (weighting.float() * (prediction.float() - target.float()) ** 2).reshape(latents.shape[0], -1)
    per_image = squared.mean(dim=1)
    return per_image if per_sample else per_image.mean()
