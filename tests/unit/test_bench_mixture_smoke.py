"""bench/bench_mixture.py: a smoke run of every variant on the tiny UNet (``--tiny``, seconds), and
its goal verdicts on made-up timings. No timing is asserted: the bench prints ratios; the lead
runs it full size on a quiet machine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "bench_mixture.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_mixture", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(*args: str, comfyui_path: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["OMP_NUM_THREADS"] = "1"
    if comfyui_path is not None:
        env["COMFYUI_PATH"] = str(comfyui_path)
    completed = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env,
                               timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    return completed.stdout


def table_rows(output: str) -> dict[str, list[str]]:
    """variant -> its rows in the two result tables (min, median)."""
    rows: dict[str, list[str]] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith(" "):
            rows.setdefault(parts[0], []).append(line)
    return rows


def test_tiny_run_without_comfyui_times_every_variant():
    output = run_bench("--tiny")
    assert output.startswith("backend: diffusers")
    rows = table_rows(output)
    for variant in ("base", "bake", "dynamic", "dynamic-prompt", "loop"):
        assert len(rows.get(variant, [])) == 2, (variant, output)
    assert "goals (at 512 px): n/a" in output


@pytest.mark.comfy
def test_tiny_run_through_comfyui_times_every_variant(comfyui_path):
    output = run_bench("--tiny", comfyui_path=comfyui_path)
    assert output.startswith("backend: ComfyUI")
    rows = table_rows(output)
    for variant in ("base", "bake", "dynamic", "dynamic-prompt", "loop", "hooks"):
        assert len(rows.get(variant, [])) == 2, (variant, output)
    assert "one-off merge cost of bake" in output


def test_goal_verdicts():
    bench = load_bench()
    results = {256: {"base": [1.0], "bake": [5.0]},
               512: {"base": [1.0, 1.2], "bake": [1.019, 1.5], "dynamic": [1.06, 1.0], "dynamic-prompt": [1.2, 1.04]}}
    lines = bench.goal_lines(results)
    # the minimum over rounds, against the base's minimum
    # (and beside it the median of each round's own ratio: 1.019 and 1.25; 1.06 and 0.833; 1.2 and 0.867)
    assert lines == [
        "goal bake <= 1.02x base at 512 px: 1.019x PASS (median of the 2 rounds' own ratios 1.135x, "
        "range 1.019-1.250)",
        "goal dynamic <= 1.05x base at 512 px: 1.000x PASS (median of the 2 rounds' own ratios 0.947x, "
        "range 0.833-1.060)",
        "goal dynamic-prompt <= 1.05x base at 512 px: 1.040x PASS (median of the 2 rounds' own ratios 1.033x, "
        "range 0.867-1.200)",
    ]
    results[512]["dynamic"] = [1.051, 1.08]
    assert bench.goal_lines(results)[1].startswith("goal dynamic <= 1.05x base at 512 px: 1.051x FAIL")
    assert bench.goal_lines({512: {"base": [1.0], "dynamic": [1.03]}})[0] == \
        "goal dynamic <= 1.05x base at 512 px: 1.030x PASS"  # one round: no median beside it
    assert bench.goal_lines({64: {"base": [1.0]}}) == ["goals (at 512 px): n/a, 512 px not measured (measured: 64 px)"]


def test_steps_must_cross_every_hook_keyframe():
    bench = load_bench()
    assert bench.parse_args([]).steps >= len(bench.HOOK_KEYFRAMES) == 4
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "3"])
    assert bench.parse_args(["--steps", "2", "--variants", "bake"]).steps == 2  # no hooks variant: fine
    with pytest.raises(SystemExit):  # a step is timed between two step ends
        bench.parse_args(["--steps", "1", "--variants", "bake"])


@pytest.mark.comfy
@pytest.mark.family
def test_tiny_dit_run_times_every_variant(comfyui_path):
    """bench/bench_mixture_dit.py on ComfyUI's own FLUX.1 model at width 128 (seconds)."""
    version = (comfyui_path / "comfyui_version.py").read_text()
    if '"0.3.' in version:
        pytest.skip("ComfyUI 0.3.x builds FLUX.1 at width 3072 whatever the weights hold; the tiny run needs 0.33")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_PATH": str(comfyui_path)}
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "bench_mixture_dit.py"), "--tiny", "--per-layer",
                                "--layer-repeats", "1"],
                               capture_output=True, text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    output = completed.stdout
    assert output.startswith("backend: ComfyUI") and "23 modules (13 ComfyUI weights)" in output
    for variant in ("base", "bake", "dynamic", "dynamic-prompt"):
        assert len([line for line in output.splitlines() if line.startswith(variant + " ")]) == 2, output
    # every gated Linear timed alone: 8 of the double block, 2 per single block, FLUX.1's output projection
    assert len([line for line in output.splitlines() if line.startswith("  diffusion_model.")]) == 13, output
    assert "all gated Linears: base" in output
    assert "estimate from the gated Linears' extra time: dynamic step / base step" in output


def test_rounds_alternate_the_variants_order():
    bench = load_bench()
    variants = {"base": 0, "bake": 1, "dynamic": 2}
    assert bench.round_order(variants, 0) == ["base", "bake", "dynamic"]
    assert bench.round_order(variants, 1) == ["dynamic", "bake", "base"]  # drift during a run favours no variant
    assert bench.round_order(variants, 2) == ["base", "bake", "dynamic"]


@pytest.mark.comfy
@pytest.mark.family
def test_dynamic_vram_check_runs_on_the_cpu(comfyui_path):
    """bench/dynamic_vram_check.py, the GPU check of issue 13, as a CPU smoke run: every variant
    samples, the LoRAs act, and the dynamic-patcher verdicts say n/a (ComfyUI samples on a CPU with
    its old patcher) instead of passing."""
    version = (comfyui_path / "comfyui_version.py").read_text()
    if '"0.3.' in version:
        pytest.skip("ComfyUI 0.3.x has no dynamic VRAM (and builds FLUX.1 at width 3072 whatever the weights hold)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMFYUI_PATH": str(comfyui_path)}
    completed = subprocess.run([sys.executable, str(REPO / "bench" / "dynamic_vram_check.py"), "--device", "cpu",
                                "--tiny"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    output = completed.stdout
    assert "dynamic VRAM not enabled: off for a CPU run" in output
    for variant in ("base", "bake", "dynamic", "dynamic-prompt"):
        assert f"\n{variant}: sampled with ModelPatcher (dynamic: False)" in output, output
    assert output.count("differs from base: PASS") == 3 and output.count("finite output: PASS") == 4
    assert output.count("stays on the dynamic patcher: n/a") == 4 and "FAIL" not in output
    assert output.rstrip().endswith("all checks passed")
