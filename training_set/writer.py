"""Write a per-aspect training set (layout: the package docstring) from a score table, its selection
and the images that were scored.

``<id>`` is ``p<prompt_index:05d>_c<candidate_index:03d>``: unique within an aspect folder (one
image per prompt), and the same source image has the same id in every aspect that kept it.

The images must be the ones scored: where the score table has ``pixels_sha256`` (Score Images and
``versat2i score`` record it), each kept image's pixels are compared with it, and a different image
is refused before anything is written under the final name.

Captions: kohya reads only a caption file's first line, so line breaks (and any control character,
NUL included) in a prompt become spaces in the caption; the manifest keeps the prompt as is.

The whole folder is written under a temporary name and renamed when complete (``safe_io``): a
failure part-way leaves nothing under ``<name>`` and no temporary folder. An existing ``<name>``
is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..aspects import check_aspect_name
from ..image_files import load_image_file, save_png, to_uint8
from ..rewards.base import ProgressCallback, check_images
from ..rewards.score_table import ScoreTable, pixels_sha256
from ..rewards.selection import Selection
from ..safe_io import atomic_dir, confined_path, folder_problem
from .layout import (
    DEFAULT_REPEATS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATENTS_SUFFIX,
    MANIFEST_NAME,
    SUMMARY_NAME,
    caption_for,
    entry_id,
)
from .manifest import ManifestEntry, TrainingSet

logger = logging.getLogger(__name__)

ImageSource = torch.Tensor | Sequence[torch.Tensor | str | Path]


def _repeats_per_aspect(repeats: int | Mapping[str, int], aspects: Sequence[str]) -> dict[str, int]:
    if isinstance(repeats, Mapping):
        extra = [a for a in repeats if a not in aspects]
        if extra:
            raise ValueError(
                f"repeats given for aspect(s) {extra} that are not in the selection ({', '.join(aspects)})"
            )
        values = {a: repeats.get(a, DEFAULT_REPEATS) for a in aspects}
    else:
        values = {a: repeats for a in aspects}
    for aspect, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"repeats for {aspect!r}: {value!r}; give a whole number >= 1 (kohya folder '<repeats>_{aspect}')"
            )
    return values


def _check_latents(latents: Any, count: int) -> list[torch.Tensor | None] | None:
    if latents is None:
        return None
    if isinstance(latents, torch.Tensor):
        if latents.ndim != 4:
            raise ValueError(f"latents: expected [B,C,h,w], got shape {tuple(latents.shape)}")
        latents = list(latents)
    latents = list(latents)
    if len(latents) != count:
        raise ValueError(f"latents: {len(latents)} latents for {count} images; give one per scored image (or None)")
    for i, latent in enumerate(latents):
        if latent is not None and (not isinstance(latent, torch.Tensor) or latent.ndim != 3):
            raise ValueError(f"latents[{i}]: expected a [C,h,w] tensor or None")
    return latents


@dataclass
class TrainingSetPlan:
    """What ``check_training_set`` accepted: everything ``write_checked`` needs, validated."""

    final: Path
    name: str
    table: ScoreTable
    selection: Selection
    images: torch.Tensor | list
    aspects: list[str]
    repeats_of: dict[str, int]
    latents: list[torch.Tensor | None] | None
    kept_total: int

    def pixels_of(self, row: int) -> np.ndarray:
        """The kept image of ``row`` as 8-bit RGB, refused if it is not the image that was scored."""
        source = self.images[row]
        if isinstance(source, torch.Tensor):  # validated by check_training_set
            pixels = to_uint8(source)
        else:
            pixels = load_image_file(source, what=f"images[{row}]")
        expected = self.table.fingerprints[row]
        if expected is not None and pixels_sha256(pixels) != expected:
            # Inside the temporary folder: raising here leaves nothing under the final name.
            raise ValueError(
                f"images[{row}]{f' ({str(source)!r})' if isinstance(source, (str, Path)) else ''} is not the image "
                "that was scored (its pixels differ from the scored ones); pass the images that were scored, or "
                "score them again"
            )
        return pixels


def check_training_set(root: str | Path, name: str, table: ScoreTable, selection: Selection, images: ImageSource, *,
                       repeats: int | Mapping[str, int] = DEFAULT_REPEATS,
                       latents: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> TrainingSetPlan:
    """Every check ``write_training_set`` makes before it writes anything: ``ValueError`` /
    ``FileNotFoundError`` naming the bad input and the fix, else the plan to write."""
    final = confined_path(root, name, what="dataset name")
    problem = folder_problem(final.parent, what="training set folder")
    if problem:
        raise ValueError(problem)
    count = len(table)
    if selection.image_count != count:
        raise ValueError(
            f"selection covers {selection.image_count} images but the score table has {count}; "
            "filter the same scores you pass here"
        )
    aspects = list(selection.aspects)
    if not aspects:
        raise ValueError("selection: no aspect selected; filter at least one aspect")
    for aspect in aspects:
        if aspect not in table.scores:
            raise ValueError(f"selection aspect {aspect!r} is not in the score table ({', '.join(table.aspects)})")
        check_aspect_name(aspect, what="selection aspect")
        for row in selection.aspects[aspect].kept:
            if not 0 <= row < count:
                raise ValueError(f"selection for {aspect!r} keeps image {row}, but the table has {count} images")
    repeats_of = _repeats_per_aspect(repeats, aspects)
    for aspect in aspects:
        unjudged = [row for row in selection.aspects[aspect].kept if not table.judged[aspect][row]]
        if unjudged:
            raise ValueError(
                f"selection for {aspect!r} keeps image(s) {unjudged[:10]} that its scorer found nothing to judge in; "
                "filter these scores with select_best_per_prompt"
            )
    if isinstance(images, torch.Tensor):
        check_images(images, name="images")
        if images.shape[0] != count:
            raise ValueError(
                f"images: {images.shape[0]} images for {count} scored rows; pass the images that were scored"
            )
        table.check_images_match(images, name="images")
    else:
        if isinstance(images, (str, Path)):
            raise ValueError("images: expected one image (tensor or file path) per scored row, got a single path")
        images = list(images)
        if len(images) != count:
            raise ValueError(
                f"images: {len(images)} images for {count} scored rows; pass the images that were scored"
            )
        needed = sorted({row for a in aspects for row in selection.aspects[a].kept})
        for row in needed:
            source = images[row]
            if isinstance(source, torch.Tensor):
                if source.ndim != 3:
                    raise ValueError(f"images[{row}]: expected [H,W,3], got shape {tuple(source.shape)}")
                check_images(source[None], name=f"images[{row}]")
            elif not isinstance(source, (str, Path)):
                raise ValueError(
                    f"images[{row}]: expected a tensor [H,W,3] or an image file path, got {type(source).__name__}"
                )
            elif not Path(source).is_file():
                raise FileNotFoundError(f"images[{row}]: image file {str(source)!r} not found")
    latents_list = _check_latents(latents, count)
    kept_total = sum(len(selection.aspects[a].kept) for a in aspects)
    if kept_total == 0:
        raise ValueError(
            "no image passed the threshold of any aspect, so there is nothing to train on; lower the "
            "thresholds (e.g. 'none' keeps the best image of every prompt)"
        )

    return TrainingSetPlan(final=final, name=name, table=table, selection=selection, images=images, aspects=aspects,
                           repeats_of=repeats_of, latents=latents_list, kept_total=kept_total)


def write_training_set(
    root: str | Path,
    name: str,
    table: ScoreTable,
    selection: Selection,
    images: ImageSource,
    *,
    repeats: int | Mapping[str, int] = DEFAULT_REPEATS,
    overwrite: bool = False,
    latents: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    latents_metadata: Mapping[str, str] | None = None,
    extra_summary: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> TrainingSet:
    """Write ``<root>/<name>/`` (layout in the module docstring) from a score table, its selection
    and the images it scored (a ComfyUI IMAGE tensor [B,H,W,3], or one tensor [H,W,3] / image file
    path per table row). ``name`` may contain sub-folders and is confined to ``root``.

    Everything is validated before anything is written; ``ValueError`` names the bad input and the
    fix, ``TargetExistsError`` (a ValueError) says the name is taken and ``overwrite`` is off.
    ``latents``: optional generation-time latents, one [C,h,w] per table row (or None), saved as
    ``<id>.latents.safetensors`` with ``latents_metadata`` (e.g. ``{"vae_sha256": ...}``).
    """
    plan = check_training_set(root, name, table, selection, images, repeats=repeats, latents=latents)
    return write_checked(plan, overwrite=overwrite, latents_metadata=latents_metadata, extra_summary=extra_summary,
                         progress=progress)


def write_checked(plan: TrainingSetPlan, *, overwrite: bool = False, latents_metadata: Mapping[str, str] | None = None,
                  extra_summary: Mapping[str, Any] | None = None,
                  progress: ProgressCallback | None = None) -> TrainingSet:
    """Write a checked plan under a temporary name, then rename it to its final name."""
    final, name, table, selection = plan.final, plan.name, plan.table, plan.selection
    aspects, repeats_of, latents_list, kept_total = plan.aspects, plan.repeats_of, plan.latents, plan.kept_total
    from safetensors.torch import save_file

    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries: list[ManifestEntry] = []
    done = 0
    with atomic_dir(final, overwrite=overwrite, what="training set") as temp:
        for aspect in aspects:
            chosen = selection.aspects[aspect]
            folder = f"{repeats_of[aspect]}_{aspect}"
            if not chosen.kept:
                logger.warning("training set %s: no image kept for aspect %r (threshold %s)",
                               name, aspect, chosen.threshold)
                continue
            (temp / folder).mkdir()
            for row in chosen.kept:
                image_id = entry_id(table.prompt_indices[row], table.candidate_indices[row])
                pixels = plan.pixels_of(row)
                save_png(pixels, temp / folder / f"{image_id}.png")
                caption = caption_for(table.prompts[row])
                (temp / folder / f"{image_id}.txt").write_text(caption, encoding="utf-8")
                latents_file = None
                if latents_list is not None and latents_list[row] is not None:
                    latents_file = f"{folder}/{image_id}{LATENTS_SUFFIX}"
                    save_file({"latents": latents_list[row].detach().cpu().contiguous()}, str(temp / latents_file),
                              metadata=dict(latents_metadata or {}))
                entries.append(ManifestEntry(
                    id=image_id, aspect=aspect, file=f"{folder}/{image_id}.png", caption=caption,
                    prompt=table.prompts[row], seed=table.seeds[row], prompt_index=table.prompt_indices[row],
                    candidate_index=table.candidate_indices[row], score=table.scores[aspect][row],
                    scorer=dict(table.scorers[aspect]),
                    scores={a: table.scores[a][row] for a in table.aspects},
                    scorers={a: dict(table.scorers[a]) for a in table.aspects},
                    threshold=chosen.threshold_record(), width=int(pixels.shape[1]), height=int(pixels.shape[0]),
                    latents=latents_file, source=table.image_ids[row],
                    judged={a: table.judged[a][row] for a in table.aspects}, pixels_sha256=pixels_sha256(pixels),
                ))
                done += 1
                if progress is not None:
                    progress(done, kept_total)
        manifest = "".join(json.dumps(e.to_dict(), ensure_ascii=False, allow_nan=False) + "\n" for e in entries)
        (temp / MANIFEST_NAME).write_text(manifest, encoding="utf-8")
        summary = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": name,
            "created": created,
            "layout": "kohya: <repeats>_<aspect>/<id>.png + <id>.txt",
            "manifest": MANIFEST_NAME,
            "images_scored": len(table),
            "prompts": len(set(table.prompt_indices)),
            "images_kept": len(entries),
            "latents": latents_list is not None,
            "aspects": {
                aspect: {
                    "folder": f"{repeats_of[aspect]}_{aspect}",
                    "repeats": repeats_of[aspect],
                    "kept": len(selection.aspects[aspect].kept),
                    "discarded": len(selection.aspects[aspect].discarded),
                    "scorer": dict(table.scorers[aspect]),
                    "threshold": selection.aspects[aspect].threshold_record(),
                }
                for aspect in aspects
            },
            "extra": dict(extra_summary or {}),
        }
        summary_text = json.dumps(summary, ensure_ascii=False, indent=1, allow_nan=False)
        (temp / SUMMARY_NAME).write_text(summary_text, encoding="utf-8")
    logger.info("training set %s: %d images over %d aspect(s) written to %s", name, len(entries), len(aspects), final)
    return TrainingSet(path=final, summary=summary,
                       entries=[ManifestEntry(**{**e.to_dict(), "dataset_dir": final}) for e in entries])
