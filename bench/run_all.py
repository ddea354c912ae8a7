"""Run every benchmark in ``bench/`` one after the other, each in its own interpreter (``make bench``).

    .venv/bin/python bench/run_all.py                 # the full settings (tens of minutes on a CPU)
    .venv/bin/python bench/run_all.py --quick         # tiny settings: checks that every script runs
    .venv/bin/python bench/run_all.py --only scoring mixture --log bench.log

Each script measures its own baseline in the same run and prints the ratio (see its docstring).
The start-up benchmark needs a ComfyUI checkout (``COMFYUI_PATH``) and is skipped, saying so,
without one; with one, the mixture benchmark samples through ComfyUI (hook keyframes included)
instead of its diffusers fallback. Exit status: 0 when every script that ran exited 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (script, full arguments, quick arguments, needs ComfyUI)
BENCHMARKS = {
    "startup": ("bench_startup.py", ["--repeats", "5"], ["--repeats", "1"], True),
    "scoring": ("bench_scoring.py", [], ["--images", "4", "--size", "64", "--architecture", "versat2i-tiny-clip"],
                False),
    "training": ("bench_lora_training.py", ["--repeats", "2"],
                 ["--steps", "4", "--warmup", "1", "--images", "4", "--batch", "2"],
                 False),
    "mixture": ("bench_mixture.py", [], ["--tiny", "--sizes", "64", "--steps", "4"], False),
    # DiT families: klein at full width (reduced depth in the ratio bench; full depth, ~12 GiB RAM, below)
    "dit_training": ("bench_dit_training.py", ["--repeats", "2"], ["--steps", "2", "--warmup", "1", "--images", "1"],
                     False),
    "dit_full_size": ("dit_full_size.py", [], ["--blocks", "1", "--options", "gc"], False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that every script runs")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--log", type=Path, help="also write everything printed to this file")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    log = open(args.log, "w", encoding="utf-8") if args.log else None
    failed = []

    def say(text: str) -> None:
        print(text, flush=True)
        if log is not None:
            log.write(text + "\n")
            log.flush()

    try:
        for name in args.only or BENCHMARKS:
            script, full, quick, needs_comfyui = BENCHMARKS[name]
            say(f"\n=== {name}: bench/{script} {' '.join(quick if args.quick else full)}")
            if needs_comfyui and not env.get("COMFYUI_PATH"):
                say("skipped: set COMFYUI_PATH to a ComfyUI checkout to measure the pack's start-up cost")
                continue
            started = time.monotonic()
            process = subprocess.Popen([sys.executable, str(BENCH / script), *(quick if args.quick else full)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in process.stdout:
                say(line.rstrip("\n"))
            code = process.wait()
            say(f"--- {name}: exit {code}, {time.monotonic() - started:.0f} s")
            if code != 0:
                failed.append(name)
    finally:
        if log is not None:
            log.close()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
