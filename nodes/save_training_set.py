"""Save Training Set: write the filtered images as a kohya-style training set (one
``<repeats>_<aspect>`` folder per aspect, image + caption) with a manifest of scores, scorer ids
and seeds, under ComfyUI's output folder.

The name comes from a web page, so it is confined to the output folder: absolute paths, '..' and
symlinks leading out are refused (when the prompt is queued, and again when writing). The folder is
written under a temporary name and renamed when complete. Queueing the same selection again (also
after ComfyUI's cache was cleared) finds the saved set with the same content fingerprint and returns
it untouched, so the LoRAs trained on it stay valid; a different set under the same name is refused
unless ``overwrite`` is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io

from ..safe_io import TargetExistsError, confined_path
from ..training_set.layout import DEFAULT_REPEATS
from ..training_set.manifest import TrainingSet
from ..training_set.writer import write_training_set
from .common import Selection, category, node_id, overwrite_refused, overwrite_tooltip, progress_callback
from .filter_best_per_prompt import FilteredScores

DEFAULT_NAME = "versat2i/training_set"


def save_training_set(selection: FilteredScores, images: torch.Tensor, name: str, *, repeats: int,
                      overwrite: bool) -> tuple[str, TrainingSet]:
    """Write the training set under ComfyUI's output folder; returns (its path relative to the
    output folder, the written set). ``images`` must be the scored batch: write_training_set
    compares each image with the pixel fingerprint Score Images recorded, not only the count."""
    if not isinstance(selection, FilteredScores):  # a wrongly wired input: a user error (ValueError)
        raise ValueError(  # noqa: TRY004
            "selection: expected the 'selection' output of Filter Best Per Prompt (VersaT2I)")
    root = Path(folder_paths.get_output_directory())
    kept = sum(len(chosen.kept) for chosen in selection.selection.aspects.values())
    try:
        written = write_training_set(root, name, selection.table, selection.selection, images, repeats=repeats,
                                     overwrite=overwrite, progress=progress_callback(max(kept, 1)))
    except TargetExistsError as exc:
        raise overwrite_refused(exc, "Save Training Set", "training set", "name") from None
    return written.path.relative_to(root.resolve()).as_posix(), written


def describe(relative: str, written: TrainingSet) -> str:
    state = " - unchanged, reused (same content)" if written.reused else ""
    lines = [f"training set: output/{relative} ({written.summary['images_kept']} images){state}"]
    for aspect, info in written.summary["aspects"].items():
        threshold = info["threshold"]
        resolved = "" if threshold["resolved"] is None else format(threshold["resolved"], ".4g")
        if info["kept"]:
            lines.append(f"  {info['folder']}: {info['kept']} kept, {info['discarded']} discarded, "
                         f"scorer {info['scorer']['id']}, threshold {threshold['kind']} {resolved}")
        else:  # its Train Aspect LoRA node skips it, and Train Gate mixes the other aspects
            lines.append(f"  {aspect}: NO IMAGE KEPT ({info['discarded']} discarded by threshold {threshold['kind']} "
                         f"{resolved}): not trained; the gate mixes the other aspects")
    return "\n".join(lines)


class SaveTrainingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("SaveTrainingSet"),
            display_name="Save Training Set (VersaT2I)",
            category=category("dataset"),
            description=(
                "Writes the kept images of every aspect as a kohya-style training set under ComfyUI's output "
                "folder: <name>/<repeats>_<aspect>/<id>.png + <id>.txt (caption = prompt), manifest.jsonl "
                "(prompt, seed, scores, scorer ids and weight hashes) and dataset.json."
            ),
            is_output_node=True,
            inputs=[
                Selection.Input("selection", tooltip="The selection from Filter Best Per Prompt (VersaT2I)."),
                io.Image.Input("images", tooltip="The same image batch that was scored and filtered."),
                io.String.Input(
                    "name", default=DEFAULT_NAME,
                    tooltip="Folder name inside ComfyUI's output folder (sub-folders allowed, e.g. "
                            "'versat2i/run1'). Absolute paths and '..' are refused.",
                ),
                io.Int.Input("repeats", default=DEFAULT_REPEATS, min=1, max=10000,
                             tooltip="kohya repeats: how often each image is seen per epoch (the folder "
                                     "prefix, '<repeats>_<aspect>')."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip=overwrite_tooltip("training set", "images, scores, thresholds and repeats")),
            ],
            outputs=[
                io.String.Output("dataset_path", display_name="dataset_path",
                                 tooltip="The training set folder, relative to ComfyUI's output folder; connect "
                                         "to the LoRA trainer node."),
            ],
        )

    @classmethod
    def validate_inputs(cls, name: str | None = None) -> bool | str:
        # Refuse an escaping name when the prompt is queued, before any node runs.
        if name is None:  # linked: checked when writing
            return True
        try:
            confined_path(folder_paths.get_output_directory(), name, what="name")
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, selection: Any, images: torch.Tensor, name: str, repeats: int, overwrite: bool) -> io.NodeOutput:
        relative, written = save_training_set(selection, images, name, repeats=repeats, overwrite=overwrite)
        return io.NodeOutput(relative, ui={"text": (describe(relative, written),)})


NODES = [SaveTrainingSet]
