"""Step time of the Mixture-of-LoRA modes on a DiT against its base model, measured in one run.

ComfyUI's own FLUX.1 (schnell layout: no guidance input) or FLUX.2-klein model at the released
width (3072, 24 heads) with reduced depth (``--double`` / ``--single`` blocks), random weights,
512 px (1024 image tokens; FLUX.1 256 text tokens, klein 512), batch 1 (cfg 1, as the distilled
models sample). 4 aspect LoRAs of rank 16 in diffusers' keys on every Linear the family's table
entry targets (attention and MLPs of the double- and single-stream blocks, ``train_feed_forward``
on): in ComfyUI many are row blocks of fused weights (q / k / v; FLUX.1's single-block linear1).
Variants, applied by the Gated Multi-LoRA Loader's own code (``nodes/model_patching.py``):

* base           the plain model
* bake           the gate's merge weights merged once (weight patches, as any LoRA)
* dynamic        token gate at run time (fused: all A and the gate projection in one matmul per block)
* dynamic-prompt prompt gate at run time (FLUX.1: the pooled CLIP-L; klein: the text context)

Every variant samples through ``comfy.sample.sample`` (KSampler's path, euler); a step is the time
between the ends of consecutive sampler steps. On the CPU the clock is this process's CPU time
(``--clock process``, the default there: with one thread, what a step computes, whatever else runs
on a shared machine; wall-clock steps here varied 8-42 s under other jobs' load); on CUDA wall time
after a synchronize. The variants take turns within a round (in reversed order every other round).
Prints the ratios to base and PASS / FAIL against the goals (bake <= 1.02x, dynamic <= 1.05x;
fastest round of each variant), with the median of each round's own ratio beside them.
``--per-layer`` also times each gated Linear against its base forward in sub-second turns and
estimates the dynamic step ratio from their extra time: on a shared CPU the resolvable figure (there
whole steps of bake, the same computation as base, scatter by +-10 % between rounds).

    COMFYUI_PATH=/path/to/ComfyUI-0.33 OMP_NUM_THREADS=1 python bench/bench_mixture_dit.py
    COMFYUI_PATH=/path/to/ComfyUI-0.33 python bench/bench_mixture_dit.py --device cuda --double 19 --single 38 \\
        --steps 8 --repeats 3
    COMFYUI_PATH=... python bench/bench_mixture_dit.py --tiny    # width 128, 64 px: a smoke run in seconds

Needs ComfyUI 0.33 (its FLUX.1 detector reads the width from the weights; 0.3.64 has no FLUX.2).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mixture import goal_lines, import_comfy, import_pack, random_init_, round_order, sync  # noqa: E402

from versat2i.aspects import ASPECTS  # noqa: E402

# family -> (latent channels, pixels per latent cell, text tokens, text width, pooled width or None)
FAMILIES = {"flux1": (16, 8, 256, 4096, 768), "flux2_klein": (128, 16, 512, 7680, None)}
TINY_TEXT = {"flux1": (32, 32), "flux2_klein": (96, None)}
VARIANTS = ("base", "bake", "dynamic", "dynamic-prompt")


def comfy_model_config(family: str, hidden: int, double: int, single: int, text_width: int, pooled: int | None):
    """ComfyUI's own model config, from its detector run on the keys it reads (meta tensors)."""
    import comfy.model_detection

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    keys = {f"double_blocks.{i}.img_attn.norm.key_norm.scale": meta(128) for i in range(double)}
    keys.update({f"single_blocks.{i}.linear1.weight": meta(1, 1) for i in range(single)})
    keys["txt_in.weight"] = meta(hidden, text_width)
    if family == "flux2_klein":
        keys.update({"img_in.weight": meta(hidden, 128), "double_stream_modulation_img.lin.weight": meta(6 * hidden,
                                                                                                        hidden)})
    else:
        keys.update({"img_in.weight": meta(hidden, 64), "vector_in.in_layer.weight": meta(hidden, pooled)})
    return comfy.model_detection.model_config_from_unet(keys, "")


