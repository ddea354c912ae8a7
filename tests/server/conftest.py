"""Fixtures for tests against a real ComfyUI server with the pack installed (see harness.py).

One server per test session (start-up takes ~8 s on 2 cores), with its own base directory
(``--base-directory``: custom_nodes with the pack linked in, models, input, output, temp), stopped
by the fixture's finaliser whatever happens. Skipped, with the reason printed by ``-ra``, when
``COMFYUI_PATH`` is not set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import ComfyServer  # tests/server is on pytest's pythonpath (pyproject.toml)


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, tmp_path_factory) -> ComfyServer:
    """A running ComfyUI (CPU, 127.0.0.1, a free port) with the pack linked into its custom_nodes."""
    base = tmp_path_factory.mktemp("comfy-server")
    server = ComfyServer.start(comfyui_path, base)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_output(comfy_server) -> Path:
    return comfy_server.base_dir / "output"
