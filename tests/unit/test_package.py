"""Pack-level checks that need no ComfyUI: the installed package exposes one import name and the
``versat2i`` command, shadows none of ComfyUI's top-level modules, imports nothing heavy when
ComfyUI loads the folder, and its pyproject has what ComfyUI's registry reads.

Each check runs in a fresh interpreter (``sys.executable``, from a neutral folder) so modules the
test session already imported can't hide a problem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import versat2i

PACK_ROOT = Path(versat2i.__file__).resolve().parent
# Names a pack must never make importable at top level: ComfyUI's own modules, and our subpackages
# (imports inside the pack are relative; tests import versat2i.<...>). Not "tests": pyiqa's wheel
# installs a stray top-level tests/ folder.
SHADOWING = ("nodes", "utils", "comfy", "folder_paths", "server", "execution", "rewards", "trainer", "loop",
             "demo", "cli", "safe_io")
# Libraries that must only load when a node runs (PLAN: start-up stays fast).
HEAVY = ("torch", "torchvision", "numpy", "diffusers", "transformers", "open_clip", "peft", "accelerate", "pyiqa",
         "mediapipe", "safetensors", "PIL", "comfy", "comfy_api", "folder_paths")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_only_versat2i_is_importable_at_top_level(tmp_path):
    code = (
        "import importlib.util, json\n"
        f"names = {SHADOWING!r}\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names + ('versat2i',)}))\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found.pop("versat2i") is True
    assert not any(found.values()), f"importable top-level names that shadow ComfyUI or leak ours: {found}"
    direct = run_python("import nodes", tmp_path)
    assert direct.returncode != 0 and "No module named 'nodes'" in direct.stderr


def test_package_root_imports_nothing_heavy(tmp_path):
    # Both ways the folder is imported: as the installed package, and by file path as ComfyUI's
    # load_custom_node does (module name = the folder path, not on sys.path).
    code = (
        "import importlib.util, json, sys\n"
        "before = set(sys.modules)\n"
        "import versat2i\n"
        "as_package = sorted(set(sys.modules) - before)\n"
        f"path = {str(PACK_ROOT)!r}\n"
        "spec = importlib.util.spec_from_file_location(path, path + '/__init__.py')\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[path] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps({'package': as_package, 'all': sorted(sys.modules),\n"
        "                  'entrypoint': callable(getattr(module, 'comfy_entrypoint', None)),\n"
        "                  'v1_mapping': hasattr(module, 'NODE_CLASS_MAPPINGS')}))\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    heavy = sorted({m.split(".")[0] for m in report["all"]} & set(HEAVY))
    assert heavy == [], f"importing the pack's root loads {heavy}; import them inside functions/node modules"
    assert report["entrypoint"], "the root module must export comfy_entrypoint (the V3 entry point)"
    assert not report["v1_mapping"], "NODE_CLASS_MAPPINGS would make ComfyUI ignore comfy_entrypoint"
    assert set(report["package"]) <= {"versat2i"}, f"import versat2i also imported {report['package']}"


def test_pyproject_has_project_and_comfy_registry_tables():
    meta = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = meta["project"]
    for key in ("name", "version", "description", "license", "dependencies", "requires-python"):
        assert project.get(key), f"[project] {key} is missing"
    assert project["version"] == versat2i.__version__
    assert "GPL-3.0" in str(project["license"]), "ComfyUI is GPL-3.0: the pack's licence must be compatible"
    assert project["scripts"]["versat2i"] == "versat2i.cli:main"
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in comfy, f"[tool.comfy] {key} is missing (ComfyUI's registry reads it)"
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # requirements.txt (read by ComfyUI-Manager) asks for what [project] declares, and never torch:
    # ComfyUI users bring their own torch build.
    def names(requirements):
        return {re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
                for r in requirements if r.strip() and not r.strip().startswith("#")}
    listed = names((PACK_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines())
    declared = names(project["dependencies"])
    assert listed <= declared, f"requirements.txt lists {sorted(listed - declared)} not in [project] dependencies"
    assert not listed & {"torch", "torchvision", "torchaudio"}, "requirements.txt must not pin torch"


def test_registry_metadata_declares_the_repository_and_the_supported_comfyui_versions():
    """What the Comfy Registry reads (comfy-cli's config parser): [project.urls] Repository, and
    [tool.comfy] requires-comfyui, a version range in its format that spans every ComfyUI version the
    test tiers run against (tests/server/harness.py SUPPORTED_COMFYUI_VERSIONS)."""
    sys.path.insert(0, str(PACK_ROOT / "tests" / "server"))
    from harness import SUPPORTED_COMFYUI_VERSIONS

    meta = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["urls"]["Repository"].startswith("https://github.com/")
    required = meta["tool"]["comfy"]["requires-comfyui"]
    parts = [part.strip() for part in required.split(",")]
    # comfy-cli's validate_version: [operator]major.minor.patch per comma-separated part
    assert all(re.fullmatch(r"(==|>=|<=|!=|~=|>|<|<>|=)?\s*\d+\.\d+\.\d+(-[a-zA-Z0-9]+)?", p) for p in parts), required

    def as_tuple(version: str) -> tuple[int, ...]:
        return tuple(int(n) for n in version.split("."))

    bounds = {re.match(r"[<>=!~]*", p).group(0): as_tuple(re.sub(r"^[<>=!~]*\s*", "", p)) for p in parts}
    for version in SUPPORTED_COMFYUI_VERSIONS:
        assert as_tuple(version) >= bounds[">="] and as_tuple(version) < bounds["<"], (version, required)


def test_the_published_archive_leaves_out_tests_benchmarks_and_tools():
    """comfy-cli (``comfy node publish``) zips the git-tracked files minus the .comfyignore patterns
    (gitwildmatch, pathspec): nothing under tests/, bench/ or tools/ goes to the registry (its scanner
    flags test files), every module of the pack does, and no pack module imports those folders."""
    pathspec = pytest.importorskip("pathspec")
    git = shutil.which("git")
    listed = subprocess.run([git, "-C", str(PACK_ROOT), "ls-files"], capture_output=True, text=True, check=False) \
        if git else None
    if listed is None or listed.returncode != 0:
        pytest.skip("not a git checkout: the archive is made from git-tracked files")
    patterns = [line.strip() for line in (PACK_ROOT / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    ignored = pathspec.PathSpec.from_lines("gitwildmatch", patterns)
    tracked = [name for name in listed.stdout.splitlines() if name.strip()]
    published = [name for name in tracked if not ignored.match_file(name)]
    assert not [n for n in published if n.split("/", 1)[0] in ("tests", "bench", "tools")]
    assert any(n.startswith("tests/") for n in tracked)  # the check is not vacuous
    for module in ("__init__.py", "nodes/load_scorers.py", "rewards/download.py", "training_set/writer.py"):
        assert module in published, module
    assert "workflows/versat2i_self_improvement_loop.json" in published
    offenders = [n for n in published if n.endswith(".py")
                 and re.search(r"^\s*(from|import)\s+(tests|bench|tools)\b", (PACK_ROOT / n).read_text(), re.M)]
    assert offenders == []


def test_comfy_registry_icon_is_an_image_shipped_in_the_repository():
    # ComfyUI's registry shows [tool.comfy] Icon: an https URL of an image. Ours is the raw GitHub
    # URL of a file in this repository (under [project.urls] Homepage), so the file must exist here.
    from PIL import Image

    meta = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    icon = meta["tool"]["comfy"]["Icon"]
    assert icon.startswith("https://"), f"Icon {icon!r} must be an https URL"
    assert icon.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif", ".svg")), f"Icon {icon!r} is not an image"
    homepage = meta["project"]["urls"]["Homepage"]
    repository = homepage.removeprefix("https://github.com/").rstrip("/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert icon.startswith(prefix), f"Icon {icon!r} is not a file of the Homepage repository ({prefix}...)"
    path = PACK_ROOT / icon[len(prefix):]
    assert path.is_file(), f"Icon names {path}, which is not in the repository"
    assert path.stat().st_size < 30_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert 64 <= image.width == image.height <= 512, image.size


def test_open_clip_floor_is_the_version_the_clip_loader_needs():
    # The CLIP loader calls open_clip.create_model(weights_only=True), which exists from 3.0 on.
    from versat2i.rewards.clip_backbone import OPEN_CLIP_MIN_VERSION

    meta = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = (PACK_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    for source, lines in (("pyproject.toml", meta["project"]["dependencies"]), ("requirements.txt", requirements)):
        pins = [line.split("#")[0].strip() for line in lines if line.strip().lower().startswith("open_clip_torch")]
        assert pins == [f"open_clip_torch>={OPEN_CLIP_MIN_VERSION}"], f"{source}: {pins}"


def test_build_system_setuptools_reads_the_spdx_licence():
    # An SPDX `license = "..."` string and `license-files` (PEP 639) need setuptools >= 77.
    meta = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(meta["project"]["license"], str) and meta["project"]["license-files"]
    floors = [re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.\d+)*", r.strip()) for r in meta["build-system"]["requires"]]
    floors = [int(m.group(1)) for m in floors if m]
    assert floors and floors[0] >= 77, meta["build-system"]["requires"]


def test_console_command_runs_help(tmp_path):
    script = Path(sys.executable).with_name("versat2i")
    command = [str(script)] if script.exists() else ([shutil.which("versat2i")] if shutil.which("versat2i") else None)
    if command is None:
        pytest.fail("the `versat2i` console command is not installed next to this Python; run `pip install -e .`")
    result = subprocess.run([*command, "--help"], check=False, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: versat2i")
    for subcommand in ("score", "build-dataset"):
        assert subcommand in result.stdout, f"`versat2i --help` does not list {subcommand!r}"


# -- installing: the wheel and the Makefile --------------------------------------------------------

# Tracked files that are not part of the installed package: the repository's own tooling and docs.
# Everything else tracked (code, workflows, model configs, tokenizers, demo weights) must be in the wheel.
NOT_SHIPPED_PREFIXES = ("tests/", "docs/", "bench/", "tools/", ".ci/")
NOT_SHIPPED_FILES = {".gitignore", ".comfyignore", "Makefile", "README.md", "LICENSE", "pyproject.toml",
                     "requirements.txt",
                     "models/configs/write_configs.py"}  # the script that wrote the shipped configs


def tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the list of the pack's files comes from `git ls-files`")
    result = subprocess.run(["git", "ls-files", "-z"], cwd=PACK_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"{PACK_ROOT} is not a git checkout: {result.stderr.strip()}")
    return [name for name in result.stdout.split("\0") if name]


def test_wheel_builds_without_packaging_warnings_and_ships_every_file_the_pack_needs(tmp_path):
    # Built from a copy of the tracked files, so the checkout gets no build/ or egg-info folder and
    # untracked files can't hide a missing declaration. No build isolation: it would download setuptools.
    files = tracked_files()
    source = tmp_path / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK_ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PIP_QUIET")}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(tmp_path / "wheel"), str(source)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    warnings = [line for line in output.splitlines() if re.search(r"warning|would be ignored|deprecat", line, re.I)]
    assert warnings == [], f"{len(warnings)} packaging warning line(s) while building the wheel:\n{output}"

    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("comfyui_versat2i-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if not name.startswith("comfyui_versat2i-")}
    needed = {f"versat2i/{name}" for name in files
              if not name.startswith(NOT_SHIPPED_PREFIXES) and name not in NOT_SHIPPED_FILES}
    missing = sorted(needed - shipped)
    assert not missing, f"the wheel lacks {len(missing)} file(s) of the pack, e.g. {missing[:5]}"
    extra = sorted(shipped - needed)
    assert not extra, f"the wheel ships files that are not the pack's: {extra[:5]}"
    # the data the pack reads at run time, named, so a too-broad exclusion above can't hide them
    for data in ("versat2i/workflows/versat2i_self_improvement_loop.json",
                 "versat2i/models/configs/sdxl/tokenizer_2/tokenizer_config.json",
                 "versat2i/demo/weights/versat2i-demo-base/tokenizer/merges.txt",
                 "versat2i/demo/weights/versat2i-demo-base/unet/diffusion_pytorch_model.safetensors"):
        assert data in shipped, data


def test_make_without_python311_stops_with_one_line_saying_what_to_install(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(PACK_ROOT / name, tmp_path / name)
    # as a user runs it: not a sub-make of `make test` (which would print "Entering directory")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    result = subprocess.run(["make", "PYTHON=python3.99", "venv"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False, env=env)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, lines
    assert "python3.99" in lines[0] and "install Python 3.11" in lines[0], lines[0]
    assert not (tmp_path / ".venv").exists()