def lora_targets_of(family: str):
    """A predicate on diffusers module names: the family's LoRA targets (peft's suffix / regex rule)."""
    from versat2i.models.architectures import architecture
    from versat2i.trainer.train_lora import lora_targets

    targets = lora_targets(architecture(family), True)
    if isinstance(targets, str):
        return lambda module: re.fullmatch(targets, module) is not None
    return lambda module: any(module == t or module.endswith("." + t) for t in targets)


def build(args, dtype):
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher

    from versat2i.models.architectures import architecture
    from versat2i.nodes import model_patching
    from versat2i.trainer.gate import MixtureGate

    channels, cell, tokens, text_width, pooled = FAMILIES[args.family]
    if args.tiny:
        text_width, pooled = TINY_TEXT[args.family]
    entry = architecture(args.family)
    model_config = comfy_model_config(args.family, args.hidden, args.double, args.single, text_width, pooled)
    weight_dtype = getattr(args, "weight_dtype", None)  # fp8 storage, computed in ``dtype`` (manual cast)
    model_config.set_inference_dtype(weight_dtype or dtype, dtype if weight_dtype is not None else None)
    t0 = time.perf_counter()
    model = model_config.get_model({})
    random_init_(model)
    # the patcher class ComfyUI's own loaders use: 0.33's ModelPatcherDynamic once dynamic VRAM is
    # enabled (main.py; bench/dynamic_vram_check.py does it too), else the plain one
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    base = patcher_class(model, load_device=comfy.model_management.get_torch_device(),
                         offload_device=comfy.model_management.unet_offload_device())
    state = model.state_dict()
    is_target = lora_targets_of(args.family)
    shapes = {}
    for name, key in comfy.lora.model_lora_keys_unet(model, {}).items():
        if not name.startswith("transformer.") or not is_target(name[len("transformer."):]):
            continue
        weight_key, offset = (key, None) if isinstance(key, str) else key
        weight = state[weight_key] if offset is None else state[weight_key].narrow(*offset)
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    generator = torch.Generator().manual_seed(0)
    loras = []
    for aspect in ASPECTS:
        lora = {}
        for name, (out_features, in_features) in shapes.items():
            lora[f"{name}.lora_A.weight"] = torch.randn(args.rank, in_features, generator=generator) / in_features ** .5
            lora[f"{name}.lora_B.weight"] = torch.randn(out_features, args.rank, generator=generator) * 0.01
        loras.append(model_patching.AspectLoRA(aspect, f"{aspect}.safetensors", lora))
    layers = sorted(shapes)
    prompt_features = pooled if entry.gate_prompt_input == "pooled" else text_width
    gates = {}
    for granularity in ("token", "prompt"):
        gate = MixtureGate(list(ASPECTS), layers, [shapes[n][1] for n in layers], granularity,
                           prompt_features=prompt_features, timestep_range=entry.gate_timestep_range,
                           prompt_input=entry.gate_prompt_input)
        with torch.no_grad():
            for parameter_name, parameter in gate.named_parameters():
                if "temperature" not in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
            # As calibrated in training (the mean input norm: ~sqrt(width) for these unit-variance
            # activations), so logits are O(1). Uncalibrated, the random projection saturates the
            # softmax into float32 denormals, which a CPU computes ~100x slower (measured: +38 % on
            # one fused Linear).
            gate.input_scale.copy_(torch.tensor([float(shapes[n][1]) ** 0.5 for n in layers]))
        gates[granularity] = gate
    weights = sum(1 for _ in {(k if isinstance(k, str) else k[0]) for k in
                              (comfy.lora.model_lora_keys_unet(model, {})[n] for n in shapes)})
    print(f"model ({args.double} double + {args.single} single blocks, width {args.hidden}) + {len(loras)} LoRAs x "
          f"{len(shapes)} modules ({weights} ComfyUI weights) built in {time.perf_counter() - t0:.1f} s", flush=True)

    variants = {"base": base}
    t0 = time.perf_counter()
    variants["bake"], _ = model_patching.apply_mixture(base, None, loras, mode="bake", gate=gates["token"])
    build_s = time.perf_counter() - t0
    variants["dynamic"], _ = model_patching.apply_mixture(base, None, loras, mode="dynamic", gate=gates["token"])
    variants["dynamic-prompt"], _ = model_patching.apply_mixture(base, None, loras, mode="dynamic",
                                                                 gate=gates["prompt"])
    generator = torch.Generator().manual_seed(1)
    extra = {"pooled_output": torch.randn(1, pooled, generator=generator)} if pooled else {}
    positive = [[torch.randn(1, tokens if not args.tiny else 7, text_width, generator=generator), extra]]
    latent = torch.zeros(1, channels, args.size // cell, args.size // cell)
    return variants, positive, latent, build_s


def step_time(model, positive, latent, args) -> float:
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    stamps: list[float] = []

    clock = time.process_time if args.clock == "process" else time.perf_counter

    def step_done(step, x0, x, total_steps):
        sync(args.device)
        stamps.append(clock())

    def run(steps):
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                                   disable_pbar=True, seed=0, callback=step_done)

    run(args.warmup_steps)  # loads / merges this variant
    stamps.clear()
    run(args.steps)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="flux1", choices=list(FAMILIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--size", type=int, default=512, help="image side in px")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19, klein 4B: 5)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38, klein 4B: 20)")
    parser.add_argument("--hidden", type=int, default=3072, help="width (heads of 128)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed sampler steps per variant and round (>= 2)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the minimum decides PASS / FAIL")
    parser.add_argument("--tiny", action="store_true", help="width 128, 64 px: a smoke run (ratios meaningless)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also time every gated Linear alone (base forward against the gated one on the inputs "
                             "of a real step, taking turns, fastest of --layer-repeats): the Linears' share of the "
                             "cost, resolvable on a noisy machine where whole steps are not")
    parser.add_argument("--layer-repeats", type=int, default=7)
    parser.add_argument("--clock", choices=["process", "wall"], default=None,
                        help="process: this process's CPU time (default on cpu: immune to other jobs on the machine); "
                             "wall: elapsed time (default on cuda)")
    args = parser.parse_args(argv)
    args.clock = args.clock or ("process" if args.device == "cpu" else "wall")
    if args.clock == "process" and args.device == "cuda":
        parser.error("--clock process: a CUDA step runs on the GPU, not in this process; use --clock wall")
    if args.tiny:
        args.hidden, args.size, args.rank = 128, 64, 4
    if args.steps < 2 or args.warmup_steps < 1 or args.repeats < 1:
        parser.error("--steps must be >= 2 (a step is timed between two step ends); --warmup-steps and "
                     "--repeats >= 1")
    if args.hidden % 128:
        parser.error(f"--hidden {args.hidden}: a multiple of 128 (ComfyUI's FLUX heads are 128 wide)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dtype = {"fp32": torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    import_pack()
    if not import_comfy(args.device):
        raise SystemExit("set COMFYUI_PATH to a ComfyUI 0.33 checkout: this bench runs ComfyUI's own DiT models")
    import comfy.ldm.modules.attention
    import comfyui_version

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"backend: ComfyUI {comfyui_version.__version__} {args.family} model (random weights), {device_name}, "
          f"{str(dtype).replace('torch.', '')}, {args.size} px, batch 1 (cfg 1), rank {args.rank}, "
          f"attention {comfy.ldm.modules.attention.optimized_attention.__name__}, {args.clock} clock", flush=True)
    variants, positive, latent, build_s = build(args, dtype)
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.repeats):
        for name in round_order(variants, round_index):
            per_step = step_time(variants[name], positive, latent, args)
            results[name].append(per_step)
            print(f"  {args.size}px {name:15s} {per_step * 1000:10.1f} ms/step", flush=True)
    for label, stat in (("min", min), ("median", statistics.median)):
        print(f"\nsteady-state step time, {label} of {args.repeats} round(s) x {args.steps - 1} step(s); "
              "ratio = variant / base")
        for name in variants:
            value, base = stat(results[name]), stat(results["base"])
            print(f"{name:15s} {value * 1000:12.1f} ms {value / base:7.3f}")
    print(f"bake: patches built in {build_s:.2f} s (merged when the model loads)\n")
    for line in goal_lines({args.size: results}):
        print(line)
    if args.per_layer:
        base_linears, gated_linears = per_layer(variants, positive, latent, args)
        # dynamic differs from base only in the gated Linears' forwards (object patches; with a token
        # gate nothing runs per call), so their extra time over a base step is its cost, resolved at
        # sub-second turns where whole steps (bake, the same computation as base, scatters by +-10 %
        # between rounds on a shared machine) are not
        extra = gated_linears - base_linears
        print("estimate from the gated Linears' extra time: dynamic step / base step = (base step + "
              f"{extra:.2f} s) / base step = " + ", ".join(
                  f"{(value + extra) / value:.3f} on the {label} base step ({value:.2f} s)"
                  for label, value in (("fastest", min(results["base"])),
                                       ("median", statistics.median(results["base"])))))


