"""The benchmark scripts run (tiny settings, seconds): bench/run_all.py --quick drives the scoring
and training benchmarks end to end, each printing its ratio against its same-run baseline. No
timing is asserted (timings are the benchmarks' business, not the tests'); bench/bench_mixture.py
has its own smoke test (test_bench_mixture_smoke.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_all(*args: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), *args,
                                "--log", str(tmp_path / "bench.log")],
                               capture_output=True, text=True, env=env, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (tmp_path / "bench.log").read_text().strip() == completed.stdout.strip()
    return completed.stdout


@pytest.mark.slow
def test_quick_scoring_and_training_benchmarks_print_their_ratios(tmp_path):
    output = run_all("--quick", "--only", "scoring", "training", tmp_path=tmp_path)
    # scoring: pack and naive compute the same scores, and the ratio is printed
    differences = [float(x) for x in re.findall(r"max \|pack - naive\| = ([0-9.e+-]+)", output)]
    assert len(differences) == 4 and max(differences) < 1e-2, output
    assert re.search(r"pack, warm .* ratio [0-9.]+x", output), output
    # training: every variant measured, both goals reported
    assert re.search(r"ours / reference = [0-9.]+x \(goal <= 1.0x\)", output), output
    assert re.search(r"ours_cached / reference = [0-9.]+x \(goal <= 0.6x\)", output), output
    assert "--- scoring: exit 0" in output and "--- training: exit 0" in output


def test_the_startup_benchmark_says_it_needs_comfyui(tmp_path):
    output = run_all("--quick", "--only", "startup", tmp_path=tmp_path)
    assert "skipped: set COMFYUI_PATH" in output
