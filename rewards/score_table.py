"""A table of per-image scores: what Score Images outputs, `versat2i score` writes, the filter
reads and the training-set manifest is built from.

One row per image: its prompt, seed, prompt index, candidate index and optional image id (the CLI
uses the image's file name), plus one score per aspect. Each aspect also records the scorer that
produced it (``{"id", "weights_hash"}``, plus settings that change its scores, such as
``score_transform`` or ``no_person_score``), so every stored score traces back to an exact model.
Prompts and seeds travel with the scores from generation to the manifest.

Two more per-image columns:

* ``judged`` (``{aspect: bool}``): False where the aspect's scorer found nothing to judge (the
  geometry scorer on an image without a person). The score there is only the scorer's
  placeholder (``no_person_score``); selection never keeps such an image and leaves it out of
  percentile pools. Every other score is a judgement, whatever its value.
* ``pixels_sha256``: sha256 (hex) of the image's 8-bit RGB pixels as scored (``[H,W,3]`` uint8,
  row-major, ``round(x * 255)``, the bytes its PNG decodes to), or null when unknown. Filter and
  Save Training Set compare it with the images they are given, so pixels can't be written under
  another image's scores.

Files:

* JSONL (``.jsonl``): one self-contained object per image, in table order::

    {"image_id": "img_0001.png", "prompt": "a red fox", "seed": 42, "prompt_index": 0,
     "candidate_index": 1, "scores": {"aesthetics": 5.93, "geometry": 0.0},
     "judged": {"aesthetics": true, "geometry": false}, "pixels_sha256": "3f0c...",
     "scorers": {"aesthetics": {"id": "laion-aesthetic-v2", "weights_hash": "9a1b..."}, ...}}

  (``judged`` may be left out when every image was judged, ``pixels_sha256`` when unknown.)

* JSON (``.json``): ``{"format": "versat2i-scores", "version": 1, "aspects": [...],
  "scorers": {...}, "images": [rows without "scorers"]}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_io import atomic_write_text

FORMAT_NAME = "versat2i-scores"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
UNJUDGED_CELL = "n/a"  # what tables and previews show for a score that is no judgement


def pixels_sha256(pixels) -> str:
    """sha256 (hex) of one image's 8-bit RGB pixels, a ``[H,W,3]`` uint8 numpy array."""
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def image_fingerprints(images) -> list[str]:
    """``pixels_sha256`` of each image of a ComfyUI IMAGE batch ``[B,H,W,3]`` (0..1), rounded to
    8 bits the way the training set writes its PNGs (so a fingerprint is also the one of the PNG
    the image becomes). Cheap next to scoring: ~15 ms per 512 px image on one CPU thread, mostly
    the 8-bit conversion."""
    import torch

    pixels = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu().numpy()
    return [pixels_sha256(pixels[i]) for i in range(pixels.shape[0])]


def prompt_groups(prompts: Sequence[str]) -> tuple[list[int], list[int]]:
    """Prompt and candidate indices for images in generation order: identical prompt texts form
    one prompt (indexed by first appearance); candidates are counted in row order within it.
    ``["a", "b", "a"]`` -> ``([0, 1, 0], [0, 0, 1])``."""
    prompt_index: dict[str, int] = {}
    seen: dict[int, int] = {}
    prompt_indices, candidate_indices = [], []
    for prompt in prompts:
        index = prompt_index.setdefault(prompt, len(prompt_index))
        prompt_indices.append(index)
        candidate_indices.append(seen.get(index, 0))
        seen[index] = seen.get(index, 0) + 1
    return prompt_indices, candidate_indices


def _scorer_record(aspect: str, scorer: Any) -> dict[str, Any]:
    """What identifies an aspect's scores: ``{"id", "weights_hash"}`` plus the scorer's other
    ``describe()`` entries (its settings), from a Scorer or from a mapping read back from a file.
    Extra entries that are not JSON scalars are dropped, so a record always round-trips through
    JSON. A record with ``unjudged_score`` (written before the per-image ``judged`` flags, when an
    unjudged image was told by its score) is refused: its judged images can't be told apart."""
    if isinstance(scorer, Mapping):
        described = dict(scorer)
    elif callable(getattr(scorer, "describe", None)):
        described = dict(scorer.describe())
    else:
        described = {"id": getattr(scorer, "scorer_id", None), "weights_hash": getattr(scorer, "weights_hash", None)}
    record = {"id": described.get("id"), "weights_hash": described.get("weights_hash")}
    if not all(isinstance(v, str) and v for v in record.values()):
        raise ValueError(
            f"scorers[{aspect!r}]: expected a Scorer or {{'id': str, 'weights_hash': str}}, got {scorer!r}"
        )
    if "unjudged_score" in described:
        raise ValueError(
            f"scorers[{aspect!r}]: 'unjudged_score' comes from an older versat2i that marked images with nothing "
            "to judge by their score, which can't tell them from judged images scoring the same; score the "
            "images again (the scores then carry a per-image 'judged' flag)"
        )
    for key, value in described.items():
        if key in record or key == "aspect" or not isinstance(key, str):
            continue
        if value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            record[key] = value
    return record


