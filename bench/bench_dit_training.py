"""DiT LoRA training step time: our trainer against diffusers' own recipe for the family, in one run.

    python bench/bench_dit_training.py                           # CPU: FLUX.2-klein 4B width, 1+1 blocks, 256 px
    python bench/bench_dit_training.py --double 5 --single 20    # full depth (klein 4B: 7.2 GiB bf16)
    python bench/bench_dit_training.py --device cuda --resolution 1024 --double 5 --single 20

The reference is the training loop of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux2_klein.py``
(peft LoRA on the recipe's targets, AdamW, accelerate, latents cached as the VAE's mode, prompt
embeddings cached, patchify + batch-norm normalisation + flow-matching noise every step), written
out plainly below. Ours is ``trainer/train_lora.py``'s ``main`` on the same model folder, images,
captions, rank, batch, precision and options (latents and text embeddings cached). Both read one
diffusers folder: FLUX.2-klein 4B's full width (hidden 3072, 24 heads, text input 7680) at a
reduced depth, random weights (speed does not depend on their values), a Qwen3 of the real width
2560 (28 thin layers: klein reads layers 9 / 18 / 27) and the full FLUX.2 VAE. Each variant runs in
its own process; step times are medians after warm-up, best of ``--repeats`` rounds.

Goal: ours / reference <= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("reference", "ours")
RECIPE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"]  # + single blocks' attn.to_out


def build_model(folder: Path, double: int, single: int) -> Path:
    """A diffusers FLUX.2-klein folder with random weights at klein 4B's width."""
    import shutil

    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    configs = REPO / "models" / "configs" / "flux2-klein-4b"
    torch.manual_seed(0)
    transformer_config = {**Flux2Transformer2DModel.load_config(str(configs), subfolder="transformer"),
                          "num_layers": double, "num_single_layers": single}
    Flux2Transformer2DModel.from_config(transformer_config).to(torch.bfloat16).save_pretrained(folder / "transformer")
    AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(str(configs), subfolder="vae")).save_pretrained(
        folder / "vae")
    qwen = json.loads((configs / "text_encoder" / "config.json").read_text())
    qwen.update(num_hidden_layers=28, intermediate_size=256, num_attention_heads=1, num_key_value_heads=1)
    Qwen3Model(Qwen3Config(**qwen)).to(torch.bfloat16).save_pretrained(folder / "text_encoder")
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(configs / part, folder / part)
    index = json.loads((configs / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def build_dataset(folder: Path, count: int, resolution: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models.lora_training import make_kohya_dataset

    return make_kohya_dataset(folder, aspects={"aesthetics": 1}, images_per_aspect=count,
                              sizes=[(resolution, resolution)])


# -- the reference: diffusers' train_dreambooth_lora_flux2_klein.py loop -----------------------------------

def run_reference(args, model: Path, dataset: Path) -> list[float]:
    import copy

    import torch
    from accelerate import Accelerator
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import (
        cast_training_params,
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms
    from transformers import AutoTokenizer, Qwen3Model

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    torch.manual_seed(0)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(model), subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    tokenizer = AutoTokenizer.from_pretrained(str(model / "tokenizer"))
    text_encoder = Qwen3Model.from_pretrained(str(model / "text_encoder"), torch_dtype=weight_dtype)
    vae = AutoencoderKLFlux2.from_pretrained(str(model), subfolder="vae")
    transformer = Flux2Transformer2DModel.from_pretrained(str(model), subfolder="transformer", torch_dtype=weight_dtype)
    for module in (transformer, vae, text_encoder):
        module.requires_grad_(False)
    latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(accelerator.device)
    latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(accelerator.device)
    transformer.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device)
    targets = RECIPE_TARGETS + [f"single_transformer_blocks.{i}.attn.to_out"
                                for i in range(len(transformer.single_transformer_blocks))]
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=targets))
    cast_training_params(transformer, dtype=torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_layers = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    train_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    files = sorted(dataset.rglob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    # the recipe's caches: prompt embeddings and (--cache_latents) the VAE's latent mode per image
    encoder_pipeline = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                          transformer=None)
    prompt_embeds_cache, text_ids_cache, latents_cache = [], [], []
    with torch.no_grad():
        for path, caption in zip(files, captions, strict=True):
            embeds, ids = encoder_pipeline.encode_prompt(caption, device=accelerator.device, max_sequence_length=512)
            prompt_embeds_cache.append(embeds)
            text_ids_cache.append(ids)
            pixels = train_transforms(Image.open(path).convert("RGB"))[None].to(accelerator.device, dtype=vae.dtype)
            latents_cache.append(vae.encode(pixels).latent_dist.mode())
    text_encoder.to("cpu")

    dataloader = torch.utils.data.DataLoader(list(range(len(files))), shuffle=True, batch_size=args.batch,
                                             collate_fn=lambda idx: {"indices": idx}, drop_last=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, dataloader,
                                                                           lr_scheduler)

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(device=accelerator.device, dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps.to(accelerator.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(accelerator.device)]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    transformer.train()
    times, step, last = [], 0, time.perf_counter()
    while step < args.steps:
        for batch in dataloader:
            indices = batch["indices"]
            with accelerator.accumulate(transformer):
                prompt_embeds = torch.cat([prompt_embeds_cache[i] for i in indices], dim=0)
                text_ids = torch.cat([text_ids_cache[i] for i in indices], dim=0)
                model_input = torch.cat([latents_cache[i] for i in indices], dim=0)
                model_input = Flux2KleinPipeline._patchify_latents(model_input)
                model_input = (model_input - latents_bn_mean) / latents_bn_std
                model_input_ids = Flux2KleinPipeline._prepare_latent_ids(model_input).to(device=model_input.device)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0,
                                                          logit_std=1.0, mode_scale=1.29)
                idx = (u * noise_scheduler_copy.config.num_train_timesteps).long()
                timesteps = noise_scheduler_copy.timesteps[idx].to(device=model_input.device)
                sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
                noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
                packed = Flux2KleinPipeline._pack_latents(noisy_model_input)
                model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                                         encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                                         return_dict=False)[0]
                model_pred = model_pred[:, : packed.size(1):]
                model_pred = Flux2KleinPipeline._unpack_latents_with_ids(model_pred, model_input_ids)
                weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
                target = noise - model_input
                loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
                    target.shape[0], -1), 1).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(transformer.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            _ = loss.detach().item()  # the recipe logs the loss every step (and so synchronises)
            step += 1
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if step >= args.steps:
                break
    return times


# -- ours ----------------------------------------------------------------------------------------------
# (this script's folder is first on sys.path: the SD benchmark's helpers are imported from it)
from bench_lora_training import _import_pack, ours_step_times  # noqa: E402


def run_ours(args, model: Path, dataset: Path) -> list[float]:
    _import_pack()
    from versat2i.trainer.config import LoraTrainConfig

    work = Path(tempfile.mkdtemp(prefix="bench-dit-ours-"))
    config = LoraTrainConfig(
        base_model=str(model), dataset_dir=str(dataset), aspect="aesthetics", output_dir=str(work / "loras"),
        output_name="bench", work_dir=str(work / "run"), resolution=args.resolution, bucket_step=16,
        rank=args.rank, alpha=float(args.rank), train_batch_size=args.batch, max_train_steps=args.steps,
        learning_rate=1e-4, adam_weight_decay=1e-4, mixed_precision=args.mixed_precision,
        checkpointing_steps=args.steps + 1, seed=0, cache_latents=True, cache_text_embeddings=True,
        gradient_checkpointing=args.gradient_checkpointing)
    return ours_step_times(config)  # the same timing as bench_lora_training.py


def run_variant(args) -> dict:
    import torch

    model, dataset = Path(args.model_dir), Path(args.dataset_dir)
    times = run_reference(args, model, dataset) if args.variant == "reference" else run_ours(args, model, dataset)
    measured = times[args.warmup:] or times
    if args.device == "cuda" and torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
    return {"variant": args.variant, "median_step_s": statistics.median(measured),
            "mean_step_s": statistics.fmean(measured), "steps_timed": len(measured), "peak_bytes": peak,
            "peak_kind": kind}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (klein 4B: 5)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (klein 4B: 20)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the variants (best median counts)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < args.batch:
        parser.error(f"--images {args.images} < --batch {args.batch}: give at least one full batch of images")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["ACCELERATE_USE_CPU"] = "1"
        import torch

        torch.set_num_threads(1)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-dit-"))
    t0 = time.perf_counter()
    model = build_model(work / "model", args.double, args.single)
    dataset = build_dataset(work / "dataset", args.images, args.resolution)
    print(f"FLUX.2-klein 4B width, {args.double} double + {args.single} single blocks, built in "
          f"{time.perf_counter() - t0:.1f} s; {args.images} images at {args.resolution}px, batch {args.batch}, rank "
          f"{args.rank}, {args.steps} steps ({args.warmup} warm-up), {args.mixed_precision}, {args.device}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, latents and text cached")
    results: dict[str, dict] = {}
    for variant in [v for _ in range(args.repeats) for v in VARIANTS]:
        command = [sys.executable, __file__, "--variant", variant, "--model-dir", str(model), "--dataset-dir",
                   str(dataset), "--device", args.device, "--resolution", str(args.resolution), "--batch",
                   str(args.batch), "--rank", str(args.rank), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--mixed-precision", args.mixed_precision,
                   *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
        out = subprocess.run(command, capture_output=True, text=True)
        line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(f"{variant} failed:\n{out.stderr[-3000:]}")
            return 1
        result = json.loads(line[len("RESULT "):])
        if variant not in results or result["median_step_s"] < results[variant]["median_step_s"]:
            results[variant] = result
    base = results["reference"]
    print(f"\n{'variant':<10} {'median step':>12} {'mean step':>10} {'ratio':>7}  peak memory")
    for variant, r in results.items():
        print(f"{variant:<10} {r['median_step_s']:>10.2f} s {r['mean_step_s']:>8.2f} s "
              f"{r['median_step_s'] / base['median_step_s']:>6.2f}x  {r['peak_bytes'] / 2**30:.2f} GiB "
              f"({r['peak_kind']})")
    ratio = results["ours"]["median_step_s"] / base["median_step_s"]
    print(f"ours / reference = {ratio:.2f}x (goal <= 1.0x): {'met' if ratio <= 1.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
