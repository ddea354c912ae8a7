"""One LoRA training step of a DiT at full width and depth, with each memory option: step time and peak
memory, next to the trainer's own estimate (``trainer/memory_plan.py``).

    python bench/dit_full_size.py                          # CPU: FLUX.2-klein 4B, bf16, 256 px (~15 min, 12 GiB RAM)
    python bench/dit_full_size.py --device cuda --resolution 1024      # a GPU (about 5 min on one H100)
    python bench/dit_full_size.py --model zimage --options gc,fp8+gc

Random weights (speed and memory do not depend on their values), bf16, LoRA rank 16 on the family's
default targets, one batch of one image; the text embeddings are random tensors of the real shape, as
a run with ``cache_text_embeddings`` has them (the text encoder is freed before training, so it is
not part of the step). Each option runs in its own process, through the trainer's own functions in
the trainer's order: ``store_frozen_weights_in_fp8`` before the LoRA layers, ``add_lora_adapters``,
LoRA weights in fp32, gradient checkpointing, ``offload_frozen_blocks``, then ``objective.flow_loss``
and an AdamW step.

Peak memory: on CPU the resident set size while stepping (sampled every 20 ms; weights included),
next to the process's max RSS, which also holds building the model in bf16 before fp8 storage casts
it; on CUDA ``torch.cuda.max_memory_allocated``. On CUDA the script also checks block offloading:
the LoRA gradients with ``offload`` must equal those without (it prints PASS / FAIL), which is
what the trainer's ``offload_blocks`` relies on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODELS = {"flux2-klein-4b": ("flux2_klein", "flux2-klein-4b", (128, 16)), "zimage": ("zimage", "zimage", (16, 8)),
          "flux2-klein-9b": ("flux2_klein", "flux2-klein-9b", (128, 16)), "flux1-dev": ("flux1", "flux1-dev", (16, 8))}
OPTIONS = {"none": {}, "gc": {"gradient_checkpointing": True}, "fp8": {"fp8_base": True},
           "fp8+gc": {"fp8_base": True, "gradient_checkpointing": True},
           "offload+gc": {"offload_blocks": True, "gradient_checkpointing": True},
           "all": {"fp8_base": True, "gradient_checkpointing": True, "offload_blocks": True}}


def _import_pack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("versat2i_launch_entry", REPO / "trainer" / "launch_entry.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    entry.import_pack()


def build(args, device):
    """(base-like namespace, denoiser) at full size, bf16, random weights."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    from versat2i.models.architectures import architecture
    from versat2i.models.loading import CONFIG_ROOT

    family, variant, _ = MODELS[args.model]
    entry = architecture(family)
    cls = getattr(diffusers, entry.denoiser_class)
    config = dict(cls.load_config(str(CONFIG_ROOT / variant), subfolder="transformer"))
    if args.blocks:  # reduced depth (a smoke run); the full depth otherwise
        config.update({key: args.blocks for key, _ in entry.memory.blocks})
    with init_empty_weights():
        denoiser = cls.from_config(config)
    denoiser = denoiser.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for buffer in denoiser.buffers():  # rope tables are computed at init, not weights
            if buffer.is_floating_point() and not torch.isfinite(buffer).all():
                buffer.zero_()
    base = SimpleNamespace(architecture=entry, denoiser=denoiser, vae=None, text_encoders=[],
                           variant=entry.variant(variant))
    return base, config


def inputs(args, base, config, device):
    import torch

    _, _, (channels, scale) = MODELS[args.model]
    side = args.resolution // scale
    generator = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, channels, side, side, generator=generator, device=device, dtype=torch.bfloat16)
    width = config.get("joint_attention_dim") or config["cap_feat_dim"]
    tokens = base.architecture.memory.text_tokens
    if base.architecture.denoiser_call == "flux":
        cond = {"prompt_embeds": torch.randn(1, tokens, width, generator=generator, device=device,
                                             dtype=torch.bfloat16),
                "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=generator,
                                                    device=device, dtype=torch.bfloat16)}
    elif base.architecture.denoiser_call == "zimage":
        cond = {"prompt_embeds": [torch.randn(tokens, width, generator=generator, device=device, dtype=torch.bfloat16)]}
    else:
        cond = {"prompt_embeds": torch.randn(1, tokens, width, generator=generator, device=device,
                                             dtype=torch.bfloat16)}
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    return latents, noise, cond


