"""Loop Report: show (and if needed write) the evaluation report of a loop run.

The input names a folder under ComfyUI's output folder: a report folder (with report.json), or an
evaluation folder (one sub-folder per variant with its images and scores.jsonl, see
``loop/report.py``), whose report is then written to ``<folder>/report`` (kept if it exists, unless
``overwrite``). The name comes from a web page, so it is confined to the output folder.
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..loop.report import REPORT_HTML, REPORT_JSON, read_report, report_from_eval_dir
from ..safe_io import confined_path
from .common import category, node_id

REPORT_SUBFOLDER = "report"
# Where `versat2i loop` writes round 1's evaluation when its output_dir is output/versat2i/my-loop
# (the name `versat2i loop --print-config` uses): no node of the pack evaluates, the loop does.
DEFAULT_FOLDER = "versat2i/my-loop/round-1/eval"


def resolve_report(folder: str, *, overwrite: bool = False) -> Path:
    """The report folder for ``folder`` (relative to ComfyUI's output folder), written first when
    ``folder`` is an evaluation folder without a report."""
    root = folder_paths.get_output_directory()
    path = confined_path(root, folder, what="folder")
    if (path / REPORT_JSON).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"folder {folder!r}: not found in ComfyUI's output folder; give the evaluation or report "
                         f"folder of a loop run, e.g. {DEFAULT_FOLDER!r}")
    report_dir = confined_path(root, f"{folder.rstrip('/')}/{REPORT_SUBFOLDER}", what="folder")
    if (report_dir / REPORT_JSON).is_file() and not overwrite:
        return report_dir
    report_from_eval_dir(path, report_dir, overwrite=overwrite)
    return report_dir


def load_plot(path: Path) -> torch.Tensor:
    """A PNG as a ComfyUI IMAGE [1,H,W,3]."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


class LoopReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("LoopReport"),
            display_name="Loop Report (VersaT2I)",
            category=category("report"),
            description=(
                "Shows the evaluation report of a loop run: per aspect, each variant's reward against the base "
                "(paired difference with a 95 % bootstrap CI, win rate, the seed-to-seed spread), diversity and "
                "sample grids, as an HTML page with plots. Writes the report first when the folder holds only "
                "the evaluation."
            ),
            is_output_node=True,
            inputs=[
                io.String.Input("folder", default=DEFAULT_FOLDER,
                                tooltip="A report folder (with report.json) or an evaluation folder, relative to "
                                        "ComfyUI's output folder, e.g. round-1/eval of a `versat2i loop` run whose "
                                        "output_dir is <ComfyUI>/output/versat2i/my-loop. Absolute paths and '..' "
                                        "are refused."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Rewrite <folder>/report from the evaluation even if it exists."),
            ],
            outputs=[
                io.String.Output("html_path", display_name="html_path",
                                 tooltip="Full path of report.html (open it in a browser)."),
                io.Image.Output("plot", display_name="plot",
                                tooltip="The summary plot: each variant's change against the base with its CI."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None) -> bool | str:
        if folder is None:
            return True
        try:
            confined_path(folder_paths.get_output_directory(), folder, what="folder")
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, **_inputs) -> float:
        return float("nan")  # the report lives on disk: always look again

    @classmethod
    def execute(cls, folder: str, overwrite: bool = False) -> io.NodeOutput:
        report_dir = resolve_report(folder, overwrite=overwrite)
        report = read_report(report_dir)
        plot = load_plot(report_dir / report["files"]["summary_plot"])
        html_path = str(report_dir / REPORT_HTML)
        preview = ui.PreviewImage(plot, cls=cls).as_dict()
        return io.NodeOutput(html_path, plot, ui={**preview, "text": (report["markdown"] + "\n" + html_path,)})


NODES = [LoopReport]
