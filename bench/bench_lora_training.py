"""LoRA training step time: our trainer against the diffusers reference recipe, in the same run.

    python bench/bench_lora_training.py                       # CPU: tiny SD1.5-shaped model, 64 px
    python bench/bench_lora_training.py --model sd15 --device cuda --resolution 512 --batch 4

The reference is the loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
(peft LoRA on to_q/k/v/out, AdamW, accelerate, VAE + text encoder run every step, torchvision
transforms), written out plainly below. Ours is ``trainer/train_lora.py``'s ``main`` on the same
model folder, images, captions, rank, batch, precision and optimiser, once as is and once with
cached latents and text embeddings. Each variant runs in its own process (clean peak memory and
no shared caches); step times are medians after warm-up. Weights are random (speed does not
depend on their values); ``--model sd15`` builds the full-size SD1.5 architecture from the configs
shipped in ``models/configs``.

Goals: ours <= 1.0x the reference; ours with caches <= 0.6x.
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
VARIANTS = ("reference", "ours", "ours_cached")


# -- model and data --------------------------------------------------------------------------------

def build_model(kind: str, folder: Path) -> Path:
    """A diffusers SD1.5 pipeline folder with random weights: ``tiny`` (tests' model) or ``sd15`` (full size)."""
    import torch

    if kind == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models.sd import build_tiny_sd15

        return build_tiny_sd15(folder).folder
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = REPO / "models" / "configs" / "sd15"
    out = folder / "sd15-random"
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")).save_pretrained(out / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")).save_pretrained(out / "vae")
    text_config = CLIPTextConfig.from_pretrained(str(configs / "text_encoder"))
    CLIPTextModel(text_config).save_pretrained(out / "text_encoder")
    DDPMScheduler.from_pretrained(str(configs), subfolder="scheduler").save_pretrained(out / "scheduler")
    _byte_level_tokenizer(out / "tokenizer")
    (out / "model_index.json").write_text((configs / "model_index.json").read_text())
    return out


def _byte_level_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of a byte-level CLIP vocabulary (no merges): offline, and token count
    does not change the step time (every caption is padded to 77 tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2 / CLIP byte -> printable character table.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True}))


def build_dataset(folder: Path, count: int, resolution: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models.lora_training import make_kohya_dataset

    return make_kohya_dataset(folder, aspects={"aesthetics": 1}, images_per_aspect=count,
                              sizes=[(resolution, resolution)])


# -- the reference: diffusers' train_text_to_image_lora.py loop ----------------------------------------

def run_reference(args, model: Path, dataset: Path) -> list[float]:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(0)
    noise_scheduler = DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet_lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    cast_training_params(unet, dtype=torch.float32)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    train_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    files = sorted(dataset.rglob("*.png"))
    examples = [(f, f.with_suffix(".txt").read_text()) for f in files]

    def load(index):
        path, caption = examples[index]
        ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids[0]
        return {"pixel_values": train_transforms(Image.open(path).convert("RGB")), "input_ids": ids}

    def collate(batch):
        return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]).float(),
                "input_ids": torch.stack([b["input_ids"] for b in batch])}

    dataloader = torch.utils.data.DataLoader(list(range(len(examples))), shuffle=True, batch_size=args.batch,
                                             collate_fn=lambda idx: collate([load(i) for i in idx]), drop_last=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    unet.train()
    # Timed like ours: from the end of one step to the end of the next (data loading included).
    times, step, last = [], 0, time.perf_counter()
    while step < args.steps:
        for batch in dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(args.batch)).mean()
                _ = avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            now = time.perf_counter()  # .item() above synchronised the device
            times.append(now - last)
            last = now
            if step >= args.steps:
                break
    return times


# -- ours --------------------------------------------------------------------------------------------------

def run_ours(args, model: Path, dataset: Path, cached: bool) -> list[float]:
    _import_pack()
    from versat2i.trainer.config import LoraTrainConfig

    work = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    config = LoraTrainConfig(
        base_model=str(model), dataset_dir=str(dataset), aspect="aesthetics", output_dir=str(work / "loras"),
        output_name="bench", work_dir=str(work / "run"), resolution=args.resolution, bucket_step=8,
        rank=args.rank, alpha=float(args.rank), train_batch_size=args.batch, max_train_steps=args.steps,
        learning_rate=1e-4, mixed_precision=args.mixed_precision, checkpointing_steps=args.steps + 1, seed=0,
        cache_latents=cached, cache_text_embeddings=cached)
    return ours_step_times(config)


