"""Step time of the Mixture-of-LoRA modes against the base model, measured in one run.

Full-size SD1.5 UNet architecture with random weights (speed does not depend on weight values),
batch 2 (cond + uncond, cfg > 1), 4 aspect LoRAs of rank 16 on all 160 transformer Linears, at
256 and 512 px. Variants:

* base           the plain model
* bake           learned gate evaluated once and merged (ModelPatcher weight patches)
* dynamic        token gate at run time: fused (all A in one matmul, gate-scaled, all B in one)
* dynamic-prompt prompt gate at run time (per sample), fused
* loop           token gate at run time, a plain per-expert loop (what a naive runtime LoRA does)
* hooks          ComfyUI hook keyframes: the 4 LoRAs as weight hooks with a 4-keyframe schedule
                 (core re-merges every hooked weight at each keyframe change)

With ComfyUI (``COMFYUI_PATH``) the model is ComfyUI's own SD15 model and every variant samples
through ``comfy.sample.sample`` (KSampler's path, euler); a step is one sampler step, and each
timed run has ``--steps`` steps (at least 4, so the hooks variant crosses all its keyframes, at
0, 0.25, 0.5 and 0.75 of the run). Without ComfyUI it falls back to a diffusers
``UNet2DConditionModel`` with SD1.5's config, timing UNet forwards (hooks: n/a). The first line
says which. Also reports the one-off merge time of bake, and PASS / FAIL against the goals at
512 px (bake <= 1.02x base, dynamic <= 1.05x base; minimum over rounds).

``--tiny`` swaps in a tiny SD1.5-shaped UNet (width 32, two levels, context 64) at 64 px with
rank-4 LoRAs: a smoke run of every code path in seconds (its ratios mean nothing).

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 python bench/bench_mixture.py --sizes 256
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_mixture.py --device cuda --steps 20 --repeats 3
    python bench/bench_mixture.py --tiny

Runs from a plain checkout: the pack is imported from this folder, nothing needs installing but
torch, safetensors and ComfyUI's core requirements (or diffusers for the fallback).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# comfy.model_detection's SD15 unet_config (ComfyUI 0.3.x)
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# a tiny SD1.5-shaped UNet for --tiny (the test suite's tiny model)
TINY_UNET = {
    **SD15_UNET, "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
    "context_dim": 64, "num_heads": 4, "transformer_depth_output": [1, 1, 1, 1],
}
HOOK_KEYFRAMES = (0.0, 0.25, 0.5, 0.75)  # start percents of the hooks variant's strength changes
GOAL_SIZE = 512
GOALS = {"bake": 1.02, "dynamic": 1.05, "dynamic-prompt": 1.05}  # step time / base at GOAL_SIZE px
TRANSFORMER_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
)


# -- importing the pack from this checkout -------------------------------------------------------------

def import_pack():
    """``versat2i`` from this folder (installed or not). ``versat2i.nodes`` is registered without
    running its ``__init__`` (which loads ComfyUI's server-side API and its extra dependencies such
    as PyAV); the bench needs only ``nodes/model_patching.py`` and comfy core."""
    if "versat2i" not in sys.modules:
        spec = importlib.util.spec_from_file_location("versat2i", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["versat2i"] = package
        spec.loader.exec_module(package)
    if "versat2i.nodes" not in sys.modules:
        nodes = types.ModuleType("versat2i.nodes")
        nodes.__path__ = [str(REPO / "nodes")]
        sys.modules["versat2i.nodes"] = nodes


try:
    from versat2i.aspects import ASPECTS
except ModuleNotFoundError as error:  # a plain checkout (a device machine's copy): the pack from this folder
    if error.name != "versat2i":
        raise
    import_pack()
    from versat2i.aspects import ASPECTS


def import_comfy(device: str) -> bool:
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path:
        return False
    if not (Path(path) / "comfy").is_dir():
        raise SystemExit(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/ folder)")
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = device == "cpu"  # before comfy.model_management is imported
    # PyTorch's attention (SDPA), what ComfyUI picks on current NVIDIA setups. On a CPU ComfyUI
    # would pick its sub-quadratic attention, whose chunking follows the free RAM at each call: a
    # variant holding more memory (bake keeps the weights' backups) then samples with other chunk
    # sizes, and single-round ratios here ranged 0.84-1.11x for variants doing the same or more work.
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401

    return True


# -- shared pieces ------------------------------------------------------------------------------------

def random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter: norms 1, biases 0, weights N(0, 1/fan_in). ComfyUI's layers skip
    initialisation (uninitialised memory may hold NaN or denormals, which distort timings)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for leaf, tensor in sub.named_parameters(recurse=False):
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and leaf == "weight":
                    tensor.fill_(1.0)
                elif leaf == "bias" or tensor.ndim < 2:
                    tensor.zero_()
                else:
                    values = torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor[0].numel())
                    tensor.copy_(values.to(tensor.dtype))


def make_loras(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """4 kohya LoRAs (``lora_unet_<diffusers path>``) on the given modules."""
    generator = torch.Generator().manual_seed(seed)
    loras = []
    for _ in ASPECTS:
        lora = {}
        for name, (out_features, in_features) in shapes.items():
            lora[f"{name}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator)
                                                / math.sqrt(in_features))
            lora[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
        loras.append(lora)
    return loras


def make_gate(shapes: dict[str, tuple[int, int]], granularity: str, context_dim: int, seed: int = 1):
    from versat2i.trainer.gate import MixtureGate

    layers = sorted(shapes)
    gate = MixtureGate(list(ASPECTS), layers, [shapes[n][1] for n in layers], granularity, prompt_features=context_dim)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in gate.named_parameters():
            if "temperature" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        gate.prior.copy_(torch.softmax(torch.randn(gate.prior.shape, generator=generator), -1))
    return gate


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- ComfyUI backend -------------------------------------------------------------------------------------

class LoopForward:
    """Per-expert loop baseline, what a plain runtime LoRA mixture does: the token gate (one
    matmul and a softmax), then each LoRA as two separate matmuls, scaled by its gate and added,
    all in the input's dtype (factors cast once per device and dtype, as the fused layer does)."""

    def __init__(self, previous, gate, layer, experts):
        self.previous = previous
        with torch.no_grad():
            temperature = gate.temperature()[layer]
            self.gate_weight = (gate.weights[layer] / (gate.input_scale[layer] * temperature)).detach()
            self.gate_bias = (gate.bias[layer] / temperature).detach()
        self.experts = experts
        self._cast_for = None

    def __call__(self, x, *args, **kwargs):
        return self.mix(x, self.previous(x, *args, **kwargs))

    def mix(self, x, out):
        if self._cast_for != (x.device, x.dtype):
            self.weight = self.gate_weight.to(x.device, x.dtype)
            self.bias = self.gate_bias.to(x.device, x.dtype)
            self.cast = [None if e is None else (e.down.to(x.device, x.dtype), e.up.to(x.device, x.dtype), e.scale)
                         for e in self.experts]
            self._cast_for = (x.device, x.dtype)
        gates = torch.softmax(torch.nn.functional.linear(x, self.weight, self.bias), dim=-1)
        for index, expert in enumerate(self.cast):
            if expert is not None:
                down, up, scale = expert
                delta = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
                out = out + delta * (gates[..., index : index + 1] * scale)
        return out


