"""Shared test set-up.

Every test runs offline: a tripwire refuses any socket connection that is not to loopback, and the
Hugging Face libraries are told they are offline. Models are tiny and built from configs in code
(``tests/tiny_models``).

Tiers, by marker (registered in pyproject.toml): every test under ``tests/comfy`` is marked
``comfy`` (real ComfyUI imported in-process) and every test under ``tests/server`` ``server`` (a
live ComfyUI server), here, from the folder; an explicit tier marker that disagrees with the folder
is a usage error (elsewhere an explicit one puts a single test in a tier, e.g. a bench smoke test
that also runs through ComfyUI). Without ``COMFYUI_PATH`` the tests that need ComfyUI are skipped,
and ``-ra`` prints why; ``-m "not comfy and not server"`` leaves them out. ``slow`` (over ~20 s on
2 cores) is set by the tests themselves; ``make test-fast`` leaves those out too. A test that runs
past pytest-timeout's limit (pyproject.toml) fails with a note on what to do about it.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

# Before torch (or anything using OpenMP) is imported: on 2 cores a second busy process makes a
# multi-threaded torch 40-90x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Keep a user's accelerate / HF config and caches out of the tests.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="versat2i-tests-home-"))
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["TORCH_HOME"] = str(_SESSION_HOME / "torch")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

_LOOPBACK = ("127.", "::1", "localhost")
_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):  # network tripwire
    host = address[0] if isinstance(address, tuple) else str(address)
    if self.family in (socket.AF_INET, socket.AF_INET6) and not str(host).startswith(_LOOPBACK):
        raise RuntimeError(f"test tried to reach the network ({address!r}); tests must run offline")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only_connect


# -- real ComfyUI ------------------------------------------------------------------------------

def _comfyui_path_or_reason() -> tuple[Path | None, str]:
    raw = os.environ.get("COMFYUI_PATH", "").strip()
    if not raw:
        return None, "COMFYUI_PATH is not set: real-ComfyUI integration tests skipped (see README, Testing)"
    path = Path(raw).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        return None, f"COMFYUI_PATH={raw} is not a ComfyUI checkout (no main.py / comfy/): skipped"
    return path, ""


@pytest.fixture(scope="module")
def tiny_dits(tmp_path_factory):
    """name -> tiny DiT model files (tests/tiny_models/dit.py), written once per test module on first use."""
    from tiny_models.dit import write_tiny_dit

    root = tmp_path_factory.mktemp("dit")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = write_tiny_dit(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def t5_tokenizer_for_flux1(tmp_path_factory):
    """FLUX.1's T5 tokenizer is not shipped with the pack (models/split_files.py): with COMFYUI_PATH,
    ComfyUI's own copy (as the nodes use it); else a small stand-in. Set in the environment, so the
    training processes the tests start see it too. The DiT test modules use it (``usefixtures``)."""
    from versat2i.models.split_files import T5_TOKENIZER_ENV

    if os.environ.get(T5_TOKENIZER_ENV):
        yield
        return
    root, _ = _comfyui_path_or_reason()
    if root is not None and (root / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json").is_file():
        folder = root / "comfy" / "text_encoders" / "t5_tokenizer"
    else:
        from tiny_models.dit import write_t5_tokenizer_stand_in

        folder = write_t5_tokenizer_stand_in(tmp_path_factory.mktemp("t5-tokenizer"))
    os.environ[T5_TOKENIZER_ENV] = str(folder)
    try:
        yield
    finally:
        os.environ.pop(T5_TOKENIZER_ENV, None)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path, reason = _comfyui_path_or_reason()
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    """Real ComfyUI imported in-process on the CPU. Returns ComfyUI's ``comfy`` package.

    ``args.cpu`` must be set before ``comfy.model_management`` is imported, or it probes CUDA.
    """
    if str(comfyui_path) not in sys.path:
        sys.path.insert(0, str(comfyui_path))
    try:
        from comfy.cli_args import args
    except ImportError as exc:  # its requirements are not installed in this venv
        pytest.skip(f"COMFYUI_PATH is set but ComfyUI does not import ({exc}); run `make test` with it set")
    args.cpu = True
    import comfy  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.utils  # noqa: F401
    import folder_paths  # noqa: F401

    return comfy


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """The pack's node classes, loaded with real ComfyUI importable (``versat2i.nodes``)."""
    import versat2i.nodes as pack_nodes

    pack_nodes.common.register_model_folders()
    return {node.define_schema().node_id: node for node in pack_nodes.all_nodes()}


@pytest.fixture
def comfy_dirs(comfy, tmp_path, monkeypatch):
    """Point ComfyUI's output / models / temp folders at a fresh tmp dir for one test."""
    import folder_paths

    output, models, temp = tmp_path / "output", tmp_path / "models", tmp_path / "temp"
    for folder in (output, models, temp):
        folder.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    monkeypatch.setattr(folder_paths, "temp_directory", str(temp))
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    for name, (_paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], exts)
    folder_paths.filename_list_cache.clear()
    yield {"output": output, "models": models, "temp": temp}
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


# -- tiers -------------------------------------------------------------------------------------

TESTS_DIR = Path(__file__).resolve().parent
# The folder a test lives in decides its tier: tests/comfy needs ComfyUI in-process, tests/server a
# live server. Both need COMFYUI_PATH.
TIER_OF_FOLDER = {"comfy": "comfy", "server": "server"}
TIER_MARKERS = frozenset(TIER_OF_FOLDER.values())
# Markers of tests that run against a real ComfyUI, wherever they live: skipped without one.
NEEDS_COMFYUI = TIER_MARKERS | {"browser"}


def tier_of(path: Path) -> str | None:
    """The tier marker the folder of ``path`` (a test file) gives it, None outside the tier folders."""
    try:
        relative = Path(path).resolve().relative_to(TESTS_DIR)
    except ValueError:  # a test file outside tests/ (pytest given another folder)
        return None
    return TIER_OF_FOLDER.get(relative.parts[0]) if len(relative.parts) > 1 else None


def pytest_collection_modifyitems(config, items):
    """Mark each test with its folder's tier; refuse explicit tier markers that disagree with it; skip
    the tests that need ComfyUI, with the reason, when there is none to run them against."""
    _, no_comfyui_reason = _comfyui_path_or_reason()
    disagreeing = []
    for item in items:
        tier = tier_of(item.path)
        explicit = {mark.name for mark in item.iter_markers() if mark.name in TIER_MARKERS}
        if tier:
            if explicit - {tier}:
                disagreeing.append(f"{item.nodeid}: marked {sorted(explicit)} but lives in tests/{tier}/")
            item.add_marker(tier)
        if no_comfyui_reason and any(mark.name in NEEDS_COMFYUI for mark in item.iter_markers()):
            item.add_marker(pytest.mark.skip(reason=no_comfyui_reason))
    if disagreeing:
        raise pytest.UsageError(
            "tier markers disagree with the test's folder (the folder decides: move the test or fix the "
            "marker):\n  " + "\n  ".join(disagreeing))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """pytest-timeout's own message is one line ("Timeout (>Ns) from pytest-timeout."): say where
    the limit comes from and what to do."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "from pytest-timeout" in str(report.longrepr):
        report.sections.append(("pytest-timeout", (
            f"{item.nodeid} ran past the per-test time limit (timeout in [tool.pytest.ini_options], "
            "pyproject.toml). On a slower or busier machine than 2 free CPU cores, raise it for the run "
            "(`--timeout=SECONDS` or PYTEST_TIMEOUT=SECONDS; 0 disables it); if the test hangs, the stack "
            "dump above shows where.")))
