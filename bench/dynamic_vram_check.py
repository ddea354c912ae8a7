"""Does the Gated Multi-LoRA Loader keep ComfyUI 0.33 on its dynamic-VRAM model patcher? The GPU check.

ComfyUI 0.33 loads models with ``ModelPatcherDynamic`` (comfy-aimdo) on NVIDIA, and samples with
the old patcher instead where the conditioning carries hooks (``CFGGuider.inner_set_conds`` calls
``get_non_dynamic_delegate``). This script enables dynamic VRAM as ComfyUI's ``main.py`` does
(``comfy_aimdo.control.init`` before CUDA is touched, then ``init_devices`` and
``CoreModelPatcher = ModelPatcherDynamic``), builds ComfyUI's own FLUX.1 model with
``bench_mixture_dit.build`` (random weights; its 4 rank-16 LoRAs and token / prompt gates), applies
the loader's modes, samples each, and checks, per variant:

* the patcher ComfyUI sampled with (read in an ``OUTER_SAMPLE`` wrapper, after the conditioning is
  set) and every model it loaded are dynamic;
* ComfyUI logged "prepared for dynamic VRAM loading" for the diffusion model (what the dynamic
  patcher logs when it loads; the old one logs "loaded completely / partially") and never "Hooks not
  implemented";
* the output is finite, and differs from the base model's (the LoRAs act);
* the peak of torch's CUDA memory during the sampling and what comfy-aimdo holds after it (its
  VRAM buffers are outside torch's allocator), next to the patcher's ``model_size()`` (which counts
  the gated factors, ``model_patching._count_factor_memory``).

``--weight-dtype fp8`` stores the weights in float8_e4m3fn, computed in bf16 (what ComfyUI's fp8
checkpoints do). On a CPU the same run is a smoke test: ComfyUI 0.33 samples on the CPU with its
old patcher (``ModelPatcherDynamic`` reroutes there), so the dynamic verdicts print ``n/a``.

    COMFYUI_PATH=/path/to/ComfyUI-0.33 python bench/dynamic_vram_check.py                 # CUDA: the check
    COMFYUI_PATH=... python bench/dynamic_vram_check.py --weight-dtype fp8 --double 4 --single 8
    COMFYUI_PATH=... OMP_NUM_THREADS=1 python bench/dynamic_vram_check.py --device cpu --tiny  # smoke run

Exits 1 when a check fails. Needs ComfyUI 0.33 (0.3.64 has no dynamic VRAM).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mixture_dit  # noqa: E402
from bench_mixture import import_pack  # noqa: E402

CHECK_KEY = "versat2i_dynamic_vram_check"
PREPARED = "prepared for dynamic VRAM loading"
NO_HOOKS = "Hooks not implemented"


class LogLines(logging.Handler):
    """Every message ComfyUI logs while a variant samples."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def enable_dynamic_vram(device: str) -> tuple[bool, str]:
    """What ComfyUI 0.33's main.py does before and after its imports (its lines ~96-108 and ~300-330);
    the start-up flags that turn it off are left at their defaults. Returns (enabled, why not)."""
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path or not (Path(path) / "comfy").is_dir():
        raise SystemExit("set COMFYUI_PATH to a ComfyUI 0.33 checkout")
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = device == "cpu"
    args.use_pytorch_cross_attention = True
    try:
        import comfy_aimdo.control
        from comfy.cli_args import enables_dynamic_vram
    except ImportError as error:
        import comfy.model_management  # noqa: F401

        return False, f"this ComfyUI has no dynamic VRAM ({error}); it needs 0.33"
    if not enables_dynamic_vram():
        import comfy.model_management  # noqa: F401

        return False, "off for a CPU run (ComfyUI's own rule: --cpu disables it)"
    try:  # before CUDA is touched, as main.py (with its fallback for older comfy-aimdo protocols)
        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
        comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:
        comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    devices = comfy.model_management.get_all_torch_devices()
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices)
    except TypeError:  # an older comfy-aimdo protocol, as main.py handles it
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        return False, "comfy-aimdo found no device it works with (ComfyUI would fall back to its old patcher)"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return True, ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--weight-dtype", default=None, choices=["fp8"],
                        help="store the weights in float8_e4m3fn (computed in bf16)")
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="width 128, 64 px: a smoke run")
    args = parser.parse_args(argv)
    bench = bench_mixture_dit.parse_args(["--double", str(args.double), "--single", str(args.single)]
                                         + (["--tiny"] if args.tiny else []) + ["--device", args.device])
    bench.weight_dtype = torch.float8_e4m3fn if args.weight_dtype == "fp8" else None
    return args, bench


