"""Best-per-prompt selection: the filter step of VersaT2I.

For each aspect independently:

1. Group the images by prompt (``prompt_index``).
2. Take the single best image of each prompt: the highest score; ties (exactly equal scores) go to
   the lowest ``candidate_index``, i.e. the earliest generated candidate, then to the earliest row.
3. Keep it if its score passes the aspect's threshold, else discard it too. Every other image of the
   prompt is discarded.

Images the aspect's scorer found nothing to judge in (the score table's per-image ``judged`` flag
is False: the geometry scorer on an image without a person) take no part: they are never kept,
whatever the threshold, and are left out of percentile pools. A prompt whose images are all
unjudged keeps nothing for that aspect. So the default settings (no threshold) can't put an image
without a person into the geometry training set. Only the flag counts, never the score: a judged
image scoring exactly the placeholder of an unjudged one is an ordinary candidate.

**Jointly best** (``with_joint_scores`` + ``select_aspect``): the image of each prompt that is best
at all aspects at once, the training data of a mixture gate (whose job is to combine the aspect
LoRAs; each aspect's own best images are the LoRAs' data). Each aspect's score is standardised over
its judged pool (``(score - mean) / sd``: aspects whose rewards move on different scales count
alike) and the joint score is the mean over the aspects; an image takes part when every aspect
judged it. It is an extra score column, ``JOINT``, so it is selected, thresholded and written like
an aspect.

Thresholds (``Threshold.parse`` reads the text form used by nodes and the CLI):

* ``none`` — no threshold: the best image of every prompt is kept.
* an absolute value, e.g. ``5.5`` or ``-0.2`` — keep when ``score >= value``.
* a percentile, e.g. ``75%`` or ``p75`` (0..100) — the threshold is the q-th percentile of *all*
  judged scores of the pool for that aspect (every candidate of every prompt, not only the bests), with
  linear interpolation between ranks (``numpy.percentile``'s default); keep when ``score >= it``.
  The comparison is inclusive, so ``p0`` keeps every best and ``p100`` keeps only images that
  equal the pool's maximum.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

THRESHOLD_KINDS = ("none", "absolute", "percentile")
JOINT = "joint"  # the score column (and training-set folder) of the jointly best images
_PERCENTILE = re.compile(r"^(?:p\s*(?P<p>[-+0-9.eE]+)|(?P<q>[-+0-9.eE]+)\s*%)$", re.IGNORECASE)


@dataclass(frozen=True)
class Threshold:
    """``kind`` is "none", "absolute" or "percentile"; ``value`` is the score or the percentile
    (0..100), None for "none"."""

    kind: str = "none"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in THRESHOLD_KINDS:
            raise ValueError(f"threshold kind {self.kind!r}: use one of {', '.join(THRESHOLD_KINDS)}")
        if self.kind == "none":
            if self.value is not None:
                raise ValueError("threshold 'none' takes no value")
            return
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"{self.kind} threshold: value {self.value!r} is not a finite number")
        if self.kind == "percentile" and not 0.0 <= self.value <= 100.0:
            raise ValueError(f"percentile threshold {self.value!r}: must be between 0 and 100 (e.g. 'p75' or '75%')")

    @classmethod
    def parse(cls, spec: Threshold | str | float | int | None) -> Threshold:
        """``None``/"none"/"" -> no threshold; a number or "5.5" -> absolute; "75%"/"p75" -> percentile."""
        if isinstance(spec, Threshold):
            return spec
        if spec is None:
            return cls("none")
        if isinstance(spec, bool):
            raise ValueError(f"threshold {spec!r}: give 'none', a score such as 5.5, or a percentile such as 'p75'")
        if isinstance(spec, (int, float)):
            return cls("absolute", float(spec))
        text = str(spec).strip()
        if text.lower() in ("", "none", "off"):
            return cls("none")
        match = _PERCENTILE.match(text)
        try:
            if match:
                return cls("percentile", float(match.group("p") or match.group("q")))
            return cls("absolute", float(text))
        except ValueError as exc:
            if "threshold" in str(exc):
                raise
            raise ValueError(
                f"threshold {text!r}: give 'none', a score such as 5.5, or a percentile such as 'p75' / '75%'"
            ) from None

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        return f"p{self.value:g}" if self.kind == "percentile" else f"{self.value:g}"

    def resolve(self, pool: Sequence[float]) -> float | None:
        """The score a best image must reach (``>=``), or None for "none"."""
        if self.kind == "none":
            return None
        if self.kind == "absolute":
            return float(self.value)
        return float(np.percentile(np.asarray(pool, dtype=np.float64), self.value, method="linear"))


@dataclass(frozen=True)
class AspectSelection:
    """The outcome for one aspect. Indices are rows of the scored pool (the ScoreTable)."""

    aspect: str
    threshold: Threshold
    resolved: float | None  # the score a best image had to reach; None without a threshold
    kept: tuple[int, ...]  # kept rows, in prompt_index order
    discarded: tuple[int, ...]  # every other row, ascending
    best: dict[int, int] = field(default_factory=dict)  # prompt_index -> its best judged row (kept or not)
    unjudged: tuple[int, ...] = ()  # rows the scorer found nothing to judge in (all discarded), ascending

    @property
    def rejected_best(self) -> tuple[int, ...]:
        """Best images that failed the threshold, in prompt_index order."""
        kept = set(self.kept)
        return tuple(row for _, row in sorted(self.best.items()) if row not in kept)

    def threshold_record(self) -> dict[str, Any]:
        """``{"kind", "value", "resolved"}`` as stored in the manifest and dataset.json."""
        return {"kind": self.threshold.kind, "value": self.threshold.value, "resolved": self.resolved}


@dataclass(frozen=True)
class Selection:
    """Per-aspect selections over one pool of ``image_count`` images."""

    aspects: dict[str, AspectSelection]
    image_count: int

    def kept_by_aspect(self) -> dict[str, list[int]]:
        return {aspect: list(s.kept) for aspect, s in self.aspects.items()}

    def summary(self) -> str:
        lines = []
        for aspect, s in self.aspects.items():
            resolved = "" if s.resolved is None else f" (>= {s.resolved:.4g})"
            unjudged = f" ({len(s.unjudged)} with nothing to judge)" if s.unjudged else ""
            lines.append(
                f"{aspect}: kept {len(s.kept)} of {len(s.best)} prompts, threshold {s.threshold}{resolved}; "
                f"discarded {len(s.discarded)} of {self.image_count} images{unjudged}"
            )
        return "\n".join(lines)


def select_aspect(
    scores: Sequence[float],
    prompt_indices: Sequence[int],
    candidate_indices: Sequence[int] | None = None,
    threshold: Threshold | str | float | None = None,
    *,
    aspect: str = "scores",
    judged: Sequence[bool] | None = None,
) -> AspectSelection:
    """Best image per prompt for one aspect (rules in the module docstring). ``candidate_indices``
    break ties (default: row order); rows whose ``judged`` flag is False are never kept (default:
    every row judged). Raises ValueError for an empty pool, mismatched lengths, NaN/inf scores or
    a bad threshold."""
    threshold = Threshold.parse(threshold)
    if hasattr(scores, "detach"):
        scores = scores.detach().double().flatten().cpu().tolist()
    scores = [float(v) for v in scores]
    count = len(scores)
    if count == 0:
        raise ValueError(f"{aspect}: the pool is empty (0 scores); score some images before filtering")
    if len(prompt_indices) != count:
        raise ValueError(f"{aspect}: {count} scores but {len(prompt_indices)} prompt indices; give one per image")
    candidate_indices = list(range(count)) if candidate_indices is None else list(candidate_indices)
    if len(candidate_indices) != count:
        raise ValueError(f"{aspect}: {count} scores but {len(candidate_indices)} candidate indices; give one per image")
    bad = [i for i, v in enumerate(scores) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"{aspect}: NaN/inf scores for image(s) {bad[:10]}{'...' if len(bad) > 10 else ''}; "
            "fix or drop those images (a scorer must return a finite score for every image)"
        )
    if judged is None:
        judged = [True] * count
    if hasattr(judged, "detach"):
        judged = judged.detach().flatten().cpu().tolist()
    judged = list(judged)
    if len(judged) != count:
        raise ValueError(f"{aspect}: {count} scores but {len(judged)} judged flags; give one per image")
    if any(not isinstance(flag, bool) for flag in judged):
        raise ValueError(f"{aspect}: judged flags must be True or False")
    unjudged = [row for row in range(count) if not judged[row]]
    judged_rows = [row for row in range(count) if judged[row]]
    if threshold.kind == "percentile" and not judged_rows:
        resolved = None  # no pool to take a percentile of; nothing can be kept anyway
    else:
        resolved = threshold.resolve([scores[row] for row in judged_rows])

    # (score, -candidate, -row) is largest for the best image: highest score, then lowest candidate
    # index, then earliest row.
    best: dict[int, int] = {}
    for row in judged_rows:
        prompt_index = prompt_indices[row]
        current = best.get(prompt_index)
        if current is None or (scores[row], -candidate_indices[row], -row) > (
            scores[current], -candidate_indices[current], -current
        ):
            best[prompt_index] = row
    kept = tuple(
        row for _, row in sorted(best.items()) if resolved is None or scores[row] >= resolved
    )
    kept_set = set(kept)
    discarded = tuple(row for row in range(count) if row not in kept_set)
    return AspectSelection(aspect=aspect, threshold=threshold, resolved=resolved, kept=kept,
                           discarded=discarded, best=best, unjudged=tuple(unjudged))


def select_best_per_prompt(
    table: Any,
    thresholds: Mapping[str, Threshold | str | float | None] | Threshold | str | float | None = None,
    *,
    aspects: Sequence[str] | None = None,
) -> Selection:
    """Run ``select_aspect`` for each aspect of a ``ScoreTable`` (or only ``aspects``).
    ``thresholds``: one spec for every aspect, or ``{aspect: spec}`` (aspects not named get
    "none")."""
    aspects = list(table.aspects if aspects is None else aspects)
    if not aspects:
        raise ValueError("aspects: none selected; choose at least one scored aspect")
    unknown = [a for a in aspects if a not in table.scores]
    if unknown:
        raise ValueError(f"aspect(s) {unknown} were not scored; scored aspects: {', '.join(table.aspects)}")
    if isinstance(thresholds, Mapping):
        extra = [a for a in thresholds if a not in aspects]
        if extra:
            raise ValueError(
                f"thresholds given for aspect(s) {extra} that are not being filtered; "
                f"filtered aspects: {', '.join(aspects)}"
            )
        per_aspect = {a: Threshold.parse(thresholds.get(a)) for a in aspects}
    else:
        shared = Threshold.parse(thresholds)
        per_aspect = {a: shared for a in aspects}
    return Selection(
        aspects={
            a: select_aspect(table.scores[a], table.prompt_indices, table.candidate_indices, per_aspect[a], aspect=a,
                             judged=table.judged[a])
            for a in aspects
        },
        image_count=len(table),
    )


def with_joint_scores(table: Any, aspects: Sequence[str] | None = None) -> Any:
    """``table`` with one more score column, ``JOINT``: the mean over ``aspects`` (default: every
    scored one) of each aspect's score standardised over its judged pool (module docstring). Judged
    where every aspect judged the image."""
    aspects = list(table.aspects if aspects is None else aspects)
    if JOINT in table.scores:
        raise ValueError(f"aspect {JOINT!r}: the name of the joint score column; rename that aspect")
    unknown = [a for a in aspects if a not in table.scores]
    if len(aspects) < 2 or unknown:
        raise ValueError(f"joint selection: needs >= 2 scored aspects (got {aspects}; scored: "
                         f"{', '.join(table.aspects)})")
    judged = np.all([np.asarray(table.judged[a], dtype=bool) for a in aspects], axis=0)
    standardised = []
    for aspect in aspects:
        values = np.asarray(table.scores[aspect], dtype=np.float64)
        pool = values[np.asarray(table.judged[aspect], dtype=bool)]
        sd = float(pool.std()) if pool.size > 1 else 0.0
        standardised.append((values - (pool.mean() if pool.size else 0.0)) / (sd if sd > 0 else 1.0))
    joint = np.where(judged, np.mean(standardised, axis=0), 0.0)  # (unjudged rows are never kept)
    identity = hashlib.sha256(json.dumps([[a, table.scorers[a]] for a in aspects], sort_keys=True,
                                         default=str).encode()).hexdigest()
    return replace(table, scores={**table.scores, JOINT: joint.tolist()},
                   scorers={**table.scorers, JOINT: {"id": f"joint:{'+'.join(aspects)}", "weights_hash": identity}},
                   judged={**table.judged, JOINT: judged.tolist()})