def ours_step_times(config) -> list[float]:
    """Train ``config`` with ``trainer/train_lora.py``'s ``main`` in this process (its event lines
    hidden) and return each step's time, from the run's event log."""
    from versat2i.trainer import train_lora, training_loop
    from versat2i.trainer.events import read_events

    config_path = config.save(Path(config.work_dir).parent / "config.toml")
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            train_lora.main(train_lora.parse_args(["--config", str(config_path)]))
        finally:
            sys.stdout = stdout
    events = read_events(Path(config.work_dir) / training_loop.LOG_FILE_NAME)
    start = next(e["time"] for e in events if e["event"] == "start")
    stamps = [start] + [e["time"] for e in events if e["event"] == "step"]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _import_pack() -> None:
    """Import this checkout as ``versat2i`` whether or not it is pip-installed (as the trainer's child does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("versat2i_launch_entry", REPO / "trainer" / "launch_entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry.import_pack()


def run_variant(args) -> dict:
    import torch

    model, dataset = Path(args.model_dir), Path(args.dataset_dir)
    if args.variant == "reference":
        times = run_reference(args, model, dataset)
    else:
        times = run_ours(args, model, dataset, cached=args.variant == "ours_cached")
    measured = times[args.warmup:] or times
    if torch.cuda.is_available() and args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kind = "process max RSS"
    return {"variant": args.variant, "median_step_s": statistics.median(measured),
            "mean_step_s": statistics.fmean(measured), "steps_timed": len(measured), "peak_bytes": peak,
            "peak_kind": kind}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--mixed-precision", default=None, help="default: bf16 on cuda, no on cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the variants (best median counts)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.model == "tiny" else 512)
    if args.images < args.batch:  # the reference drops the last partial batch: it would never take a step
        parser.error(f"--images {args.images} < --batch {args.batch}: give at least one full batch of images")
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch

        torch.set_num_threads(1)
    if args.variant:  # child: one measurement, printed as JSON
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    t0 = time.perf_counter()
    model = build_model(args.model, work / "model")
    dataset = build_dataset(work / "dataset", args.images, args.resolution)
    print(f"model {args.model} built in {time.perf_counter() - t0:.1f} s; {args.images} images at "
          f"{args.resolution}px, batch {args.batch}, rank {args.rank}, {args.steps} steps "
          f"({args.warmup} warm-up), {args.mixed_precision}, {args.device}, {args.repeats} round(s)")
    results: dict[str, dict] = {}
    # Variants alternate, ``--repeats`` rounds; the best median of each counts (load from other
    # processes on a shared machine only ever slows a round down).
    for variant in [v for _ in range(args.repeats) for v in args.variants.split(",")]:
        command = [sys.executable, __file__, "--variant", variant, "--model-dir", str(model), "--dataset-dir",
                   str(dataset), "--model", args.model, "--device", args.device, "--resolution",
                   str(args.resolution), "--batch", str(args.batch), "--rank", str(args.rank), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--mixed-precision", args.mixed_precision]
        out = subprocess.run(command, capture_output=True, text=True)
        line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(f"{variant} failed:\n{out.stderr[-3000:]}")
            return 1
        result = json.loads(line[len("RESULT "):])
        if variant not in results or result["median_step_s"] < results[variant]["median_step_s"]:
            results[variant] = result
    base = results.get("reference")
    print(f"\n{'variant':<13} {'median step':>12} {'mean step':>10} {'ratio':>7}  peak memory")
    for variant, r in results.items():
        ratio = f"{r['median_step_s'] / base['median_step_s']:.2f}x" if base else "-"
        print(f"{variant:<13} {r['median_step_s'] * 1000:>9.1f} ms {r['mean_step_s'] * 1000:>7.1f} ms {ratio:>7}  "
              f"{r['peak_bytes'] / 2**20:,.0f} MiB ({r['peak_kind']})")
    if base:
        for variant, goal in (("ours", 1.0), ("ours_cached", 0.6)):
            if variant in results:
                ratio = results[variant]["median_step_s"] / base["median_step_s"]
                verdict = "met" if ratio <= goal else "NOT met"
                print(f"{variant} / reference = {ratio:.2f}x (goal <= {goal}x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