def per_layer(variants, positive, latent, args) -> tuple[float, float]:
    """Each gated Linear of the dynamic (token gate) variant timed alone against its base forward,
    on the input it gets in a real step, the two taking turns; the fastest of ``--layer-repeats``.
    Returns the seconds of all of them: (base forwards, gated forwards)."""
    import comfy.sample
    import comfy.utils

    from versat2i.nodes.model_patching import GatedForward

    clock = time.process_time if args.clock == "process" else time.perf_counter
    patches = {key[: -len(".forward")]: patch for key, patch in variants["dynamic"].object_patches.items()
               if isinstance(patch, GatedForward)}
    base = variants["base"]
    inputs: dict[str, torch.Tensor] = {}
    comfy.sample.sample(base, comfy.sample.prepare_noise(latent, 0), 1, 1.0, "euler", "simple", positive, positive,
                        latent, disable_pbar=True, seed=0)  # loads the base model
    modules = {path: comfy.utils.get_attr(base.model, path) for path in patches}
    handles = [module.register_forward_pre_hook(lambda m, a, path=path: inputs.setdefault(path, a[0].detach().clone()))
               for path, module in modules.items()]
    try:
        comfy.sample.sample(base, comfy.sample.prepare_noise(latent, 0), 1, 1.0, "euler", "simple", positive,
                            positive, latent, disable_pbar=True, seed=0)
    finally:
        for handle in handles:
            handle.remove()
    totals = [0.0, 0.0]
    print(f"\nper gated Linear, fastest of {args.layer_repeats} ({args.clock} clock): base forward, gated forward")
    with torch.no_grad():
        for path, patch in patches.items():
            x, module = inputs[path], modules[path]
            best = [math.inf, math.inf]
            for _ in range(args.layer_repeats):
                for index, forward in enumerate((module.forward, patch)):
                    sync(args.device)
                    start = clock()
                    forward(x)
                    sync(args.device)
                    best[index] = min(best[index], clock() - start)
            totals = [totals[0] + best[0], totals[1] + best[1]]
            print(f"  {path:55s} {tuple(x.shape)!s:18s} {best[0] * 1000:8.1f} ms {best[1] * 1000:8.1f} ms "
                  f"{best[1] / best[0]:6.3f}")
    print(f"all gated Linears: base {totals[0]:.2f} s, gated {totals[1]:.2f} s, ratio {totals[1] / totals[0]:.3f}")
    return totals[0], totals[1]


if __name__ == "__main__":
    main()
