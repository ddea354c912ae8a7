"""Filter Best Per Prompt: for each scored aspect, keep the best image of each prompt if it clears
the aspect's threshold (absolute score or percentile of the pool); the VersaT2I filter step.

The selection is made for every aspect at once (each aspect keeps its own images, and Save
Training Set writes one folder per aspect). The kept / discarded IMAGE outputs are for looking at
the result: with ``images_for`` = "all aspects", kept = images kept by at least one aspect and
discarded = images no aspect kept; with one aspect chosen, that aspect's kept images (in prompt
order) and every other image. An empty batch blocks the nodes connected to it (nothing to show)
instead of failing them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io
from comfy_execution.graph_utils import ExecutionBlocker

from ..aspects import ASPECTS
from ..rewards.base import check_images
from ..rewards.score_table import ScoreTable
from ..rewards.selection import (
    THRESHOLD_KINDS,
    Selection,
    Threshold,
    select_best_per_prompt,
)
from .common import Scores, category, node_id
from .common import Selection as SelectionType

ALL_ASPECTS = "all aspects"


@dataclass(frozen=True)
class FilteredScores:
    """What a VERSAT2I_SELECTION wire carries: the selection and the score table whose rows it
    indexes (Save Training Set needs both)."""

    table: ScoreTable
    selection: Selection


def parse_aspect_thresholds(text: str, known_aspects: Sequence[str] = ASPECTS) -> dict[str, Threshold]:
    """``"aesthetics = p75\\nlowlevel = 0.3"`` (lines, or entries separated by ';' or ',') ->
    ``{aspect: Threshold}``. A spec is "none", a score (absolute) or "p75" / "75%" (percentile)."""
    thresholds: dict[str, Threshold] = {}
    parts = re.split(r"([\n;,])", text or "")
    entries, separators = [part.strip() for part in parts[0::2]], [None, *parts[1::2]]
    for index, (entry, separator) in enumerate(zip(entries, separators, strict=True)):
        if not entry:
            continue
        match = re.fullmatch(r"([^=:\s]+)\s*[=:]\s*(.*)", entry)
        if not match:
            previous = entries[index - 1] if index else ""
            if separator == "," and re.fullmatch(r"\d+%?", entry) and re.search(r"\d$", previous):
                raise ValueError(
                    f"aspect_thresholds: {previous + ',' + entry!r} uses a decimal comma, but ',' separates entries "
                    f"(like new lines and ';'); write a decimal point: {previous + '.' + entry!r}"
                )
            raise ValueError(
                f"aspect_thresholds: {entry!r} is not 'aspect = threshold'; write one 'aspect = threshold' per line "
                "(or separate them with ';' or ','), e.g. 'aesthetics = 5.5' or 'alignment = p75'"
            )
        aspect, spec = match.groups()
        if aspect not in known_aspects:
            raise ValueError(f"aspect_thresholds: unknown aspect {aspect!r}; use one of {', '.join(known_aspects)}")
        if aspect in thresholds:
            raise ValueError(f"aspect_thresholds: {aspect!r} is given twice; keep one line per aspect")
        try:
            thresholds[aspect] = Threshold.parse(spec)
        except ValueError as exc:
            raise ValueError(f"aspect_thresholds, {aspect}: {exc}") from None
    return thresholds


def shared_threshold(kind: str, value: float) -> Threshold:
    if kind not in THRESHOLD_KINDS:
        raise ValueError(f"threshold_kind: {kind!r} is not one of {', '.join(THRESHOLD_KINDS)}")
    return Threshold("none") if kind == "none" else Threshold(kind, float(value))


def thresholds_for(aspects: Sequence[str], kind: str, value: float, overrides: str) -> dict[str, Threshold]:
    """The threshold of each scored aspect: the shared one unless ``overrides`` names the aspect."""
    shared = shared_threshold(kind, value)
    per_aspect = parse_aspect_thresholds(overrides)
    unscored = [aspect for aspect in per_aspect if aspect not in aspects]
    if unscored:
        raise ValueError(
            f"aspect_thresholds: {', '.join(unscored)} not scored (scored: {', '.join(aspects)}); "
            "remove the line or enable the aspect in Load Scorers"
        )
    return {aspect: per_aspect.get(aspect, shared) for aspect in aspects}


def preview_rows(selection: Selection, images_for: str) -> tuple[list[int], list[int]]:
    """(kept rows, discarded rows) for the IMAGE outputs; see the module docstring."""
    if images_for == ALL_ASPECTS:
        kept = sorted({row for chosen in selection.aspects.values() for row in chosen.kept})
        kept_set = set(kept)
        return kept, [row for row in range(selection.image_count) if row not in kept_set]
    if images_for not in selection.aspects:
        raise ValueError(
            f"images_for: {images_for!r} was not scored (scored: {', '.join(selection.aspects)}); choose "
            f"'{ALL_ASPECTS}' or a scored aspect"
        )
    chosen = selection.aspects[images_for]
    return list(chosen.kept), list(chosen.discarded)


def image_subset(images: torch.Tensor, rows: list[int]) -> torch.Tensor | ExecutionBlocker:
    # An IMAGE batch of 0 images breaks most nodes; blocking (silently) skips them instead.
    return images[rows] if rows else ExecutionBlocker(None)


def check_table(scores: Any) -> ScoreTable:
    if not isinstance(scores, ScoreTable):  # a wrongly wired input: a user error (ValueError)
        raise ValueError(  # noqa: TRY004
            "scores: expected the 'scores' output of Score Images (VersaT2I); connect it to this input")
    return scores


class FilterBestPerPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("FilterBestPerPrompt"),
            display_name="Filter Best Per Prompt (VersaT2I)",
            category=category("dataset"),
            description=(
                "For each scored aspect, keeps the best image of each prompt if its score reaches the aspect's "
                "threshold; every other image is discarded. Ties go to the earliest candidate. Images a scorer "
                "found nothing to judge in (geometry: no person) are never kept for that aspect."
            ),
            inputs=[
                Scores.Input("scores", tooltip="The scores from Score Images (VersaT2I)."),
                io.Image.Input("images", tooltip="The same image batch that was scored (for the kept/discarded "
                                                 "previews)."),
                io.Combo.Input(
                    "threshold_kind", options=list(THRESHOLD_KINDS), default="none",
                    tooltip="none: keep the best image of every prompt. absolute: keep it if score >= threshold. "
                            "percentile: keep it if score >= that percentile (0-100) of all scores of the aspect.",
                ),
                io.Float.Input(
                    "threshold", default=50.0, step=0.01, round=False,
                    tooltip="The score (absolute) or percentile 0-100 (percentile) a best image must reach; "
                            "unused for 'none'. Scales differ per scorer: check Score Images' table.",
                ),
                io.String.Input(
                    "aspect_thresholds", optional=True, multiline=True, default="",
                    tooltip="Optional per-aspect thresholds overriding the one above, one per line: "
                            "'aesthetics = 5.5' (absolute), 'alignment = p75' or '75%' (percentile), "
                            "'lowlevel = none'.",
                ),
                io.Combo.Input(
                    "images_for", options=[ALL_ASPECTS, *ASPECTS], default=ALL_ASPECTS, optional=True,
                    tooltip="Which images the kept/discarded outputs show: kept by any aspect (all aspects) "
                            "or by one aspect. The selection output always holds every aspect.",
                ),
            ],
            outputs=[
                SelectionType.Output("selection", display_name="selection",
                                     tooltip="The kept images of every aspect (with their scores); connect to "
                                             "Save Training Set."),
                io.Image.Output("kept", display_name="kept",
                                tooltip="The kept images (see images_for); blocks when none was kept."),
                io.Image.Output("discarded", display_name="discarded",
                                tooltip="The other images (see images_for); blocks when none was discarded."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="Per aspect: kept prompts and the resolved threshold, then the score "
                                         "table with kept scores marked '*'."),
            ],
        )

    @classmethod
    def validate_inputs(cls, aspect_thresholds: str | None = None) -> bool | str:
        # ComfyUI attaches what this returns to every input it takes, so it takes one: the free-text
        # thresholds, refused when queued (None = linked). The threshold kind and value, and
        # images_for, are checked when the node runs, each error naming its input (ComfyUI 0.33 checks
        # combo values itself; 0.3.64 does not).
        try:
            if aspect_thresholds is not None:
                parse_aspect_thresholds(aspect_thresholds)
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, scores: Any, images: torch.Tensor, threshold_kind: str, threshold: float,
                aspect_thresholds: str = "", images_for: str = ALL_ASPECTS) -> io.NodeOutput:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold: {threshold!r} is not a finite number")
        if images_for not in (ALL_ASPECTS, *ASPECTS):
            raise ValueError(f"images_for: {images_for!r} is not one of {', '.join((ALL_ASPECTS, *ASPECTS))}")
        table = check_table(scores)
        images = check_images(images)
        table.check_images_match(images)  # the count, and each image's pixels where the table has them
        thresholds = thresholds_for(table.aspects, threshold_kind, threshold, aspect_thresholds)
        selection = select_best_per_prompt(table, thresholds)
        kept_rows, discarded_rows = preview_rows(selection, images_for)
        summary = selection.summary() + "\n\n" + table.to_text(kept=selection.kept_by_aspect())
        return io.NodeOutput(FilteredScores(table, selection), image_subset(images, kept_rows),
                             image_subset(images, discarded_rows), summary, ui={"text": (summary,)})


NODES = [FilterBestPerPrompt]