@dataclass
class ScoreTable:
    """Per-image scores for one or more aspects. Columns are lists of equal length (one entry per
    image, in generation order); ``scores`` and ``scorers`` are keyed by aspect. Validated on
    construction: see ``validate``."""

    prompts: list[str]
    seeds: list[int | None]
    prompt_indices: list[int]
    candidate_indices: list[int]
    image_ids: list[str | None]
    scores: dict[str, list[float]]
    scorers: dict[str, dict[str, Any]]
    # {aspect: [bool per image]}: False where the scorer found nothing to judge; an aspect left out
    # is judged on every image.
    judged: dict[str, list[bool]] = field(default_factory=dict)
    # sha256 of each image's 8-bit pixels as scored (``image_fingerprints``), None where unknown.
    fingerprints: list[str | None] | None = None

    def __post_init__(self) -> None:
        count = len(self.prompts)
        self.judged = {str(aspect): list(values) for aspect, values in (self.judged or {}).items()}
        for aspect in self.scores:
            self.judged.setdefault(aspect, [True] * count)
        self.fingerprints = [None] * count if self.fingerprints is None else list(self.fingerprints)
        self.validate()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, Any],
        scorers: Mapping[str, Any],
        prompts: Sequence[str],
        *,
        seeds: Sequence[int | None] | None = None,
        prompt_indices: Sequence[int] | None = None,
        candidate_indices: Sequence[int] | None = None,
        image_ids: Sequence[str | None] | None = None,
        judged: Mapping[str, Any] | None = None,
        fingerprints: Sequence[str | None] | None = None,
    ) -> ScoreTable:
        """Build from ``score_aspects(...)``'s ``{aspect: tensor [B]}`` and the scorers used
        (``{aspect: Scorer}`` or ``{aspect: {"id", "weights_hash"}}``). Prompt/candidate indices
        default to ``prompt_groups(prompts)``; seeds and image ids default to None.

        ``judged``: ``{aspect: bools}`` (default: the ``.judged`` of ``score_aspects``' result;
        aspects without one are judged on every image, which a Scorer with
        ``may_leave_unjudged`` refuses). ``fingerprints``: ``image_fingerprints(images)`` of the
        scored batch, checked later against the images handed to Filter and Save."""
        if isinstance(prompts, str):
            raise ValueError("prompts: expected one prompt per image (a list), got a single string")
        prompts = list(prompts)
        count = len(prompts)
        if prompt_indices is None and candidate_indices is None:
            prompt_indices, candidate_indices = prompt_groups(prompts)
        elif prompt_indices is None or candidate_indices is None:
            raise ValueError("prompt_indices and candidate_indices: give both or neither")
        columns = {}
        for aspect, values in scores.items():
            if hasattr(values, "detach"):
                values = values.detach().float().flatten().cpu().tolist()
            columns[str(aspect)] = [float(v) for v in values]
        missing = set(columns) ^ set(scorers)
        if missing:
            raise ValueError(
                f"scores and scorers cover different aspects ({sorted(missing)}); "
                "give the scorer of every scored aspect"
            )
        masks = dict(getattr(scores, "judged", None) or {}) if judged is None else dict(judged)
        unknown = sorted(set(masks) - set(columns))
        if unknown:
            raise ValueError(f"judged: flags for aspect(s) {unknown} that have no scores")
        judged_columns = {}
        for aspect, flags in masks.items():
            if hasattr(flags, "detach"):
                flags = flags.detach().flatten().cpu()
            judged_columns[str(aspect)] = flags.tolist() if hasattr(flags, "tolist") else list(flags)
        for aspect, scorer in scorers.items():
            if getattr(scorer, "may_leave_unjudged", False) and aspect not in judged_columns:
                raise ValueError(
                    f"judged: scorer {getattr(scorer, 'scorer_id', aspect)!r} ({aspect}) may find nothing to judge in "
                    "an image, but no judged flags were given for it; pass score_aspects' result as the scores "
                    "(it carries them as .judged) or judged={aspect: flags}"
                )
        return cls(
            prompts=prompts,
            seeds=list(seeds) if seeds is not None else [None] * count,
            prompt_indices=list(prompt_indices),
            candidate_indices=list(candidate_indices),
            image_ids=list(image_ids) if image_ids is not None else [None] * count,
            scores=columns,
            scorers={aspect: _scorer_record(aspect, scorers[aspect]) for aspect in columns},
            judged=judged_columns,
            fingerprints=list(fingerprints) if fingerprints is not None else None,
        )

    def validate(self) -> None:
        """Raise ValueError naming the column, the row and the fix for any inconsistency."""
        count = len(self.prompts)
        if count == 0:
            raise ValueError("score table: no images; score at least one image")
        for name in ("seeds", "prompt_indices", "candidate_indices", "image_ids"):
            if len(getattr(self, name)) != count:
                raise ValueError(
                    f"score table: {len(getattr(self, name))} {name} for {count} prompts; give one per image"
                )
        if not self.scores:
            raise ValueError("score table: no aspect scored; add at least one aspect's scores")
        if set(self.scores) != set(self.scorers):
            raise ValueError(
                f"score table: aspects with scores {sorted(self.scores)} differ from aspects with scorers "
                f"{sorted(self.scorers)}"
            )
        for i, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"score table: prompt of image {i} is {type(prompt).__name__}, expected text")
        for name in ("seeds", "prompt_indices", "candidate_indices"):
            for i, value in enumerate(getattr(self, name)):
                if value is None and name == "seeds":
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or (name != "seeds" and value < 0):
                    raise ValueError(
                        f"score table: {name}[{i}] = {value!r}; expected a {'non-negative ' if name != 'seeds' else ''}"
                        "integer" + (" or null" if name == "seeds" else "")
                    )
        prompt_of: dict[int, str] = {}
        seen: set[tuple[int, int]] = set()
        for i, (p_index, c_index) in enumerate(zip(self.prompt_indices, self.candidate_indices, strict=True)):
            if prompt_of.setdefault(p_index, self.prompts[i]) != self.prompts[i]:
                raise ValueError(
                    f"score table: image {i} has prompt_index {p_index} but a different prompt than an earlier "
                    "image with that index; one prompt_index must mean one prompt"
                )
            if (p_index, c_index) in seen:
                raise ValueError(
                    f"score table: image {i} repeats prompt_index {p_index} / candidate_index {c_index}; "
                    "each candidate of a prompt needs its own candidate_index"
                )
            seen.add((p_index, c_index))
        ids = [image_id for image_id in self.image_ids if image_id is not None]
        if any(not isinstance(image_id, str) for image_id in ids):
            raise ValueError("score table: image ids must be text or null")
        if len(set(ids)) != len(ids):
            raise ValueError("score table: image ids repeat; every image needs its own id")
        for aspect, values in self.scores.items():
            if len(values) != count:
                raise ValueError(f"score table: {len(values)} {aspect!r} scores for {count} images; give one per image")
            bad = [i for i, v in enumerate(values) if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                raise ValueError(
                    f"score table: aspect {aspect!r} ({self.scorers[aspect]['id']}) has NaN/inf/non-numeric scores "
                    f"for image(s) {bad[:10]}{'...' if len(bad) > 10 else ''}; check the scorer and those images"
                )
            _scorer_record(aspect, self.scorers[aspect])
        if set(self.judged) != set(self.scores):
            raise ValueError(
                f"score table: judged flags for aspects {sorted(self.judged)} differ from the scored aspects "
                f"{sorted(self.scores)}"
            )
        for aspect, flags in self.judged.items():
            if len(flags) != count:
                raise ValueError(
                    f"score table: {len(flags)} {aspect!r} judged flags for {count} images; give one per image"
                )
            bad = [i for i, flag in enumerate(flags) if not isinstance(flag, bool)]
            if bad:
                raise ValueError(
                    f"score table: aspect {aspect!r} has judged flags that are not true/false for image(s) {bad[:10]}"
                )
        if len(self.fingerprints) != count:
            raise ValueError(
                f"score table: {len(self.fingerprints)} pixels_sha256 for {count} images; give one per image"
            )
        bad = [i for i, value in enumerate(self.fingerprints)
               if value is not None and not (isinstance(value, str) and _SHA256.match(value))]
        if bad:
            raise ValueError(
                f"score table: pixels_sha256 of image(s) {bad[:10]} is not a sha256 (64 lowercase hex digits) or null"
            )

    def check_images_match(self, images: Any, *, name: str = "images") -> None:
        """Refuse an IMAGE batch that is not the one scored: a different count, or (where the table
        has ``pixels_sha256``) different pixels at some row. ``images``: a validated ``[B,H,W,3]``
        tensor. Cheap next to writing PNGs (one sha256 per image)."""
        if images.shape[0] != len(self):
            raise ValueError(
                f"{name}: {images.shape[0]} images but {len(self)} were scored; connect the batch that went into "
                "Score Images"
            )
        rows = [row for row, value in enumerate(self.fingerprints) if value is not None]
        if not rows:
            return
        given = image_fingerprints(images[rows])
        differ = [row for row, value in zip(rows, given, strict=True) if value != self.fingerprints[row]]
        if differ:
            raise ValueError(
                f"{name}: image(s) {differ[:10]}{'...' if len(differ) > 10 else ''} are not the images that were "
                f"scored (their pixels differ from the ones Score Images scored); connect the same batch that went "
                "into Score Images, in the same order"
            )

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def aspects(self) -> list[str]:
        return list(self.scores)

    def row(self, index: int) -> dict[str, Any]:
        """One image as a JSON-ready dict (the JSONL line, with the scorers)."""
        return {
            "image_id": self.image_ids[index],
            "prompt": self.prompts[index],
            "seed": self.seeds[index],
            "prompt_index": self.prompt_indices[index],
            "candidate_index": self.candidate_indices[index],
            "scores": {aspect: self.scores[aspect][index] for aspect in self.scores},
            "judged": {aspect: self.judged[aspect][index] for aspect in self.scores},
            "pixels_sha256": self.fingerprints[index],
            "scorers": {aspect: dict(self.scorers[aspect]) for aspect in self.scores},
        }

    def rows(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(len(self))]

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], scorers: Mapping[str, Any] | None = None,
                  *, source: str = "rows") -> ScoreTable:
        """Inverse of ``rows()``. ``scorers`` (shared by every row) may come from the rows' own
        "scorers" field instead; rows must agree on aspects and scorers."""
        rows = list(rows)
        if not rows:
            raise ValueError(f"{source}: no images; score at least one image")
        aspects: list[str] | None = None
        shared = {aspect: _scorer_record(aspect, s) for aspect, s in scorers.items()} if scorers is not None else None
        columns: dict[str, list[Any]] = {
            key: [] for key in ("prompt", "seed", "prompt_index", "candidate_index", "image_id", "pixels_sha256")
        }
        scores: dict[str, list[float]] = {}
        judged: dict[str, list[Any]] = {}
        for line, row in enumerate(rows, start=1):
            where = f"{source}, image {line}"
            if not isinstance(row, Mapping):
                raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
            for key in ("prompt", "prompt_index", "candidate_index", "scores"):
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r}")
            row_scores = row["scores"]
            if not isinstance(row_scores, Mapping) or not row_scores:
                raise ValueError(f"{where}: 'scores' must be a non-empty object {{aspect: score}}")
            if aspects is None:
                aspects = list(row_scores)
                scores = {aspect: [] for aspect in aspects}
                judged = {aspect: [] for aspect in aspects}
            elif set(row_scores) != set(aspects):
                raise ValueError(f"{where}: scores for {sorted(row_scores)}, earlier images have {sorted(aspects)}")
            row_judged = row.get("judged", {})
            if not isinstance(row_judged, Mapping) or set(row_judged) - set(aspects):
                raise ValueError(
                    f"{where}: 'judged' must be an object {{aspect: true/false}} over the scored aspects "
                    f"({', '.join(aspects)}), got {row_judged!r}"
                )
            for aspect in aspects:
                judged[aspect].append(row_judged.get(aspect, True))  # validate() names a non-bool
            if "scorers" in row:
                row_scorers = {aspect: _scorer_record(aspect, s) for aspect, s in dict(row["scorers"]).items()}
                if shared is None:
                    shared = row_scorers
                elif row_scorers != shared:
                    raise ValueError(
                        f"{where}: scorers {row_scorers} differ from earlier images' {shared}; "
                        "one table holds the scores of one scorer per aspect"
                    )
            for aspect in aspects:
                value = row_scores[aspect]
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                scores[aspect].append(float(value) if numeric else value)  # validate() names a non-number
            for key in columns:
                columns[key].append(row.get(key))
        unrecorded = [aspect for aspect in scores if aspect not in (shared or {})]
        if unrecorded:
            raise ValueError(
                f"{source}: no scorer id recorded for aspect(s) {unrecorded}; each aspect needs its scorer's "
                "id and weights hash (\"scorers\": {aspect: {\"id\": ..., \"weights_hash\": ...}})"
            )
        return cls(
            prompts=columns["prompt"], seeds=columns["seed"], prompt_indices=columns["prompt_index"],
            candidate_indices=columns["candidate_index"], image_ids=columns["image_id"],
            scores=scores, scorers={aspect: shared[aspect] for aspect in scores}, judged=judged,
            fingerprints=columns["pixels_sha256"],
        )

    # -- files -----------------------------------------------------------------------------------
    def to_jsonl(self) -> str:
        return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in self.rows())

    def to_json(self) -> str:
        rows = [{k: v for k, v in row.items() if k != "scorers"} for row in self.rows()]
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "aspects": self.aspects,
                    "scorers": self.scorers, "images": rows}
        return json.dumps(document, ensure_ascii=False, allow_nan=False, indent=1)

    @classmethod
    def from_jsonl(cls, text: str, *, source: str = "scores JSONL") -> ScoreTable:
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{source}, line {line_number}: not valid JSON ({exc.msg})") from None
        return cls.from_rows(rows, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "scores JSON") -> ScoreTable:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(document, Mapping) or document.get("format") != FORMAT_NAME:
            raise ValueError(f"{source}: not a versat2i scores file (expected \"format\": \"{FORMAT_NAME}\")")
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: format version {document.get('version')!r}; this version reads {FORMAT_VERSION}"
            )
        return cls.from_rows(document.get("images") or [], document.get("scorers") or {}, source=source)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``.jsonl`` or ``.json`` (by suffix) atomically; refuses to replace a file unless
        ``overwrite``."""
        path = Path(path)
        if path.suffix.lower() not in (".jsonl", ".json"):
            raise ValueError(f"scores file {str(path)!r}: use a .jsonl or .json name")
        text = self.to_jsonl() if path.suffix.lower() == ".jsonl" else self.to_json()
        return atomic_write_text(path, text, overwrite=overwrite, what="scores file")

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scores file {str(path)!r} not found; write one with `versat2i score ... --out`")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"scores file {str(path)!r}: not UTF-8 text; is it a scores .jsonl/.json file?") from None
        if path.suffix.lower() == ".json":
            return cls.from_json(text, source=str(path))
        return cls.from_jsonl(text, source=str(path))

    # -- display ---------------------------------------------------------------------------------
    def to_text(self, kept: Mapping[str, Iterable[int]] | None = None, *, max_prompt_chars: int = 48) -> str:
        """A fixed-width table, one line per image. ``kept`` ({aspect: row indices}, e.g.
        ``Selection.kept_by_aspect()``) marks kept images' scores with '*'."""
        kept_sets = {aspect: set(rows) for aspect, rows in (kept or {}).items()}
        lines = ["scorers: " + "; ".join(
            f"{aspect} = {s['id']} (weights {s['weights_hash'][:12]})" for aspect, s in self.scorers.items()
        )]
        cells = [["#", "prompt", "cand", "seed", *self.aspects, "text"]]
        for i in range(len(self)):
            text = self.prompts[i].replace("\n", " ")
            if len(text) > max_prompt_chars:
                text = text[: max_prompt_chars - 1] + "…"
            scores = [
                (_format_score(self.scores[a][i]) if self.judged[a][i] else UNJUDGED_CELL)
                + ("*" if i in kept_sets.get(a, ()) else (" " if kept_sets else ""))
                for a in self.aspects
            ]
            seed = self.seeds[i]
            cells.append([str(i), str(self.prompt_indices[i]), str(self.candidate_indices[i]),
                          "-" if seed is None else str(seed), *scores, text])
        widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
        for row in cells:
            numeric = [cell.rjust(width) for cell, width in zip(row[:-1], widths[:-1], strict=True)]
            lines.append("  ".join([*numeric, row[-1]]).rstrip())
        if kept_sets:
            lines.append("* = kept (best of its prompt and above the aspect's threshold)")
        if not all(all(flags) for flags in self.judged.values()):
            lines.append(f"{UNJUDGED_CELL} = the scorer found nothing to judge (geometry: no person); never kept")
        return "\n".join(lines)


def _format_score(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.1f}"
