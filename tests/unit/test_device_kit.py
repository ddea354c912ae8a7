"""tools/device_kit.py and bench/gpu_checks.sh, the GPU checks' kit, without a registry or a GPU:
the versions it pins, the files it leaves out, and what the checks say without the kit. (The kit
itself, built from a ComfyUI 0.33 checkout and run with ``DEVICE=cpu QUICK=1`` by a Python that
lacks comfy-aimdo and comfy-kitchen, was checked by hand: the README's Benchmarks section.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_kit():
    spec = importlib.util.spec_from_file_location("device_kit", REPO / "tools" / "device_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_versions_pinned_by_comfyuis_requirements(tmp_path):
    kit = load_kit()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch\ncomfy-kitchen==0.2.31\ncomfy-aimdo==0.4.13  # dynamic VRAM\n"
                            "transformers>=4.50.3\n#kornia==1.0\nav>=16.0.0\n")
    assert kit.pinned_versions(requirements) == {"comfy-kitchen": "0.2.31", "comfy-aimdo": "0.4.13"}


def test_only_comfy_kitchens_compiled_backends_stay_behind():
    skipped = load_kit().SKIPPED_FILES
    assert skipped.match("comfy_kitchen/backends/cuda/_C.abi3.so")
    assert skipped.match("comfy_kitchen/backends/hip/_C.cpython-312-x86_64-linux-gnu.so")
    for kept in ("comfy_kitchen/backends/cuda/__init__.py", "comfy_kitchen/backends/triton/ops.py",
                 "comfy_aimdo/aimdo.so", "comfy_kitchen/_C.so"):
        assert not skipped.match(kept), kept


def test_gpu_checks_say_how_to_build_the_missing_kit(tmp_path):
    # a copy of the script in a tree without .device-kit/ (the checkout may have one)
    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "gpu_checks.sh"
    script.write_text((REPO / "bench" / "gpu_checks.sh").read_text())
    completed = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, check=False,
                               env={**os.environ, "OUT": str(tmp_path / "out")})
    assert completed.returncode == 2
    assert "build it with tools/device_kit.py --comfyui <ComfyUI 0.33> and carry it" in completed.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
