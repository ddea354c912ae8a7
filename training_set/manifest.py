"""The manifest of a training set (``manifest.jsonl``, one ``ManifestEntry`` per kept image) and
reading a written set back (``read_manifest``, ``read_training_set``).

Manifest fields: ``id, aspect, file`` (image path relative to the dataset folder), ``caption``,
``prompt, seed, prompt_index, candidate_index, score`` (this aspect's), ``scorer {id,
weights_hash, ...settings}`` (the score table's record), ``scores`` and ``scorers`` (every scored
aspect), ``judged`` (every scored aspect: false where that aspect's scorer found nothing to judge,
e.g. geometry on an image without a person, so ``scores`` holds only its placeholder there; always
true for the entry's own aspect), ``threshold {kind, value, resolved}``, ``width, height``,
``latents`` (relative path or null), ``source`` (the score table's image id, e.g. the scored file's
name, or null) and ``pixels_sha256`` (sha256 of the PNG's decoded 8-bit RGB pixels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_io import confined_path
from .layout import CAPTION_SUFFIX, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SUMMARY_NAME


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
        return self.image_path.with_suffix(CAPTION_SUFFIX)

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
    reused: bool = False  # written earlier with the same content; nothing was written this time

    def aspect_entries(self, aspect: str) -> list[ManifestEntry]:
        return [e for e in self.entries if e.aspect == aspect]


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
                # a manifest can't point outside
                confined_path(dataset_dir, known[key], what=f"{where}: {key}", writes=False)
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


def empty_aspects(path: str | Path) -> dict[str, dict[str, Any]]:
    """The aspects a written training set records with no kept image (its threshold kept nothing,
    or its scorer found nothing to judge: geometry without a person), as ``{aspect: its dataset.json
    record}``. They have no folder; trainers skip them and a gate mixes the other aspects. ``{}`` for
    a folder without a readable dataset.json (a kohya set made by hand lists only its folders)."""
    try:
        summary = json.loads((Path(path) / SUMMARY_NAME).read_text(encoding="utf-8"))
        aspects = summary["aspects"]
        return {aspect: dict(info) for aspect, info in aspects.items() if int(info["kept"]) == 0}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def describe_empty(aspect: str, record: dict[str, Any]) -> str:
    """Why ``aspect`` has no image, in a line: its threshold and how many candidates it discarded."""
    threshold = record.get("threshold") or {}
    kind, resolved = threshold.get("kind", "?"), threshold.get("resolved")
    limit = "" if resolved is None else f" {resolved:.4g}"
    return (f"aspect {aspect!r} kept no image (threshold {kind}{limit}; {record.get('discarded', '?')} candidates "
            "discarded or not judged by its scorer)")
