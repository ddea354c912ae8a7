"""The test tiers (tests/conftest.py, markers and timeout from pyproject.toml), run on a small
test tree with the real conftest and the real pytest settings in a pytest subprocess.

A test under ``comfy/`` or ``server/`` gets that marker from its folder and is skipped, with the
reason, when COMFYUI_PATH is not set or is not a ComfyUI checkout; ``make test-fast``'s marker
expression leaves the tiers and ``slow`` out; an explicit tier marker that disagrees with a tier
folder stops the run naming the test, and one outside the tier folders puts that test in the tier; a
test past the time limit fails saying where the limit is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytest_plugins = ("pytester",)

TESTS = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
FAST = "not slow and not comfy and not server and not browser"  # what `make test-fast` selects


# A plugin that prints each collected test's markers once collection (and conftest's marking) is done.
MARKER_DUMP = """
def pytest_collection_finish(session):
    for item in session.items:
        print("MARKERS", item.nodeid, ",".join(sorted({mark.name for mark in item.iter_markers()})))
"""


def makefile_fast_selection() -> str:
    for line in (TESTS.parent / "Makefile").read_text().splitlines():
        if line.startswith("FAST_MARKERS"):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no FAST_MARKERS in the Makefile")


@pytest.fixture
def tree(pytester, monkeypatch):
    """tests/conftest.py and the pytest settings of pyproject.toml, with one test per tier."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    # The conftest imports torch only to set its thread count; a stand-in keeps each run at about a
    # second instead of 5-15 s of importing torch on a busy 2-core machine.
    pytester.makepyfile(torch="def set_num_threads(count):\n    pass\n")
    markers = "\n".join(f"    {marker}" for marker in PYPROJECT["markers"])
    pytester.makeini(f"[pytest]\naddopts = {PYPROJECT['addopts']}\nmarkers =\n{markers}\n"
                     f"timeout = {PYPROJECT['timeout']}\n")
    for folder, source in {
        "comfy": "def test_in_process():\n    pass\n",
        "server": "def test_live_server():\n    pass\n",
        "unit": ("import time\nimport pytest\n\ndef test_plain():\n    pass\n\n"
                 "@pytest.mark.slow\ndef test_slow():\n    pass\n\n"
                 "@pytest.mark.timeout(1)\ndef test_hangs():\n    time.sleep(30)\n"),
    }.items():
        (pytester.path / folder).mkdir()
        (pytester.path / folder / f"test_{folder}_tier.py").write_text(source)
    return pytester


def test_the_fast_selection_is_the_makefiles():
    assert makefile_fast_selection() == FAST


def test_tier_folders_mark_their_tests_and_skip_them_without_comfyui(tree):
    tree.makepyfile(markerdump=MARKER_DUMP)
    result = tree.runpytest_subprocess("-rs", "-p", "markerdump")
    result.assert_outcomes(passed=2, failed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] comfy/test_comfy_tier.py:*COMFYUI_PATH is not set: real-ComfyUI integration tests skipped*",
        "SKIPPED [[]1[]] server/test_server_tier.py:*COMFYUI_PATH is not set*",
    ])
    # The timeout's failure says where the limit comes from and how to raise it.
    result.stdout.fnmatch_lines(["*Timeout (>1.0s) from pytest-timeout*",
                                 "*unit/test_unit_tier.py::test_hangs ran past the per-test time limit*"])
    markers = dict(line.split(" ", 2)[1:] for line in result.outlines if line.startswith("MARKERS "))
    assert markers == {"comfy/test_comfy_tier.py::test_in_process": "comfy,skip",
                       "server/test_server_tier.py::test_live_server": "server,skip",
                       "unit/test_unit_tier.py::test_plain": "",
                       "unit/test_unit_tier.py::test_slow": "slow",
                       "unit/test_unit_tier.py::test_hangs": "timeout"}


def test_the_fast_selection_leaves_out_the_tiers_and_slow_tests(tree):
    listed = tree.runpytest_subprocess("--collect-only", "-q", "-m", FAST)
    assert [line for line in listed.outlines if "::" in line] == [
        "unit/test_unit_tier.py::test_plain", "unit/test_unit_tier.py::test_hangs"]


def test_a_comfyui_path_that_is_not_comfyui_skips_with_the_reason(tree, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(tree.path / "unit"))
    result = tree.runpytest_subprocess("-rs", "comfy")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*COMFYUI_PATH=*unit is not a ComfyUI checkout (no main.py / comfy/): skipped*"])


def test_a_tier_marker_that_disagrees_with_the_folder_stops_the_run(tree):
    (tree.path / "comfy" / "test_other_tier.py").write_text(
        "import pytest\n\n@pytest.mark.server\ndef test_marked_server():\n    pass\n")
    (tree.path / "server" / "test_other_tier_too.py").write_text(
        "import pytest\npytestmark = pytest.mark.comfy\n\ndef test_marked_comfy():\n    pass\n")
    result = tree.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        "*tier markers disagree with the test's folder*",
        "*comfy/test_other_tier.py::test_marked_server: marked [[]'server'[]] but lives in tests/comfy/",
        "*server/test_other_tier_too.py::test_marked_comfy: marked [[]'comfy'[]] but lives in tests/server/",
    ])


def test_a_tier_marker_outside_the_tier_folders_puts_that_test_in_the_tier(tree):
    (tree.path / "unit" / "test_through_comfyui.py").write_text(
        "import pytest\n\n@pytest.mark.comfy\ndef test_needs_comfy():\n    pass\n\ndef test_plain_too():\n    pass\n")
    result = tree.runpytest_subprocess("-rs", "unit/test_through_comfyui.py")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] unit/test_through_comfyui.py:*COMFYUI_PATH is not set*"])


def test_a_misspelt_marker_is_an_error(tree):
    (tree.path / "unit" / "test_typo.py").write_text("import pytest\n\n@pytest.mark.slwo\ndef test_typo():\n    pass\n")
    result = tree.runpytest_subprocess("unit/test_typo.py")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*'slwo' not found in `markers` configuration option*"])
