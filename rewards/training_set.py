"""Write and read the per-aspect training sets (kohya layout + a manifest).

Layout written by ``write_training_set`` (and read by the trainer through ``read_manifest``)::

    <root>/<name>/
        <repeats>_<aspect>/<id>.png          the kept image, 8-bit RGB PNG
        <repeats>_<aspect>/<id>.txt          its caption (the prompt, UTF-8, one line)
        <repeats>_<aspect>/<id>.latents.safetensors   optional: key "latents" [C,h,w]
        manifest.jsonl                       one JSON object per kept image (``ManifestEntry``)
        dataset.json                         summary: format version, aspects, repeats, counts

``<id>`` is ``p<prompt_index:05d>_c<candidate_index:03d>``: unique within an aspect folder (one
image per prompt), and the same source image has the same id in every aspect that kept it.

Manifest fields: ``id, aspect, file`` (image path relative to the dataset folder), ``caption``,
``prompt, seed, prompt_index, candidate_index, score`` (this aspect's), ``scorer {id,
weights_hash, ...settings}`` (the score table's record), ``scores`` and ``scorers`` (every scored
aspect), ``judged`` (every scored aspect: false where that aspect's scorer found nothing to judge,
e.g. geometry on an image without a person, so ``scores`` holds only its placeholder there; always
true for the entry's own aspect), ``threshold {kind, value, resolved}``, ``width, height``,
``latents`` (relative path or null), ``source`` (the score table's image id, e.g. the scored file's
name, or null) and ``pixels_sha256`` (sha256 of the PNG's decoded 8-bit RGB pixels).

The images must be the ones scored: where the score table has ``pixels_sha256`` (Score Images and
``versat2i score`` record it), each kept image's pixels are compared with it, and a different image
is refused before anything is written under the final name.

Pixels: float 0..1 -> uint8 by ``round(x * 255)`` (round half to even) after clamping, so the
float -> PNG -> float error is at most 0.5/255. (ComfyUI's SaveImage truncates instead, so a
saved pixel can be one level above SaveImage's.) Captions: kohya reads only a caption file's first
line, so line breaks in a prompt become spaces in the caption; the manifest keeps the prompt as is.

The whole folder is written under a temporary name and renamed when complete (``safe_io``): a
failure part-way leaves nothing under ``<name>`` and no temporary folder. An existing ``<name>``
is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..safe_io import atomic_dir, confined_path
from .base import ProgressCallback, check_images
from .score_table import ScoreTable, pixels_sha256
from .selection import Selection

logger = logging.getLogger(__name__)

FORMAT_NAME = "versat2i-training-set"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "dataset.json"
LATENTS_SUFFIX = ".latents.safetensors"
DEFAULT_REPEATS = 10
IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Aspect names become folder names ("10_<aspect>"): letters, digits, '_', '-', '.'.
_ASPECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

ImageSource = torch.Tensor | Sequence[torch.Tensor | str | Path]


def entry_id(prompt_index: int, candidate_index: int) -> str:
    return f"p{prompt_index:05d}_c{candidate_index:03d}"


def caption_for(prompt: str) -> str:
    """The caption written to ``<id>.txt``: the prompt on one line (kohya reads the first line only)."""
    return " ".join(prompt.split())


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,3] float 0..1 -> uint8 numpy array, rounding to nearest."""
    return image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu().numpy()


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write an [H,W,3] uint8 array as PNG (compression level 4, like ComfyUI's SaveImage)."""
    from PIL import Image

    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", compress_level=4)


def _open_image(path: str | Path, what: str, *, decode: bool):
    """Open an image file, refuse transparency, and return (image, path); ``decode`` reads the pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        image = Image.open(path)
        if decode:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{what} {str(path)!r} can't be read as an image ({exc}); replace or remove it") from None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image.close()
        raise ValueError(
            f"{what} {str(path)!r} has an alpha channel ({image.mode}); save it as RGB (flatten the "
            "transparency onto a background) before scoring or training on it"
        )
    return image


def check_image_file(path: str | Path, *, what: str = "image") -> tuple[int, int]:
    """Cheap up-front check (header only): the file is an image without transparency. Returns
    (width, height). ``load_image_file`` may still fail later on a truncated file."""
    with _open_image(path, what, decode=False) as image:
        return image.size


def load_image_file(path: str | Path, *, what: str = "image") -> np.ndarray:
    """Read an image file as an [H,W,3] uint8 RGB array. Files with transparency are refused
    (scorers and training take RGB; flatten them first); greyscale / palette files without
    transparency are converted to RGB; 16-bit greyscale is scaled to 8 bits."""
    with _open_image(path, what, decode=True) as image:
        if image.mode.startswith("I"):
            # 16-bit greyscale: PIL's convert("RGB") would clip at 255 instead of scaling.
            gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@dataclass(frozen=True)
class ManifestEntry:
    """One kept image of a training set (a line of manifest.jsonl)."""

    id: str
    aspect: str
    file: str
    caption: str
    prompt: str
    seed: int | None
    prompt_index: int
    candidate_index: int
    score: float
    scorer: dict[str, Any]
    scores: dict[str, float]
    scorers: dict[str, dict[str, Any]]
    threshold: dict[str, Any]
    width: int | None = None
    height: int | None = None
    latents: str | None = None
    source: str | None = None
    judged: dict[str, bool] | None = None  # None in manifests written before the flag existed
    pixels_sha256: str | None = None
    dataset_dir: Path | None = field(default=None, compare=False)

    REQUIRED = ("id", "aspect", "file", "caption", "prompt", "seed", "prompt_index", "candidate_index",
                "score", "scorer", "scores", "scorers", "threshold")

    @property
    def image_path(self) -> Path:
        return self._resolve(self.file)

    @property
    def caption_path(self) -> Path:
        return self.image_path.with_suffix(".txt")

    @property
    def latents_path(self) -> Path | None:
        return None if self.latents is None else self._resolve(self.latents)

    def _resolve(self, relative: str) -> Path:
        if self.dataset_dir is None:
            raise ValueError("manifest entry was not read from a dataset folder; paths are relative")
        return self.dataset_dir / relative

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "dataset_dir"}


@dataclass(frozen=True)
class TrainingSet:
    """A written (or read) training set: its folder, dataset.json summary and manifest entries."""

    path: Path
    summary: dict[str, Any]
    entries: list[ManifestEntry]

    def aspect_entries(self, aspect: str) -> list[ManifestEntry]:
        return [e for e in self.entries if e.aspect == aspect]


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
    # -- validate everything first: a bad input writes nothing --------------------------------
    final = confined_path(root, name, what="dataset name")
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
        if not _ASPECT_NAME.match(aspect) or aspect in (".", ".."):
            raise ValueError(
                f"aspect name {aspect!r} can't be a folder name; use letters, digits, '_', '-' or '.'"
            )
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

    def pixels_of(row: int) -> np.ndarray:
        source = images[row]
        if isinstance(source, torch.Tensor):  # validated above
            pixels = to_uint8(source)
        else:
            pixels = load_image_file(source, what=f"images[{row}]")
        expected = table.fingerprints[row]
        if expected is not None and pixels_sha256(pixels) != expected:
            # Inside the temporary folder: raising here leaves nothing under the final name.
            raise ValueError(
                f"images[{row}]{f' ({str(source)!r})' if isinstance(source, (str, Path)) else ''} is not the image "
                "that was scored (its pixels differ from the scored ones); pass the images that were scored, or "
                "score them again"
            )
        return pixels

    # -- write ----------------------------------------------------------------------------------
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
                pixels = pixels_of(row)
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
            "images_scored": count,
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


# -- reading ----------------------------------------------------------------------------------

def _dataset_dir_and_manifest(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    manifest = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(
            f"training set manifest {str(manifest)!r} not found; give a folder written by Save Training Set / "
            "`versat2i build-dataset` (it holds manifest.jsonl)"
        )
    return manifest.parent.resolve(), manifest


def read_manifest(path: str | Path, *, aspect: str | None = None) -> list[ManifestEntry]:
    """Entries of a training set's manifest (``path``: the dataset folder or its manifest.jsonl),
    optionally only those of ``aspect``. Raises ValueError naming the line for a malformed entry
    or a file path that points outside the dataset folder."""
    dataset_dir, manifest = _dataset_dir_and_manifest(path)
    entries: list[ManifestEntry] = []
    for line_number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        missing = [key for key in ManifestEntry.REQUIRED if key not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; was this manifest written by versat2i?")
        known = {k: v for k, v in record.items() if k in ManifestEntry.__dataclass_fields__ and k != "dataset_dir"}
        for key in ("file", "latents"):
            if known.get(key) is not None:
                confined_path(dataset_dir, known[key], what=f"{where}: {key}")  # a manifest can't point outside
        entries.append(ManifestEntry(**known, dataset_dir=dataset_dir))
    if aspect is not None:
        aspects = sorted({e.aspect for e in entries})
        if aspect not in aspects:
            raise ValueError(
                f"training set {str(dataset_dir)!r} has no images for aspect {aspect!r}; "
                f"it has: {', '.join(aspects) or 'none'}"
            )
        entries = [e for e in entries if e.aspect == aspect]
    return entries


def read_training_set(path: str | Path) -> TrainingSet:
    """The dataset.json summary and every manifest entry of a training set folder."""
    dataset_dir, _manifest = _dataset_dir_and_manifest(path)
    summary_path = dataset_dir / SUMMARY_NAME
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"training set summary {str(summary_path)!r} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{summary_path}: not valid JSON ({exc.msg})") from None
    if summary.get("format") != FORMAT_NAME or summary.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{summary_path}: format {summary.get('format')!r} version {summary.get('version')!r}; "
            f"this version reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return TrainingSet(path=dataset_dir, summary=summary, entries=read_manifest(dataset_dir))


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "SUMMARY_NAME", "LATENTS_SUFFIX", "DEFAULT_REPEATS",
    "IMAGE_FILE_EXTENSIONS", "ManifestEntry", "TrainingSet", "caption_for", "check_image_file", "entry_id",
    "load_image_file",
    "read_manifest", "read_training_set", "save_png", "to_uint8", "write_training_set",
]