def comfy_variants(args, dtype):
    import comfy.hooks
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    from versat2i.nodes import model_patching

    model_config = comfy.supported_models.SD15(dict(TINY_UNET if args.tiny else SD15_UNET))
    model_config.set_inference_dtype(dtype, None)
    t0 = time.perf_counter()
    model = model_config.get_model({})
    random_init_(model)
    base = comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device()
    )
    shapes, keys = {}, {}
    state = model.state_dict()
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model_config.unet_config).items():
        module = diffusers_key[: -len(".weight")]
        if (diffusers_key.endswith(".weight") and ".transformer_blocks." in module
                and module.endswith(TRANSFORMER_LINEARS)):
            name = "lora_unet_" + module.replace(".", "_")
            shapes[name] = tuple(state["diffusion_model." + ldm_key].shape)
            keys[name] = "diffusion_model." + ldm_key
    loras = make_loras(shapes, args.rank)
    aspect_loras = [model_patching.AspectLoRA(a, f"{a}.safetensors", lora) for a, lora in zip(ASPECTS, loras)]
    token_gate = make_gate(shapes, "token", args.context_dim)
    prompt_gate = make_gate(shapes, "prompt", args.context_dim)
    print(f"model + {len(loras)} LoRAs x {len(shapes)} layers built in {time.perf_counter() - t0:.1f} s")

    variants = {"base": base}
    t0 = time.perf_counter()
    variants["bake"], _ = model_patching.apply_mixture(base, None, aspect_loras, mode="bake", gate=token_gate)
    bake_build_s = time.perf_counter() - t0
    variants["dynamic"], _ = model_patching.apply_mixture(base, None, aspect_loras, mode="dynamic", gate=token_gate)
    variants["dynamic-prompt"], _ = model_patching.apply_mixture(base, None, aspect_loras, mode="dynamic",
                                                                 gate=prompt_gate)

    loop = base.clone()
    targets = model_patching.collect_targets(base, None, aspect_loras)
    layer_of_key = model_patching.gate_layer_keys(token_gate, base, None)
    for key, target in targets.items():
        name = f"{target.module_path}.forward"
        loop.add_object_patch(
            name, LoopForward(loop.get_model_object(name), token_gate, layer_of_key[key], target.experts))
    variants["loop"] = loop

    hooks = comfy.hooks.HookGroup()
    for index, lora in enumerate(loras):
        group = comfy.hooks.create_hook_lora(lora, 1.0 / len(loras), 0.0)
        keyframes = comfy.hooks.HookKeyframeGroup()
        for k, start in enumerate(HOOK_KEYFRAMES):
            keyframes.add(comfy.hooks.HookKeyframe(strength=1.0 + 0.25 * ((k + index) % 4), start_percent=start))
        group.set_keyframes_on_hooks(keyframes)
        for hook in group.hooks:
            hooks.add(hook)
    variants["hooks"] = (base, hooks)

    # one-off merge time: load the baked clone against loading the base (the transfer alone)
    def load_time(patcher):
        comfy.model_management.unload_all_models()
        sync(args.device)
        start = time.perf_counter()
        comfy.model_management.load_models_gpu([patcher])
        sync(args.device)
        return time.perf_counter() - start

    base_load = statistics.median(load_time(base) for _ in range(2))
    bake_load = statistics.median(load_time(variants["bake"]) for _ in range(2))
    merge = {"build_s": bake_build_s, "load_base_s": base_load, "load_bake_s": bake_load}
    return variants, merge