def sample_variant(patcher, positive, latent, steps):
    """Sample ``patcher`` once; returns (its output, what the check reads)."""
    import comfy.memory_management
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sample

    seen: dict = {}

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj  # the conditioning is set: this is the patcher it samples with
        seen["sampled_with"] = type(guider.model_patcher).__name__
        seen["sampled_dynamic"] = guider.model_patcher.is_dynamic()
        try:
            return executor(*args, **kwargs)
        finally:
            loaded = [m.model for m in comfy.model_management.current_loaded_models if m.model is not None]
            seen["loaded"] = [(type(m).__name__, m.is_dynamic()) for m in loaded]

    checked = patcher.clone()
    checked.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CHECK_KEY, outer_sample)
    lines = LogLines()
    logging.getLogger().addHandler(lines)
    cuda = checked.load_device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        output = comfy.sample.sample(checked, comfy.sample.prepare_noise(latent, 0), steps, 1.0, "euler", "simple",
                                     positive, positive, latent, disable_pbar=True, seed=0)
    finally:
        logging.getLogger().removeHandler(lines)
    seen["peak_gib"] = torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda else None
    if cuda and comfy.memory_management.aimdo_enabled:  # what comfy-aimdo holds, outside torch's allocator
        import comfy_aimdo.control

        seen["aimdo_gib"] = comfy_aimdo.control.get_total_vram_usage() / 1024 ** 3
    seen["model_size_gib"] = checked.model_size() / 1024 ** 3
    seen["prepared"] = [line for line in lines.lines if PREPARED in line]
    seen["no_hooks"] = [line for line in lines.lines if NO_HOOKS in line]
    return output.float().cpu(), seen


def main(argv=None) -> int:
    args, bench = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.getLogger().setLevel(logging.INFO)
    enabled, why_not = enable_dynamic_vram(args.device)  # first: before anything touches CUDA
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run with --device cpu for the smoke run")
    import_pack()
    import comfyui_version

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"ComfyUI {comfyui_version.__version__}, {args.device}, dynamic VRAM "
          f"{'enabled' if enabled else 'not enabled: ' + why_not}; weights "
          f"{'float8_e4m3fn' if bench.weight_dtype is not None else str(dtype).replace('torch.', '')}", flush=True)
    variants, positive, latent, _ = bench_mixture_dit.build(bench, dtype)
    outputs, failures = {}, []
    for name, patcher in variants.items():
        output, seen = sample_variant(patcher, positive, latent, args.steps)
        outputs[name] = output
        peak = "n/a" if seen["peak_gib"] is None else f"{seen['peak_gib']:.2f} GiB"
        if "aimdo_gib" in seen:
            peak += f", comfy-aimdo's VRAM {seen['aimdo_gib']:.2f} GiB after sampling"
        print(f"\n{name}: sampled with {seen['sampled_with']} (dynamic: {seen['sampled_dynamic']}); loaded "
              f"{seen['loaded']}; model_size {seen['model_size_gib']:.2f} GiB; peak of torch's CUDA memory {peak}")
        for line in seen["prepared"]:
            print(f"  ComfyUI: {line}")
        checks = {
            "finite output": bool(torch.isfinite(output).all()),
            f"no '{NO_HOOKS}'": not seen["no_hooks"],
        }
        if name != "base":
            checks["differs from base"] = not torch.equal(output, outputs["base"])
        if enabled:
            checks["sampled with the dynamic patcher"] = seen["sampled_dynamic"]
            checks["every loaded model dynamic"] = bool(seen["loaded"]) and all(d for _, d in seen["loaded"])
            checks[f"ComfyUI logged '{PREPARED}'"] = bool(seen["prepared"])
        for check, passed in checks.items():
            print(f"  {check}: {'PASS' if passed else 'FAIL'}")
            if not passed:
                failures.append(f"{name}: {check}")
        if not enabled:
            print(f"  stays on the dynamic patcher: n/a ({why_not})")
    print("\n" + ("all checks passed" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
