"""Fixtures for the browser tier: a live ComfyUI server (its own frontend) and a headless chromium
driven by Playwright. Skipped, with the reason printed by ``-ra``, without COMFYUI_PATH, without
playwright (``make test-browser`` installs it) or without a chromium (Debian's ``chromium``
package, or ``$VERSAT2I_CHROMIUM``). ``make test`` leaves these tests out (``-m "not browser"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # frontend.py
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))  # harness.py

from frontend import CHROMIUM_ARGS, CHROMIUM_ENV, chromium_executable


@pytest.fixture(scope="session")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run `make test-browser`")
    path = chromium_executable()
    if path is None:
        pytest.skip(f"no chromium: `apt-get install chromium` (Debian), or set {CHROMIUM_ENV} to a chromium binary")
    return path


@pytest.fixture(scope="session")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        try:
            yield launched
        finally:
            launched.close()