def comfy_time(variant, size: int, steps: int, args) -> tuple[float, float | None]:
    """(seconds per sampler step, seconds the sample call spent before its first step)."""
    import comfy.hooks
    import comfy.sample

    model, hooks = variant if isinstance(variant, tuple) else (variant, None)
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, args.context_dim, generator=generator), {}]]
    negative = [[torch.randn(1, 77, args.context_dim, generator=generator), {}]]
    if hooks is not None:
        positive = comfy.hooks.set_hooks_for_conditioning(positive, hooks)
        negative = comfy.hooks.set_hooks_for_conditioning(negative, hooks)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    stamps: list[float] = []

    def step_done(step, x0, x, total_steps):
        sync(args.device)
        stamps.append(time.perf_counter())

    def run(n):
        return comfy.sample.sample(model, noise, n, 5.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=0, callback=step_done)

    run(args.warmup_steps)  # loads / merges this variant, warms kernels
    sync(args.device)
    stamps.clear()
    start = time.perf_counter()
    run(steps)
    # A step is the time between the ends of consecutive sampler steps: what a longer sampling run
    # pays per step. Whatever the sample call does before its first step (loading the model,
    # merging weight patches when they changed) is reported apart; hook keyframes switching at
    # later steps are inside the measured steps.
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return per_step, stamps[0] - start - per_step


# -- diffusers fallback ------------------------------------------------------------------------------------

