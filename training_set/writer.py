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
failure part-way leaves nothing under ``<name>`` and no temporary folder.

Writing again: the set's *content fingerprint* (``content_fingerprint``: every manifest entry, so
each kept image's pixel hash, caption, prompt, seed, scores and scorers, plus each aspect's
threshold and repeats) decides. An existing ``<name>`` with the same fingerprint is returned as it
is (``TrainingSet.reused``; nothing is written, so what reads it, e.g. a LoRA trained on it, stays
valid); one with another fingerprint (or a folder that is no training set) is only replaced with
``overwrite=True``, else ``TargetExistsError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from ..safe_io import TargetExistsError, atomic_dir, confined_path, folder_problem
from .layout import (
    CAPTION_SUFFIX,
    DEFAULT_REPEATS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LATENTS_SUFFIX,
    MANIFEST_NAME,
    SUMMARY_NAME,
    caption_for,
    entry_id,
    repeats_folder,
)
from .manifest import ManifestEntry, TrainingSet, read_training_set

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

    def aspect_records(self) -> dict[str, dict[str, Any]]:
        """dataset.json's per-aspect summary."""
        table, selection = self.table, self.selection
        return {aspect: {"folder": repeats_folder(self.repeats_of[aspect], aspect),
                         "repeats": self.repeats_of[aspect],
                         "kept": len(selection.aspects[aspect].kept),
                         "discarded": len(selection.aspects[aspect].discarded),
                         "scorer": dict(table.scorers[aspect]),
                         "threshold": selection.aspects[aspect].threshold_record()}
                for aspect in self.aspects}

    def entry(self, aspect: str, row: int, pixels: np.ndarray) -> ManifestEntry:
        """The manifest entry of ``row`` kept for ``aspect`` (``pixels``: its checked 8-bit RGB)."""
        table, chosen = self.table, self.selection.aspects[aspect]
        folder = repeats_folder(self.repeats_of[aspect], aspect)
        image_id = entry_id(table.prompt_indices[row], table.candidate_indices[row])
        latents_file = None
        if self.latents is not None and self.latents[row] is not None:
            latents_file = f"{folder}/{image_id}{LATENTS_SUFFIX}"
        return ManifestEntry(
            id=image_id, aspect=aspect, file=f"{folder}/{image_id}.png", caption=caption_for(table.prompts[row]),
            prompt=table.prompts[row], seed=table.seeds[row], prompt_index=table.prompt_indices[row],
            candidate_index=table.candidate_indices[row], score=table.scores[aspect][row],
            scorer=dict(table.scorers[aspect]), scores={a: table.scores[a][row] for a in table.aspects},
            scorers={a: dict(table.scorers[a]) for a in table.aspects}, threshold=chosen.threshold_record(),
            width=int(pixels.shape[1]), height=int(pixels.shape[0]), latents=latents_file, source=table.image_ids[row],
            judged={a: table.judged[a][row] for a in table.aspects}, pixels_sha256=pixels_sha256(pixels))

    def fingerprint(self) -> str:
        """``content_fingerprint`` of the set this plan writes (each kept image is read and checked)."""
        entries = [self.entry(aspect, row, self.pixels_of(row)).to_dict()
                   for aspect in self.aspects for row in self.selection.aspects[aspect].kept]
        return content_fingerprint(self.aspect_records(), entries)


def content_fingerprint(aspects: Mapping[str, Mapping[str, Any]], entries: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of what a training set holds: each aspect's repeats and threshold (``dataset.json``)
    and every manifest entry (pixel hash, caption, prompt, seed, scores, scorers, threshold...).
    Not in it: when the set was written, and files that are no part of the manifest."""
    content = {"aspects": {aspect: {"repeats": info["repeats"], "threshold": info["threshold"]}
                           for aspect, info in sorted(aspects.items())},
               "entries": sorted((dict(e) for e in entries), key=lambda e: (e["aspect"], e["id"]))}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def existing_fingerprint(folder: Path) -> str | None:
    """``content_fingerprint`` of a written training set, from its dataset.json and manifest; None when
    ``folder`` is not a readable training set."""
    try:
        written = read_training_set(folder)
        return content_fingerprint(written.summary["aspects"], [e.to_dict() for e in written.entries])
    except (OSError, ValueError, KeyError, TypeError):  # not ours, damaged, or from an older format
        return None


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
    fix. An existing set with the same content is returned as it is (``reused``, nothing written);
    ``TargetExistsError`` (a ValueError) says the name holds other content and ``overwrite`` is off.
    ``latents``: optional generation-time latents, one [C,h,w] per table row (or None), saved as
    ``<id>.latents.safetensors`` with ``latents_metadata`` (e.g. ``{"vae_sha256": ...}``).
    """
    plan = check_training_set(root, name, table, selection, images, repeats=repeats, latents=latents)
    return write_checked(plan, overwrite=overwrite, latents_metadata=latents_metadata, extra_summary=extra_summary,
                         progress=progress)


def write_checked(plan: TrainingSetPlan, *, overwrite: bool = False, latents_metadata: Mapping[str, str] | None = None,
                  extra_summary: Mapping[str, Any] | None = None,
                  progress: ProgressCallback | None = None) -> TrainingSet:
    """Write a checked plan under a temporary name, then rename it to its final name; an existing
    set with the same content fingerprint is returned instead (``reused``)."""
    final, name, table, selection = plan.final, plan.name, plan.table, plan.selection
    aspects, repeats_of, latents_list, kept_total = plan.aspects, plan.repeats_of, plan.latents, plan.kept_total
    from safetensors.torch import save_file

    fingerprint = plan.fingerprint()
    if os.path.lexists(final):
        if final.is_dir() and existing_fingerprint(final) == fingerprint:
            logger.info("training set %s: %s holds this content already; nothing written", name, final)
            existing = read_training_set(final)
            return TrainingSet(path=existing.path, summary=existing.summary, entries=existing.entries, reused=True)
        if not overwrite:
            raise TargetExistsError(f"training set {str(final)!r} already exists and holds other content (other "
                                    "images, captions, scores, thresholds or repeats)", path=final)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries: list[ManifestEntry] = []
    done = 0
    with atomic_dir(final, overwrite=overwrite, what="training set") as temp:
        for aspect in aspects:
            chosen = selection.aspects[aspect]
            folder = repeats_folder(repeats_of[aspect], aspect)
            if not chosen.kept:
                logger.warning("training set %s: no image kept for aspect %r (threshold %s)",
                               name, aspect, chosen.threshold)
                continue
            (temp / folder).mkdir()
            for row in chosen.kept:
                pixels = plan.pixels_of(row)
                entry = plan.entry(aspect, row, pixels)
                save_png(pixels, temp / entry.file)
                (temp / entry.file).with_suffix(CAPTION_SUFFIX).write_text(entry.caption, encoding="utf-8")
                if entry.latents is not None:
                    save_file({"latents": latents_list[row].detach().cpu().contiguous()}, str(temp / entry.latents),
                              metadata=dict(latents_metadata or {}))
                entries.append(entry)
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
            "aspects": plan.aspect_records(),
            "content_sha256": fingerprint,
            "extra": dict(extra_summary or {}),
        }
        summary_text = json.dumps(summary, ensure_ascii=False, indent=1, allow_nan=False)
        (temp / SUMMARY_NAME).write_text(summary_text, encoding="utf-8")
    logger.info("training set %s: %d images over %d aspect(s) written to %s", name, len(entries), len(aspects), final)
    return TrainingSet(path=final, summary=summary,
                       entries=[ManifestEntry(**{**e.to_dict(), "dataset_dir": final}) for e in entries])
