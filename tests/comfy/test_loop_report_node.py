"""Loop Report inside a real ComfyUI (in-process, CPU; skipped without COMFYUI_PATH): it writes the
report of an evaluation folder under the output folder, returns the HTML path and the summary plot,
and refuses names that leave the output folder."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models.eval_folder import write_eval_dir

pytestmark = pytest.mark.comfy


@pytest.fixture
def node(comfy, comfy_dirs):
    return importlib.import_module("versat2i.nodes.loop_report").LoopReport


def test_writes_the_report_of_an_eval_folder_and_shows_its_plot(node, comfy_dirs):
    eval_dir = write_eval_dir(comfy_dirs["output"] / "versat2i" / "run1" / "eval")
    output = node.execute(folder="versat2i/run1/eval", overwrite=False)
    html_path, plot = output.args
    report_dir = eval_dir / "report"
    assert html_path == str(report_dir / "report.html") and (report_dir / "report.html").is_file()
    summary = json.loads((report_dir / "report.json").read_text())["files"]["summary_plot"]
    expected = np.asarray(Image.open(report_dir / summary).convert("RGB"), dtype=np.float32) / 255
    assert plot.shape == (1, *expected.shape) and torch.equal(plot[0], torch.from_numpy(expected))
    assert "LoRA alignment" in output.ui["text"][0]
    # A second run shows the same report (kept), also when given the report folder itself.
    mtime = (report_dir / "report.json").stat().st_mtime_ns
    assert node.execute(folder="versat2i/run1/eval").args[0] == html_path
    assert node.execute(folder="versat2i/run1/eval/report").args[0] == html_path
    assert (report_dir / "report.json").stat().st_mtime_ns == mtime
    node.execute(folder="versat2i/run1/eval", overwrite=True)
    assert (report_dir / "report.json").stat().st_mtime_ns != mtime


@pytest.mark.parametrize("folder", ["../outside", "/etc", "versat2i/../../x"])
def test_names_outside_the_output_folder_are_refused(node, folder):
    assert node.validate_inputs(folder=folder) is not True
    with pytest.raises(ValueError, match="not allowed|outside"):
        node.execute(folder=folder)


def test_missing_folder_is_a_clear_error(node):
    with pytest.raises(ValueError, match="not found in ComfyUI's output folder"):
        node.execute(folder="versat2i/nothing")


def test_schema(node):
    schema = node.GET_SCHEMA()
    assert schema.node_id == "VersaT2I_LoopReport" and schema.category == "VersaT2I/report"
    assert all(socket.tooltip for socket in [*schema.inputs, *schema.outputs])
    assert list(node.RETURN_TYPES) == ["STRING", "IMAGE"]