def run_option(args) -> dict:
    import torch
    from diffusers.training_utils import cast_training_params

    _import_pack()
    from versat2i.trainer import memory_plan as memory
    from versat2i.trainer.objective import flow_loss
    from versat2i.trainer.train_lora import add_lora_adapters, lora_targets

    device = torch.device(args.device)
    options = OPTIONS[args.option]
    t0 = time.perf_counter()
    base, config = build(args, device)
    built = time.perf_counter() - t0
    if options.get("fp8_base"):
        memory.store_frozen_weights_in_fp8(base.denoiser, torch.bfloat16)
    torch.manual_seed(0)
    lora = SimpleNamespace(rank=args.rank, alpha=float(args.rank), dropout=0.0, train_feed_forward=False,
                           train_text_encoder=False)
    add_lora_adapters(base, lora)
    cast_training_params([base.denoiser], dtype=torch.float32)
    if options.get("gradient_checkpointing"):
        base.denoiser.enable_gradient_checkpointing()
    if options.get("offload_blocks"):
        memory.offload_frozen_blocks(base.denoiser, device)
    base.denoiser.train()
    params = [p for p in base.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents, noise, cond = inputs(args, base, config, device)
    sigmas = torch.tensor([0.6], device=device)
    sigma = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - sigma) * latents + sigma * noise
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    watcher = RssWatcher().start()  # CPU: the RSS while stepping (max RSS also holds the bf16 build)
    times, grads = [], None
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = flow_loss(base, base.denoiser, latents, noise, sigmas, noisy, cond, weighting_scheme="none",
                             guidance=None)
        loss.backward()
        if step == 0 and args.dump_grads:
            grads = {n: p.grad.detach().float().cpu() for n, p in base.denoiser.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_rss = watcher.stop()
    if args.dump_grads:
        torch.save(grads, args.dump_grads)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, kind = step_rss, "RSS during the step"
    sizes = memory.model_sizes(base.architecture, config, None, [], rank=args.rank,
                               targets=lora_targets(base.architecture, False))
    estimate = memory.estimate(sizes, memory.MemoryOptions(cache_text_embeddings=True, **options),
                               resolution=args.resolution, batch_size=1, weight_bytes=2)
    result = {"option": args.option, "build_s": built, "step_s": times[-1], "first_step_s": times[0],
              "peak_bytes": peak, "peak_kind": kind, "estimate_bytes": estimate.total, "loss": float(loss),
              "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    return result


class RssWatcher:
    """The largest resident set size of this process, sampled every 20 ms between start and stop."""

    def __init__(self):
        import threading

        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.02)

    def start(self):
        self.peak = self.process.memory_info().rss
        self.thread.start()
        return self

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.process.memory_info().rss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="flux2-klein-4b")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="steps per option (default: cpu 1, cuda 3)")
    parser.add_argument("--options", default=None, help=f"comma-separated of {', '.join(OPTIONS)} "
                                                        "(default: cpu none,gc,fp8+gc,fp8; cuda all of them)")
    parser.add_argument("--blocks", type=int, default=0, help="blocks of each kind (default: the model's full depth)")
    parser.add_argument("--option", help=argparse.SUPPRESS)
    parser.add_argument("--dump-grads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.device == "cpu" else 3)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.option:
        result = run_option(args)
        print("RESULT " + json.dumps(result), flush=True)
        Path(f"/tmp/dit_full_size_{args.model}_{args.option}.json").write_text(json.dumps(result))
        return 0
    chosen = (args.options or ("none,gc,fp8+gc,fp8" if args.device == "cpu" else ",".join(OPTIONS))).split(",")
    depth = f"{args.blocks} block(s) of each kind" if args.blocks else "full depth"
    print(f"{args.model}, full width, {depth}, bf16, {args.resolution} px, batch 1, LoRA r{args.rank}, "
          f"{args.device}, {args.steps} step(s) per option (the last is timed)")
    print(f"{'option':<11} {'step':>9} {'peak':>10} {'estimate':>10}  (build)")
    grads_files = {}
    for option in chosen:
        command = [sys.executable, __file__, "--option", option, "--model", args.model, "--device", args.device,
                   "--resolution", str(args.resolution), "--rank", str(args.rank), "--steps", str(args.steps),
                   "--blocks", str(args.blocks)]
        if args.device == "cuda" and option in ("gc", "offload+gc"):
            grads_files[option] = Path(f"/tmp/dit_full_size_grads_{option}.pt")
            command += ["--dump-grads", str(grads_files[option])]
        out = subprocess.run(command, capture_output=True, text=True)
        line = next((row for row in out.stdout.splitlines() if row.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
            print(f"{option:<11} FAILED: {why}")
            continue
        r = json.loads(line[len("RESULT "):])
        print(f"{option:<11} {r['step_s']:>7.2f} s {r['peak_bytes'] / 2**30:>6.2f} GiB "
              f"{r['estimate_bytes'] / 2**30:>6.2f} GiB"
              f"  ({r['build_s']:.0f} s; {r['peak_kind']}; process max RSS {r['max_rss_bytes'] / 2**30:.2f} GiB)",
              flush=True)
    if len(grads_files) == 2 and all(p.is_file() for p in grads_files.values()):
        import torch

        plain, offloaded = (torch.load(p, weights_only=True) for p in grads_files.values())
        worst = max(float((plain[k] - offloaded[k]).abs().max() / plain[k].abs().max().clamp(min=1e-12)) for k in plain)
        print(f"block offloading: LoRA gradients vs no offloading, max relative difference {worst:.2e}: "
              f"{'PASS' if worst < 1e-2 and plain.keys() == offloaded.keys() else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
