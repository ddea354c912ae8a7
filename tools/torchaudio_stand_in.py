"""Install an import-only stand-in for torchaudio into this interpreter's site-packages, when no real
torchaudio imports (``make comfy-deps`` runs it with the venv's python).

Why: ComfyUI 0.33 imports torchaudio when ``comfy.sd`` loads (for its audio VAEs) and only calls it
inside audio models. No torchaudio build matches the pinned torch on the registries this project
uses, and a mismatched one breaks peft/diffusers imports; so a venv that imports ComfyUI in-process
(the pack's ComfyUI tests, a live test server) gets this stand-in instead. Image models are
unaffected; any use of an audio function raises ImportError saying why.

    .venv/bin/python tools/torchaudio_stand_in.py          # install it unless torchaudio imports
    .venv/bin/python tools/torchaudio_stand_in.py --check  # exit 0 if torchaudio (real or stand-in) imports

The package is written under a temporary name next to its final place and renamed when complete.
It carries no dist-info, so ``pip show torchaudio`` still says none is installed, and installing a
real torchaudio later replaces it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

VERSION = "0.0.0+stand.in"
INIT = f'''"""Import-only stand-in for torchaudio, written by ComfyUI-VersaT2I's tools/torchaudio_stand_in.py:
no torchaudio build matches this torch here. Audio models fail when they are used."""
from . import functional, transforms  # noqa: F401

__version__ = "{VERSION}"
'''
MISSING = '''def __getattr__(name):
    module = __name__.split('.')[-1]
    raise ImportError(f"torchaudio stand-in: no audio support in this environment (torchaudio.{module}.{name})")
'''


def torchaudio_imports() -> bool:
    """Whether ``import torchaudio`` works, asked in a fresh interpreter (a broken real torchaudio
    can fail with anything, and must not take this process down)."""
    result = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True, check=False)
    return result.returncode == 0


def install(site_packages: Path) -> Path:
    final = site_packages / "torchaudio"
    if final.exists():
        raise SystemExit(f"{final} exists but does not import; remove it (pip uninstall torchaudio) and run this again")
    temp = Path(tempfile.mkdtemp(prefix=".torchaudio.tmp-", dir=site_packages))
    try:
        (temp / "__init__.py").write_text(INIT, encoding="utf-8")
        (temp / "functional.py").write_text(MISSING, encoding="utf-8")
        (temp / "transforms.py").write_text(MISSING, encoding="utf-8")
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether torchaudio imports")
    args = parser.parse_args(argv)
    if torchaudio_imports():
        spec = importlib.util.find_spec("torchaudio")
        print(f"torchaudio imports ({spec.origin if spec else '?'}); nothing to do")
        return 0
    if args.check:
        print("torchaudio does not import")
        return 1
    final = install(Path(sysconfig.get_paths()["purelib"]))
    if not torchaudio_imports():
        raise SystemExit(f"installed {final}, but `import torchaudio` still fails")
    print(f"installed the import-only torchaudio stand-in at {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