def diffusers_variants(args, dtype):
    from diffusers import UNet2DConditionModel

    from versat2i.trainer.gate import ExpertLoRA, fused_layer

    if args.tiny:
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=args.context_dim,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
        )
    else:
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    random_init_(unet)
    unet = unet.to(args.device, dtype).eval()
    modules = {
        "lora_unet_" + name.replace(".", "_"): module
        for name, module in unet.named_modules()
        if ".transformer_blocks." in name and name.endswith(TRANSFORMER_LINEARS)
    }
    shapes = {name: tuple(module.weight.shape) for name, module in modules.items()}
    loras = make_loras(shapes, args.rank)
    token_gate = make_gate(shapes, "token", args.context_dim).to(args.device)
    prompt_gate = make_gate(shapes, "prompt", args.context_dim).to(args.device)
    experts = {
        name: [ExpertLoRA(lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"], 1.0) for lora in loras]
        for name in shapes
    }
    handles: list = []
    state: dict = {}

    def clear():
        for handle in handles:
            handle.remove()
        handles.clear()

    def install(kind):
        clear()
        for name, module in modules.items():
            layer = token_gate.layer_index[name]
            if kind in ("dynamic", "dynamic-prompt"):
                gate = token_gate if kind == "dynamic" else None
                # float32 masters on the device; the input's dtype is cast once inside
                fused = fused_layer(gate, name, experts[name], shapes[name][1], shapes[name][0]).to(args.device)
                if kind == "dynamic":
                    hook = (lambda f: lambda m, i, o: f.forward(i[0], o))(fused)
                else:
                    hook = (lambda f, index: lambda m, i, o: f.forward(
                        i[0], o, f.expand_gates(state["gates"][:, index], i[0].ndim)))(fused, layer)
            else:
                hook = (lambda loop: lambda m, i, o: loop.mix(i[0], o))(
                    LoopForward(None, token_gate, layer, experts[name]))
            handles.append(module.register_forward_hook(hook))

    merged: dict = {}

    def bake():
        clear()
        weights = token_gate.prior_gates()
        start = time.perf_counter()
        with torch.no_grad():
            for name, module in modules.items():
                merged[name] = module.weight.detach().clone()
                layer = token_gate.layer_index[name]
                for i, e in enumerate(experts[name]):
                    delta = (e.up.float() @ e.down.float()).to(args.device) * float(weights[layer, i])
                    module.weight.add_(delta.to(dtype))
        sync(args.device)
        return time.perf_counter() - start

    def unbake():
        with torch.no_grad():
            for name, weight in merged.items():
                modules[name].weight.copy_(weight)
        merged.clear()

    def runner(kind):
        def prepare():
            unbake()
            if kind == "bake":
                bake()
            elif kind in ("dynamic", "dynamic-prompt", "loop"):
                install(kind)
            else:
                clear()
        return prepare

    context = torch.randn(2, 77, args.context_dim, device=args.device, dtype=dtype)

    def forward(size):
        x = torch.randn(2, 4, size // 8, size // 8, device=args.device, dtype=dtype)
        with torch.no_grad():
            state["gates"] = prompt_gate.sample_gates(context.float()).to(dtype)
            unet(x, 500, encoder_hidden_states=context)

    merge_s = bake()
    unbake()
    variants = {kind: (runner(kind), forward) for kind in ("base", "bake", "dynamic", "dynamic-prompt", "loop")}
    return variants, {"merge_s": merge_s}


def diffusers_time(variant, size: int, steps: int, args) -> tuple[float, float | None]:
    """(seconds per UNet forward, None: nothing is loaded inside the timing)."""
    prepare, forward = variant
    prepare()
    for _ in range(args.warmup_steps):
        forward(size)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(steps):
        forward(size)
    sync(args.device)
    return (time.perf_counter() - start) / steps, None


# -- main --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sides in px (default: 256 512; --tiny: 64)")
    parser.add_argument("--steps", type=int, default=len(HOOK_KEYFRAMES),
                        help=f"timed sampler steps per variant and round (>= {len(HOOK_KEYFRAMES)}: the hooks variant "
                             "must cross all its keyframes)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all variants; the minimum over rounds (least disturbed) decides "
                             "PASS / FAIL, the median is reported beside it")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 16; --tiny: 4)")
    parser.add_argument("--variants", nargs="+", default=None, help="subset of variants (base is always run)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny SD1.5-shaped UNet at 64 px: a smoke run of every path in seconds "
                             "(ratios meaningless)")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([64] if args.tiny else [256, GOAL_SIZE])
    args.rank = args.rank or (4 if args.tiny else 16)
    args.context_dim = TINY_UNET["context_dim"] if args.tiny else SD15_UNET["context_dim"]
    with_hooks = args.variants is None or "hooks" in args.variants
    if args.steps < len(HOOK_KEYFRAMES) and with_hooks:
        parser.error(f"--steps {args.steps}: the hooks variant needs >= {len(HOOK_KEYFRAMES)} steps to cross its "
                     f"keyframes at {', '.join(map(str, HOOK_KEYFRAMES))} (or leave hooks out with --variants)")
    if args.steps < 2 or args.warmup_steps < 1 or args.repeats < 1:
        parser.error("--steps must be >= 2 (a step is timed from the end of one to the end of the next); "
                     "--warmup-steps and --repeats >= 1")
    return args


def round_order(variants, round_index: int) -> list[str]:
    """The variants in the order round ``round_index`` runs them: as given in even rounds, reversed
    in odd ones, so a machine that speeds up or slows down during a run favours no variant over
    several rounds (each variant's per-round results stay in round order)."""
    names = list(variants)
    return names if round_index % 2 == 0 else names[::-1]


def goal_lines(results: dict[int, dict[str, list[float]]]) -> list[str]:
    """PASS / FAIL of each goal at GOAL_SIZE px on the minimum over rounds (the least disturbed: the
    usual estimate of a cost without interference, as ``timeit`` takes it), each variant's fastest
    round against the base's. With the median of the paired per-round ratios beside it: the variants
    take turns within a round, so a slow period of the machine slows a round's base and variant alike
    and mostly drops out of their ratio; its range shows how far single rounds scatter."""
    if GOAL_SIZE not in results:
        measured = ", ".join(f"{size}" for size in results)
        return [f"goals (at {GOAL_SIZE} px): n/a, {GOAL_SIZE} px not measured (measured: {measured} px)"]
    lines = []
    at_size = results[GOAL_SIZE]
    base = min(at_size["base"])
    for name, goal in GOALS.items():
        if name not in at_size:
            continue
        ratio = min(at_size[name]) / base
        verdict = "PASS" if ratio <= goal else "FAIL"
        line = f"goal {name} <= {goal:.2f}x base at {GOAL_SIZE} px: {ratio:.3f}x {verdict}"
        paired = [value / base_value for value, base_value in zip(at_size[name], at_size["base"])]
        if len(paired) > 1:
            line += (f" (median of the {len(paired)} rounds' own ratios {statistics.median(paired):.3f}x, "
                     f"range {min(paired):.3f}-{max(paired):.3f})")
        lines.append(line)
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dtype = {"fp32": torch.float32, "fp16": torch.float16,
             "bf16": torch.bfloat16}[args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    import_pack()
    with_comfy = import_comfy(args.device)
    if with_comfy:
        import comfy.ldm.modules.attention
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    shape = "tiny SD1.5-shaped" if args.tiny else "SD15"
    if with_comfy:
        import comfyui_version

        print(f"backend: ComfyUI {comfyui_version.__version__} {shape} model (random weights), sampled with "
              f"comfy.sample (euler), {device_name}, {str(dtype).replace('torch.', '')}, batch 2 (cond+uncond), "
              f"rank {args.rank}, "
              f"attention {comfy.ldm.modules.attention.optimized_attention.__name__}")
        variants, merge = comfy_variants(args, dtype)
        timer = comfy_time
    else:
        print(f"backend: diffusers UNet2DConditionModel, {shape} config (random weights; COMFYUI_PATH unset, no hooks "
              f"variant), {device_name}, {str(dtype).replace('torch.', '')}, batch 2, rank {args.rank}")
        variants, merge = diffusers_variants(args, dtype)
        timer = diffusers_time
    if args.variants:
        variants = {k: v for k, v in variants.items() if k == "base" or k in args.variants}

    results: dict[int, dict[str, list[float]]] = {}
    before_first_step: dict[int, dict[str, list[float]]] = {}
    for size in args.sizes:
        results[size] = {name: [] for name in variants}
        before_first_step[size] = {name: [] for name in variants}
        for round_index in range(args.repeats):
            for name in round_order(variants, round_index):
                per_step, overhead = timer(variants[name], size, args.steps, args)
                results[size][name].append(per_step)
                note = ""
                if overhead is not None:
                    before_first_step[size][name].append(overhead)
                    note = f"   (+{overhead * 1000:.0f} ms in the sample call before its first step)"
                print(f"  {size}px {name:15s} {per_step * 1000:9.1f} ms/step{note}", flush=True)

    # Launch-bound GPU steps are noisy (the host's CPU speed varies): the minimum over rounds is the
    # least disturbed estimate, the median shows the spread. Ratios use the same statistic for both.
    for label, stat in (("min", min), ("median", statistics.median)):
        print(f"\nsteady-state step time, {label} of {args.repeats} round(s) x {args.steps} step(s); "
              "ratio = variant / base")
        print("variant         " + "".join(f"{size:>8}px ms   ratio" for size in args.sizes))
        for name in variants:
            row = f"{name:15s} "
            for size in args.sizes:
                value, base = stat(results[size][name]), stat(results[size]["base"])
                row += f"{value * 1000:14.1f} {value / base:7.3f}"
            print(row)
    for size, by_variant in before_first_step.items():
        if any(by_variant.values()):
            print(f"{size}px, time a sample call spends before its first step (loading; merging patches), median: "
                  + ", ".join(f"{name} {statistics.median(v):.2f} s" for name, v in by_variant.items() if v))
    print("merge: " + ", ".join(f"{k} {v:.2f} s" for k, v in merge.items()))
    if "load_bake_s" in merge:
        merge_cost = merge["load_bake_s"] - merge["load_base_s"]
        print(f"one-off merge cost of bake (load with patches - plain load): {merge_cost:.2f} s")
    print()
    for line in goal_lines(results):
        print(line)


if __name__ == "__main__":
    main()
