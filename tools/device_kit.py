"""Build ``.device-kit/``: what the GPU checks (``bench/gpu_checks.sh``) need on a lent device machine
beyond its own image, which has PyTorch, transformers, safetensors, einops, scipy and the like but
no ComfyUI and no package registry.

    .venv/bin/python tools/device_kit.py --comfyui /path/to/ComfyUI-0.33

* ``ComfyUI/``: the parts of that checkout the checks import (``comfy/`` and three top-level
  modules; the server, frontend and extra nodes are not needed);
* ``site/``: ComfyUI's requirements the image lacks, unpacked from CPython 3.12 manylinux wheels
  (the image's Python) at the versions ComfyUI's requirements.txt pins. comfy-kitchen goes without
  its compiled CUDA / HIP backends (176 + 59 MB, over the 64 MiB that travels with a run): it then
  serves ComfyUI from its Triton and eager backends, so CUDA timings of its fused ops (rope) may
  differ a little from a full install.

The folder is git-ignored (ComfyUI's code is never committed): name it in the run's ``carry``.
The command to run there is printed at the end, and in the README (Benchmarks).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_PARTS = ("comfy", "comfyui_version.py", "node_helpers.py", "folder_paths.py")
# name -> True: at the version ComfyUI's requirements.txt pins; False: the newest the registry has
PACKAGES = {"comfy-aimdo": True, "comfy-kitchen": True, "torchsde": False, "trampoline": False}
SKIPPED_FILES = re.compile(r"^comfy_kitchen/backends/(cuda|hip)/_C[^/]*\.so$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def pinned_versions(requirements: Path) -> dict[str, str]:
    versions = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            versions[match.group(1).lower()] = match.group(2)
    return versions


def download_wheels(specs: list[str], into: Path) -> list[Path]:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--dest", str(into)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + specs, check=True)
    return sorted(into.glob("*.whl"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI 0.33 checkout")
    parser.add_argument("--out", type=Path, default=REPO / ".device-kit")
    args = parser.parse_args(argv)
    comfyui = args.comfyui.resolve()
    version_file = comfyui / "comfyui_version.py"
    if not (comfyui / "comfy").is_dir() or not version_file.is_file():
        parser.error(f"--comfyui {comfyui}: not a ComfyUI checkout (no comfy/ or comfyui_version.py)")
    version = re.search(r'"([^"]+)"', version_file.read_text(encoding="utf-8")).group(1)
    if version.startswith("0.3."):
        parser.error(f"--comfyui: ComfyUI {version} has no dynamic VRAM; give a 0.33 checkout")
    pins = pinned_versions(comfyui / "requirements.txt")
    specs = [f"{name}=={pins[name]}" if pinned and name in pins else name for name, pinned in PACKAGES.items()]

    out = args.out.resolve()
    partial = out.with_name(out.name + ".partial")  # nothing half-built under the final name
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "ComfyUI").mkdir(parents=True)
    for part in COMFY_PARTS:
        source = comfyui / part
        target = partial / "ComfyUI" / part
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    site = partial / "site"
    site.mkdir()
    with tempfile.TemporaryDirectory() as wheels:
        for wheel in download_wheels(specs, Path(wheels)):
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if not SKIPPED_FILES.match(member):
                        archive.extract(member, site)
            print(f"  {wheel.name}")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: ComfyUI {version} ({', '.join(COMFY_PARTS)}) and {', '.join(specs)}; {size / 2 ** 20:.1f} MiB")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=False).stdout.split(b"\0")
    tree = sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())
    travels = (tree + size) / 2 ** 20
    print(f"a run sends the working tree and the kit: {travels:.1f} MiB (the device tool takes 64 MiB)")
    if travels > 62:
        print("WARNING: too close to the 64 MiB a run may send; leave out untracked files or big docs", file=sys.stderr)
    print("on the device machine (carry: .device-kit):  bash bench/gpu_checks.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
