"""Train the demo base model from the demo world's renderer (offline, seeded, reproducible).

    python -m versat2i.demo.train_base --output demo/weights/versat2i-demo-base

The shipped weights (demo/weights/versat2i-demo-base) were made by this script; the header of
demo/weights/README.md records the exact command, the device and how long it took. The demo loop
itself never trains the base model: it starts from the shipped weights.

Two phases, one script read top to bottom:

1. VAE: a one-block AutoencoderKL trained to be the identity between pixels and latents
   (latent[:3] = 2*rgb - 1, latent[3] = 0, tiny posterior variance), on rendered scenes plus
   blurred, noisy and random-colour images, so it stays the identity on whatever the UNet produces.
2. UNet + text encoder, from scratch, on endless freshly rendered (caption, image) pairs with the
   x0 objective (the scheduler's prediction_type "sample"), 10 % caption dropout (for
   classifier-free guidance), AdamW with warm-up and cosine decay, and an EMA of the weights (the
   saved model). Checkpoints on the way are scored with the demo rewards (``--eval-every``), which
   is how the shipped step count was chosen: shapes recognisable, every aspect with headroom.

Same seed + same device + same torch build = same weights; other devices give a model of the same
quality, not the same bits.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..safe_io import atomic_dir
from . import model, world
from .rewards import ASPECT_COMPONENTS, analyse
from .rewards import components as reward_components

logger = logging.getLogger("versat2i.demo.train_base")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder to write the diffusers model to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (be polite on shared machines)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=20000, help="UNet + text encoder steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--checkpoint-steps", type=int, nargs="*", default=[],
                        help="also save the EMA model at these steps (as <output>-step<N>)")
    parser.add_argument("--stop-step", type=int, default=0,
                        help="stop after this step; the learning-rate schedule still spans --steps (0: at --steps)")
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="stop (and save) after this much wall time even if --steps is not reached (0: no limit)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="every N steps, sample 96 images and log the demo rewards (0: never)")
    return parser.parse_args(input_args)


# -- data --------------------------------------------------------------------------------------

def random_scene_batch(count: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """``count`` random (caption, real image) pairs; images ``[B,3,H,W]`` in -1..1 on the CPU."""
    scenes = world.all_scenes()
    picks = torch.randint(len(scenes), (count,), generator=generator).tolist()
    chosen = [scenes[i] for i in picks]
    images = world.render_scenes(chosen, world.random_layouts(count, generator).float())
    return [s.caption for s in chosen], images.permute(0, 3, 1, 2) * 2 - 1


def vae_training_batch(count: int, generator: torch.Generator) -> torch.Tensor:
    """Images the VAE must reproduce: real scenes, and the same blurred, noised or replaced by
    smooth random colour fields (what an imperfect UNet may produce). ``[B,3,H,W]`` in -1..1."""
    _, images = random_scene_batch(count, generator)
    kind = torch.randint(4, (count,), generator=generator)
    size = images.shape[-1]
    # Blur: a random mix of the image and its 3x3 box blur.
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(count, 1, 1, 1, generator=generator)
    images = torch.where((kind == 1).view(-1, 1, 1, 1), mix * blurred + (1 - mix) * images, images)
    noise = torch.randn(images.shape, generator=generator) * 0.3 * torch.rand(count, 1, 1, 1, generator=generator)
    images = torch.where((kind == 2).view(-1, 1, 1, 1), images + noise, images)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    fields = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = torch.where((kind == 3).view(-1, 1, 1, 1), fields, images)
    return images.clamp(-1, 1)


def identity_latents(images: torch.Tensor) -> torch.Tensor:
    """The latents the identity VAE should produce: the image in channels 0-2, zero in channel 3."""
    return torch.cat([images, torch.zeros_like(images[:, :1])], dim=1)


# -- phases ------------------------------------------------------------------------------------

def train_vae(vae, args, generator: torch.Generator) -> None:
    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.vae_lr, total_steps=max(args.vae_steps, 1))
    vae.train()
    for step in range(args.vae_steps):
        images = vae_training_batch(args.batch_size, generator).to(device)
        target = identity_latents(images)
        posterior = vae.encode(images).latent_dist
        # Encoder: mean = identity latents, log-variance pinned low (sampling ~ the mean).
        encoder_loss = F.mse_loss(posterior.mean, target) + 1e-3 * ((posterior.logvar + 12.0) ** 2).mean()
        # Decoder: identity on the encoder's output and on exact identity latents plus noise
        # (generated latents are never exact).
        jitter = torch.randn(target.shape, device=device, generator=None) * 0.05
        decoder_loss = F.mse_loss(vae.decode(posterior.sample()).sample, images) + F.mse_loss(
            vae.decode(target + jitter).sample, (images + jitter[:, :3]).clamp(-1, 1)
        )
        loss = encoder_loss + decoder_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            logger.info("vae step %d/%d loss %.5f", step, args.vae_steps, loss.item())
    vae.eval().requires_grad_(False)


def lr_factor(step: int, args) -> float:
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def ema_update(ema_modules, modules, decay: float) -> None:
    for ema, live in zip(ema_modules, modules):
        torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1 - decay)


@torch.no_grad()
def evaluate(components: dict, device: torch.device, seed: int = 1234) -> dict[str, float]:
    """Mean demo rewards of 96 samples (all captions, fixed seeds; DDIM 20 steps, guidance 1 and 3)."""

    pipe = model.build_pipeline(components).to(device)
    pipe.set_progress_bar_config(disable=True)
    captions = [s.caption for s in world.all_scenes()]
    captions = (captions * 2)[:96]
    results = {}
    for guidance in (1.0, 3.0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipe(captions, height=world.IMAGE_SIZE, width=world.IMAGE_SIZE, num_inference_steps=20,
                      guidance_scale=guidance, generator=generator, output_type="pt").images
        images = images.permute(0, 2, 3, 1).float().cpu()
        parts = reward_components(images, captions, analyse(images))
        for aspect, names in ASPECT_COMPONENTS.items():
            results[f"cfg{guidance:g}/{aspect}"] = float(torch.stack([parts[n] for n in names]).mean())
        results[f"cfg{guidance:g}/colour_match"] = float(parts["colour_match"].mean())
    return results


def save(components: dict, folder: Path, overwrite: bool, info: dict) -> None:
    """Write the pipeline folder atomically (``safe_io.atomic_dir``: a hidden temporary folder,
    renamed when complete; an existing folder is replaced only with ``overwrite``)."""

    pipe = model.build_pipeline({k: (copy.deepcopy(v).to("cpu") if k in ("unet", "vae", "text_encoder") else v)
                                 for k, v in components.items()})
    with atomic_dir(folder, overwrite=overwrite, what="demo base model") as temp:
        pipe.save_pretrained(temp, safe_serialization=True)
        model.write_slow_tokenizer_files(pipe.tokenizer, temp / "tokenizer")
        (temp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("saved %s", folder)


def main(args: argparse.Namespace) -> dict:
    if args.output.exists() and not args.overwrite:  # before hours of training, not after
        raise FileExistsError(f"--output {args.output} exists; choose another folder or pass --overwrite to replace it")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    components = model.build_components(seed=args.seed)
    vae, unet, text_encoder = (components[k].to(device) for k in ("vae", "unet", "text_encoder"))
    tokenizer = components["tokenizer"]

    # Phase 1: the identity VAE.
    train_vae(vae, args, generator)
    vae_seconds = time.time() - started

    # Phase 2: UNet + text encoder.
    from diffusers import DDPMScheduler

    # The training noise schedule read from the sampling scheduler's config, as the LoRA trainer does.
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    unet.train()
    text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    history = []
    running = 0.0
    for step in range(1, args.steps + 1):
        captions, images = random_scene_batch(args.batch_size, generator)
        drop = torch.rand(len(captions), generator=generator) < args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            latents = vae.encode(images.to(device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, latents)  # prediction_type "sample": the target is x0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_update((ema_unet, ema_text), (unet, text_encoder), min(args.ema_decay, (1 + step) / (10 + step)))
        running += loss.item()
        if step % 200 == 0:
            logger.info("step %d/%d loss %.5f lr %.2e (%.0f s)", step, args.steps, running / 200,
                        schedule.get_last_lr()[0], time.time() - started)
            running = 0.0
        snapshot = {**components, "unet": ema_unet, "text_encoder": ema_text, "vae": vae}
        if args.eval_every and step % args.eval_every == 0:
            scores = evaluate(snapshot, device)
            history.append({"step": step, "seconds": round(time.time() - started, 1), **scores})
            logger.info("eval step %d: %s", step, json.dumps({k: round(v, 3) for k, v in scores.items()}))
        out_of_time = bool(args.max_minutes) and time.time() - started > 60 * args.max_minutes
        if step in args.checkpoint_steps and not out_of_time:
            info = {"step": step, "seconds": round(time.time() - started, 1),
                    "args": vars(args) | {"output": str(args.output)}}
            save(snapshot, args.output.with_name(f"{args.output.name}-step{step}"), True, info)
        if out_of_time:
            logger.warning("stopping at step %d: --max-minutes %g reached", step, args.max_minutes)
            break
        if step == args.stop_step:
            logger.info("stopping at step %d (--stop-step)", step)
            break

    seconds = time.time() - started
    info = {
        "steps": step,
        "seconds": round(seconds, 1),
        "vae_seconds": round(vae_seconds, 1),
        "device": str(device),
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "eval_history": history,
    }
    save({**components, "unet": ema_unet, "text_encoder": ema_text, "vae": vae}, args.output, args.overwrite, info)
    return info


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(parse_args())
