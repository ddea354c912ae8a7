"""The pack's added ComfyUI start-up time.

Runs fresh interpreters (``sys.executable``), alternating two kinds, several times each:

* baseline -- ComfyUI without the pack: ``import nodes`` (ComfyUI's) + its built-in extra nodes,
  what ComfyUI loads before any custom node;
* pack -- the same, then ComfyUI's own ``load_custom_node`` on a ``custom_nodes/ComfyUI-VersaT2I``
  link to this pack (import + ``comfy_entrypoint`` + ``get_node_list`` + schemas), timed inside
  the interpreter.

Prints the medians, the pack's load time as a fraction of ComfyUI's own start-up (the ratio
with/without), the whole-process difference (noisier: it includes the baseline's run-to-run
spread), the modules the pack's load added, and any heavy library (diffusers, open_clip, peft,
pyiqa, mediapipe, accelerate) it imported -- those must load only when a node runs.

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 python bench/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINK_NAME = "ComfyUI-VersaT2I"
HEAVY = ("diffusers", "open_clip", "peft", "pyiqa", "mediapipe", "accelerate", "transformers")


def child(comfyui: str, pack_link: str | None) -> None:
    """One measurement in this (fresh) interpreter; prints one JSON line."""
    start = time.perf_counter()
    sys.path.insert(0, comfyui)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import nodes  # ComfyUI's nodes.py

    asyncio.run(nodes.init_builtin_extra_nodes())
    comfy_s = time.perf_counter() - start
    before_modules, before_nodes = set(sys.modules), set(nodes.NODE_CLASS_MAPPINGS)
    pack_s, loaded = 0.0, None
    if pack_link:
        t0 = time.perf_counter()
        loaded = asyncio.run(nodes.load_custom_node(pack_link, module_parent="custom_nodes"))
        pack_s = time.perf_counter() - t0
    added = sorted({name.split(".")[0] for name in set(sys.modules) - before_modules})
    print("BENCH " + json.dumps({
        "comfy_s": comfy_s, "pack_s": pack_s, "loaded": loaded, "added_modules": added,
        "added_nodes": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before_nodes),
    }), flush=True)


def measure(comfyui: Path, pack_link: Path | None) -> dict:
    command = [sys.executable, __file__, "--child", "--comfyui", str(comfyui)]
    if pack_link:
        command += ["--pack-link", str(pack_link)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"child failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("BENCH "):]), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (COMFYUI_PATH)")
    parser.add_argument("--repeats", type=int, default=3, help="interpreters per kind (default 3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack-link", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.comfyui, args.pack_link)
        return 0
    if not args.comfyui or not (Path(args.comfyui) / "main.py").is_file():
        print("bench_startup: set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout", file=sys.stderr)
        return 2
    import versat2i

    pack_root = Path(versat2i.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="versat2i-bench-") as tmp:
        link = Path(tmp) / "custom_nodes" / LINK_NAME
        link.parent.mkdir()
        link.symlink_to(pack_root, target_is_directory=True)
        baseline, with_pack = [], []
        for i in range(args.repeats):  # interleaved, so drift in machine load hits both kinds
            baseline.append(measure(Path(args.comfyui), None))
            with_pack.append(measure(Path(args.comfyui), link))
            print(f"  run {i + 1}/{args.repeats}: ComfyUI {baseline[-1]['comfy_s']:.2f} s / "
                  f"{with_pack[-1]['comfy_s']:.2f} s, pack {with_pack[-1]['pack_s'] * 1000:.0f} ms", flush=True)
    if not all(run["loaded"] for run in with_pack):
        print("bench_startup: ComfyUI failed to load the pack (load_custom_node returned False)", file=sys.stderr)
        return 1

    def median(runs, key):
        return statistics.median(run[key] for run in runs)

    comfy_s = median(baseline, "comfy_s")
    pack_s = median(with_pack, "pack_s")
    wall_difference = median(with_pack, "wall_s") - median(baseline, "wall_s")
    added = ["<the pack>" if name.startswith(("/", "\\")) or ":" in name else name
             for name in with_pack[-1]["added_modules"]]
    heavy = sorted(set(added) & set(HEAVY))
    print(f"\nComfyUI start-up without the pack (nodes + built-in extra nodes): median {comfy_s:.2f} s "
          f"(n={args.repeats}, {min(r['comfy_s'] for r in baseline):.2f}-{max(r['comfy_s'] for r in baseline):.2f} s)")
    print(f"pack load inside ComfyUI (import + get_node_list, {len(with_pack[-1]['added_nodes'])} nodes): "
          f"median {pack_s * 1000:.0f} ms ({min(r['pack_s'] for r in with_pack) * 1000:.0f}-"
          f"{max(r['pack_s'] for r in with_pack) * 1000:.0f} ms)")
    print(f"added start-up time: {pack_s * 1000:.0f} ms = {pack_s / comfy_s * 100:.1f} % of ComfyUI's own; "
          f"ratio with/without pack = {(comfy_s + pack_s) / comfy_s:.3f}")
    print(f"whole-process wall difference (median with - median without, includes run-to-run noise): "
          f"{wall_difference * 1000:+.0f} ms")
    print(f"modules the pack's load added: {', '.join(added) or 'none'}")
    print(f"heavy libraries imported at start-up: {', '.join(heavy) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
