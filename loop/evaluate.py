"""Evaluation statistics: does a variant (a LoRA, a merge, the gated mixture) beat the base model?

Every variant is sampled on the same held-out prompts x seeds grid, so images pair up: variant and
base share the prompt and the starting noise. Per aspect and variant this module computes

* ``mean`` (with a bootstrap CI) and ``sd`` of the reward over the grid;
* ``diff``: the mean paired difference variant - base, with a percentile bootstrap CI. The
  resampling unit is the (prompt, seed) pair (``unit="pairs"``, default), or the prompt with all
  its seeds (``unit="prompts"``, a cluster bootstrap: wider when prompts differ a lot). The same
  resample indices serve every comparison (common random numbers), drawn from ``seed``;
* ``win_rate``: the share of pairs where the variant scores higher than the base, ties counting
  one half, with its bootstrap CI;
* the **seed-to-seed spread** of the base (``SeedSpread``): how far the base model's mean reward
  moves when the evaluation is re-run with fresh seeds and nothing else changes. Measured in the
  same run by splitting each prompt's seeds into two disjoint halves (random splits), taking the
  difference of the base's means on the halves (paired by prompt), and rescaling it to the size of
  a full run: two half-runs of h seeds differ with variance 2s^2/(P h), two full runs of S seeds
  with 2s^2/(P S), so the half-split difference is multiplied by sqrt(h / S). ``threshold`` is the
  ``level`` quantile of its absolute value: an effect is *beyond the seed-to-seed spread* when
  ``|diff| > threshold``, i.e. larger than 95 % of the mean changes that re-rolling seeds alone
  produces;
* ``diversity`` of each variant: the mean pairwise distance between the images of one prompt
  across seeds (RMS pixel distance in 0..1 units, and 1 - cosine similarity of an embedding when an
  ``embed`` function such as a CLIP image encoder is given), averaged over prompts. A variant that
  over-optimises its reward collapses onto one look per prompt: its diversity drops.

Choosing settings (the best uniform merge weight, the gate form) on the same images the results
are reported on would flatter the chosen setting. A share of the evaluation prompts is set aside
as **validation** prompts (``validation_prompts``: picked by a hash of the prompt text, so the
split does not move when prompts are added or reordered); every figure above is computed on the
other, **test** prompts, and each variant also gets its validation score, the number settings are
chosen by.

One number per variant for "better at all aspects at once", the **normalised score**: the mean
over aspects of the change vs the base in units of that aspect's seed-to-seed standard deviation
(``per_image_sd`` of the base: how much one image's reward varies across seeds of the same
prompt, measured on the whole grid). Dividing by each aspect's own variability puts aspects whose
rewards move on different scales on one footing, and unlike dividing by a LoRA's gain it does not
blow up when that gain is small or noisy; being a fixed linear combination of per-pair changes, it
is paired and bootstrapped exactly like one aspect (its CI, head-to-heads and win rates).

**Share of own gain**: for a mixed variant (a merge or the gated mixture) and aspect a, its change
on a divided by the change of aspect a's own LoRA, with a bootstrap CI (the ratio of the two paired
means on each resample). 1 = the mixture keeps all of that LoRA's gain on its aspect.

Pure numpy (plus torch only for images given as tensors); deterministic for a given ``seed``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_NAME = "versat2i-evaluation"
FORMAT_VERSION = 2  # 2: validation split, normalised scores, shares of own gain (1 still reads)
READABLE_VERSIONS = (1, 2)
NORMALISED = "normalised"  # the key of the normalised score next to the aspects in head-to-heads
DEFAULT_RESAMPLES = 2000
DEFAULT_SPLITS = 1000
UNITS = ("pairs", "prompts")
_BLOCK = 256  # bootstrap resamples computed at once (bounds memory for large grids)


# -- the paired grid ----------------------------------------------------------------------------

@dataclass
class ScoreGrid:
    """Scores of every variant on one prompts x seeds grid.

    ``scores[variant][aspect]`` is a float array [P, S]: row p is prompt ``prompts[p]``, column s
    its seed ``seeds[p][s]`` (prompts may have different seeds, but every variant has the same
    pairs). ``scorers[aspect]`` records the scorer ``{"id", "weights_hash"}`` when known.
    """

    prompts: list[str]
    seeds: list[list[int]]
    scores: dict[str, dict[str, np.ndarray]]
    scorers: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("scores: no variant given")
        shape = (len(self.prompts), len(self.seeds[0]) if self.seeds else 0)
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError("evaluation grid: no prompt or no seed; evaluate on at least one prompt and seed")
        if len(self.seeds) != shape[0] or any(len(row) != shape[1] for row in self.seeds):
            raise ValueError("evaluation grid: every prompt needs the same number of seeds")
        aspects = None
        for variant, by_aspect in self.scores.items():
            if aspects is None:
                aspects = set(by_aspect)
            if set(by_aspect) != aspects:
                raise ValueError(f"variant {variant!r}: aspects {sorted(by_aspect)} differ from {sorted(aspects)}; "
                                 "score every variant with the same scorers")
            for aspect, values in by_aspect.items():
                values = np.asarray(values, dtype=np.float64)
                if values.shape != shape:
                    raise ValueError(f"scores[{variant!r}][{aspect!r}]: shape {values.shape}, expected {shape} "
                                     "(prompts x seeds)")
                if not np.isfinite(values).all():
                    raise ValueError(f"scores[{variant!r}][{aspect!r}]: non-finite scores")
                by_aspect[aspect] = values

    @property
    def variants(self) -> list[str]:
        return list(self.scores)

    @property
    def aspects(self) -> list[str]:
        return list(next(iter(self.scores.values())))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.prompts), len(self.seeds[0])

    def subset(self, rows: Sequence[int]) -> ScoreGrid:
        """The grid of the prompts at ``rows`` (in that order)."""
        rows = list(rows)
        return ScoreGrid(prompts=[self.prompts[r] for r in rows], seeds=[list(self.seeds[r]) for r in rows],
                         scores={v: {a: values[rows] for a, values in by_aspect.items()}
                                 for v, by_aspect in self.scores.items()},
                         scorers=dict(self.scorers))

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": list(self.prompts), "seeds": [list(map(int, row)) for row in self.seeds],
                "scores": {v: {a: values.tolist() for a, values in by_aspect.items()}
                           for v, by_aspect in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], scorers: Mapping[str, Any] | None = None) -> ScoreGrid:
        return cls(prompts=list(data["prompts"]), seeds=[list(row) for row in data["seeds"]],
                   scores={v: {a: np.asarray(values) for a, values in by_aspect.items()}
                           for v, by_aspect in data["scores"].items()},
                   scorers={a: dict(r) for a, r in (scorers or {}).items()})


def validation_prompts(prompts: Sequence[str], fraction: float) -> list[str]:
    """The ``round(fraction * len(prompts))`` prompts (at least one when ``fraction`` > 0) set aside
    to choose settings on (module docstring): those with the smallest sha256 of their text, in the
    given order. At least one prompt stays for testing."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction {fraction}: must be in [0, 1) (0.25 sets a quarter aside)")
    count = min(max(1, round(fraction * len(prompts))) if fraction > 0 else 0, len(prompts) - 1)
    if count <= 0:
        return []
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())
    chosen = set(ranked[:count])
    return [p for p in prompts if p in chosen]


def grid_from_tables(tables: Mapping[str, Any]) -> ScoreGrid:
    """A ``ScoreGrid`` from one ``rewards.score_table.ScoreTable`` per variant (same order as given).

    Images pair up by (prompt text, seed); every variant must hold exactly the same pairs, and
    every prompt the same number of seeds.
    """
    if not tables:
        raise ValueError("tables: no variant given")
    keys_of: dict[str, dict[tuple[str, int], int]] = {}
    for variant, table in tables.items():
        keys: dict[tuple[str, int], int] = {}
        for row, (prompt, seed) in enumerate(zip(table.prompts, table.seeds)):
            if seed is None:
                raise ValueError(f"variant {variant!r}: image {row} has no seed; evaluation pairs images by "
                                 "(prompt, seed), so generate with recorded seeds")
            if (prompt, seed) in keys:
                raise ValueError(f"variant {variant!r}: prompt {prompt!r} with seed {seed} appears twice")
            keys[(prompt, int(seed))] = row
        keys_of[variant] = keys
    first_variant, first = next(iter(keys_of.items()))
    for variant, keys in keys_of.items():
        if set(keys) != set(first):
            missing = sorted(set(first) - set(keys))[:3]
            extra = sorted(set(keys) - set(first))[:3]
            raise ValueError(
                f"variant {variant!r} was not evaluated on the same (prompt, seed) pairs as {first_variant!r} "
                f"(missing {missing}, extra {extra}); sample every variant on the same prompts and seeds"
            )
    prompts: list[str] = []
    seeds_of: dict[str, list[int]] = {}
    for prompt, seed in first:  # insertion order = the first table's row order
        if prompt not in seeds_of:
            prompts.append(prompt)
            seeds_of[prompt] = []
        seeds_of[prompt].append(seed)
    seeds = [sorted(seeds_of[p]) for p in prompts]
    if len({len(s) for s in seeds}) != 1:
        counts = {p: len(s) for p, s in zip(prompts, seeds)}
        raise ValueError(f"every prompt needs the same number of seeds; got {counts}")
    aspects = list(next(iter(tables.values())).aspects)
    scores: dict[str, dict[str, np.ndarray]] = {}
    scorers: dict[str, dict[str, str]] = {}
    for variant, table in tables.items():
        if list(table.aspects) != aspects and set(table.aspects) != set(aspects):
            raise ValueError(f"variant {variant!r}: aspects {table.aspects} differ from {aspects}")
        rows = np.array([[keys_of[variant][(p, s)] for s in row_seeds] for p, row_seeds in zip(prompts, seeds)])
        scores[variant] = {a: np.asarray(table.scores[a], dtype=np.float64)[rows] for a in aspects}
        for aspect in aspects:
            record = dict(table.scorers[aspect])
            if aspect in scorers and scorers[aspect] != record:
                raise ValueError(f"aspect {aspect!r}: variants were scored with different scorers "
                                 f"({scorers[aspect]} vs {record}); score every variant with the same model")
            scorers[aspect] = record
    return ScoreGrid(prompts=prompts, seeds=seeds, scores=scores, scorers=scorers)


# -- statistics -----------------------------------------------------------------------------------

def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: a confidence level between 0 and 1, e.g. 0.95")


def resample_indices(shape: tuple[int, int], *, resamples: int, seed: int, unit: str = "pairs") -> np.ndarray:
    """[resamples, P*S] flat indices into a [P, S] grid, drawn with replacement.

    ``pairs``: P*S pairs drawn independently. ``prompts``: P prompts drawn, each bringing all its
    S seeds (a cluster bootstrap).
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: use one of {', '.join(UNITS)}")
    if resamples < 1:
        raise ValueError(f"resamples={resamples!r}: must be >= 1")
    prompts, seeds = shape
    rng = np.random.default_rng(seed)
    if unit == "pairs":
        return rng.integers(0, prompts * seeds, size=(resamples, prompts * seeds))
    chosen = rng.integers(0, prompts, size=(resamples, prompts))
    return (chosen[:, :, None] * seeds + np.arange(seeds)[None, None, :]).reshape(resamples, prompts * seeds)


def bootstrap_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of ``values`` (flattened) for each row of ``indices``: [resamples]."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    out = np.empty(indices.shape[0])
    for start in range(0, indices.shape[0], _BLOCK):
        block = indices[start:start + _BLOCK]
        out[start:start + len(block)] = flat[block].mean(axis=1)
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap samples (percentile method)."""
    _check_level(level)
    tail = (1 - level) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def win_indicators(variant: np.ndarray, base: np.ndarray, *, tie_tolerance: float = 0.0) -> np.ndarray:
    """Per pair: 1 where the variant scores higher, 0 where lower, 0.5 for a tie (|difference| <=
    ``tie_tolerance``)."""
    diff = np.asarray(variant, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return np.where(np.abs(diff) <= tie_tolerance, 0.5, np.where(diff > 0, 1.0, 0.0))


def win_rate(variant: np.ndarray, base: np.ndarray, *, tie_tolerance: float = 0.0) -> float:
    """Share of pairs the variant wins; ties count one half."""
    return float(win_indicators(variant, base, tie_tolerance=tie_tolerance).mean())


@dataclass(frozen=True)
class PairedComparison:
    """A variant against the base on one aspect."""

    diff: float
    diff_ci: tuple[float, float]
    win_rate: float
    win_rate_ci: tuple[float, float]

    @property
    def significant(self) -> bool:
        """The CI of the difference excludes zero."""
        return self.diff_ci[0] > 0 or self.diff_ci[1] < 0


def compare_paired(variant: np.ndarray, base: np.ndarray, indices: np.ndarray, *, level: float = 0.95,
                   tie_tolerance: float = 0.0) -> PairedComparison:
    """Mean paired difference and win rate with bootstrap CIs over the given resample ``indices``."""
    variant = np.asarray(variant, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    if variant.shape != base.shape:
        raise ValueError(f"variant and base scores differ in shape: {variant.shape} vs {base.shape}")
    diff = variant - base
    wins = win_indicators(variant, base, tie_tolerance=tie_tolerance)
    return PairedComparison(
        diff=float(diff.mean()),
        diff_ci=percentile_interval(bootstrap_means(diff, indices), level),
        win_rate=float(wins.mean()),
        win_rate_ci=percentile_interval(bootstrap_means(wins, indices), level),
    )


@dataclass(frozen=True)
class SeedSpread:
    """How much the base's mean reward moves from re-rolling seeds (module docstring).

    ``per_image_sd``: the pooled standard deviation of one image's reward across seeds of the
    same prompt. ``mean_sd``: the standard deviation of the change of the whole-grid mean between
    two runs with fresh seeds. ``threshold``: the ``level`` quantile of that change's absolute
    value; effects beyond it are beyond the seed-to-seed spread."""

    per_image_sd: float
    mean_sd: float
    threshold: float

    def exceeded_by(self, diff: float) -> bool:
        return abs(diff) > self.threshold


def seed_spread(base: np.ndarray, *, splits: int = DEFAULT_SPLITS, seed: int = 0, level: float = 0.95) -> SeedSpread:
    """The seed-to-seed spread of a [P, S] score grid (S >= 2 seeds per prompt)."""
    _check_level(level)
    base = np.asarray(base, dtype=np.float64)
    if base.ndim != 2:
        raise ValueError(f"base scores: expected a [prompts, seeds] grid, got shape {base.shape}")
    prompts, seeds = base.shape
    if seeds < 2:
        raise ValueError("seed-to-seed spread: needs at least 2 seeds per prompt (4 or more for a useful estimate)")
    centred = base - base.mean(axis=1, keepdims=True)
    per_image_sd = float(math.sqrt((centred**2).sum() / (prompts * (seeds - 1))))
    half = seeds // 2
    rng = np.random.default_rng(seed)
    # Independent random splits per prompt: argsort of uniform noise is a random permutation per row.
    order = np.argsort(rng.random((splits, prompts, seeds)), axis=2)
    first = np.take_along_axis(np.broadcast_to(base, (splits, prompts, seeds)), order[:, :, :half], axis=2)
    second = np.take_along_axis(np.broadcast_to(base, (splits, prompts, seeds)), order[:, :, half:2 * half], axis=2)
    changes = (first.mean(axis=(1, 2)) - second.mean(axis=(1, 2))) * math.sqrt(half / seeds)
    return SeedSpread(per_image_sd=per_image_sd, mean_sd=float(np.sqrt(np.mean(changes**2))),
                      threshold=float(np.quantile(np.abs(changes), level)))


# -- diversity ------------------------------------------------------------------------------------

def _as_array(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    return np.asarray(images, dtype=np.float64)


def mean_pairwise_rms(group: Any) -> float:
    """Mean over pairs i < j of the RMS difference between images i and j of one prompt
    ([S, ...] float, pixels in 0..1)."""
    flat = _as_array(group).reshape(len(group), -1)
    if flat.shape[0] < 2:
        raise ValueError("diversity: needs at least 2 images per prompt")
    squares = (flat**2).sum(axis=1)
    gram = flat @ flat.T
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * gram, 0.0) / flat.shape[1]
    upper = np.triu_indices(flat.shape[0], k=1)
    return float(np.sqrt(distances[upper]).mean())


def mean_pairwise_cosine_distance(features: Any) -> float:
    """Mean over pairs i < j of 1 - cos(f_i, f_j) for one prompt's embeddings [S, D]."""
    flat = _as_array(features).reshape(len(features), -1)
    if flat.shape[0] < 2:
        raise ValueError("diversity: needs at least 2 images per prompt")
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.maximum(norms, 1e-12)
    upper = np.triu_indices(flat.shape[0], k=1)
    return float((1.0 - (unit @ unit.T)[upper]).mean())


def diversity(images_by_prompt: Sequence[Any], *, embed: Callable[[Any], Any] | None = None) -> dict[str, float | None]:
    """``{"pixel": ..., "embedding": ... or None}`` averaged over prompts; ``images_by_prompt[p]`` is
    prompt p's images across seeds ([S,H,W,3] in 0..1, tensor or array). ``embed(images)`` returns
    one feature vector per image (e.g. a CLIP image embedding)."""
    if not images_by_prompt:
        raise ValueError("diversity: no images given")
    pixel = float(np.mean([mean_pairwise_rms(group) for group in images_by_prompt]))
    embedding = None
    if embed is not None:
        embedding = float(np.mean([mean_pairwise_cosine_distance(_as_array(embed(group)))
                                   for group in images_by_prompt]))
    return {"pixel": pixel, "embedding": embedding}


# -- one number for all aspects, shares of own gain ------------------------------------------------

def aspect_scales(base: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per aspect, the base's per-image seed-to-seed standard deviation (pooled within prompts of a
    ``[P, S]`` grid): the unit of the normalised score (module docstring)."""
    scales = {}
    for aspect, values in base.items():
        values = np.asarray(values, dtype=np.float64)
        prompts, seeds = values.shape
        if seeds < 2:
            raise ValueError("normalised score: needs at least 2 seeds per prompt to measure each aspect's spread")
        centred = values - values.mean(axis=1, keepdims=True)
        sd = math.sqrt((centred**2).sum() / (prompts * (seeds - 1)))
        scales[aspect] = sd if sd > 0 else 1.0  # a constant reward: changes count in its own units
    return scales


def normalised_scores(by_aspect: Mapping[str, np.ndarray], scales: Mapping[str, float]) -> np.ndarray:
    """Per pair, the mean over aspects of the reward in units of the aspect's scale ``[P, S]``;
    the difference of two variants' arrays is their normalised change."""
    return np.mean([np.asarray(by_aspect[a], dtype=np.float64) / scales[a] for a in scales], axis=0)


def normalised_change(base: ScoreGrid, other: ScoreGrid, scales: Mapping[str, float], *, base_variant: str = "base",
                      variant: str | None = None) -> float:
    """The mean normalised change of ``other`` (its only variant, or ``variant``) against the base on
    the prompts ``other`` holds (a subset of ``base``'s, on the same seeds): a validation score."""
    variant = variant or next(iter(other.scores))
    rows = []
    for prompt, seeds in zip(other.prompts, other.seeds):
        if prompt not in base.prompts:
            raise ValueError(f"prompt {prompt!r} was not sampled by {base_variant!r}")
        row = base.prompts.index(prompt)
        if sorted(base.seeds[row]) != sorted(seeds):
            raise ValueError(f"prompt {prompt!r}: seeds {seeds} differ from {base_variant!r}'s {base.seeds[row]}")
        rows.append(row)
    reference = base.subset(rows)
    return float(np.mean(normalised_scores(other.scores[variant], scales)
                         - normalised_scores(reference.scores[base_variant], scales)))


def share_of_gain(mixed_diff: np.ndarray, own_diff: np.ndarray, indices: np.ndarray, *,
                  level: float = 0.95) -> dict[str, Any]:
    """The mixed variant's mean change over the own LoRA's mean change, with a percentile bootstrap
    CI of the ratio over the paired resamples ``indices``."""
    own = float(np.mean(own_diff))
    mixed = float(np.mean(mixed_diff))
    ratios = bootstrap_means(mixed_diff, indices) / bootstrap_means(own_diff, indices)
    ratios = ratios[np.isfinite(ratios)]
    low, high = percentile_interval(ratios, level) if ratios.size else (math.nan, math.nan)
    return {"share": mixed / own if own != 0 else None, "share_ci": [low, high] if ratios.size else None,
            "gain": mixed, "own_gain": own}


class RowsView(Sequence):
    """Rows ``rows`` of a per-prompt sequence, read on access (lazy image groups stay lazy)."""

    def __init__(self, groups: Sequence[Any], rows: Sequence[int]):
        self.groups, self.rows = groups, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.groups[self.rows[index]]


# -- the whole evaluation ------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Every number of an evaluation; ``to_dict`` / ``from_dict`` round-trip through JSON.

    ``grid`` holds the test prompts (every per-aspect figure is computed on it), ``validation``
    the prompts set aside to choose settings on (None without a split)."""

    base: str
    grid: ScoreGrid
    settings: dict[str, Any]
    results: dict[str, dict[str, dict[str, Any]]]
    seed_spread: dict[str, SeedSpread]
    diversity: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # Head-to-head comparisons other than against the base, e.g. the gated mixture against each merge
    # baseline: {"gated vs merge": {"variant", "reference", "results": {aspect: {diff, diff_ci, win_rate, ...}},
    #                               "normalised": {diff, diff_ci, ...}}}
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: ScoreGrid | None = None
    scales: dict[str, float] = field(default_factory=dict)  # aspect -> unit of the normalised score
    # variant -> {"test": {diff, diff_ci, win_rate, ...} vs the base, "validation": mean change or None}
    normalised: dict[str, dict[str, Any]] = field(default_factory=dict)
    # aspect -> mixed variant -> {share, share_ci, gain, own_gain, own}
    share_of_own_gain: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    best_baseline: str | None = None  # the merge baseline with the best validation score

    @property
    def variants(self) -> list[str]:
        return self.grid.variants

    @property
    def aspects(self) -> list[str]:
        return self.grid.aspects

    def result(self, variant: str, aspect: str) -> dict[str, Any]:
        try:
            return self.results[variant][aspect]
        except KeyError:
            raise KeyError(f"no result for variant {variant!r}, aspect {aspect!r}; variants: {self.variants}, "
                           f"aspects: {self.aspects}") from None

    def beyond_seed_spread(self, variant: str, aspect: str) -> bool:
        """The variant's mean change on ``aspect`` is larger than re-rolling seeds alone produces
        (module docstring), in either direction: check the sign of ``diff`` too."""
        return bool(self.result(variant, aspect)["beyond_seed_spread"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "base": self.base,
            "variants": self.variants,
            "aspects": self.aspects,
            "prompts": list(self.grid.prompts),
            "seeds": [list(map(int, row)) for row in self.grid.seeds],
            "pairs": self.grid.shape[0] * self.grid.shape[1],
            "settings": dict(self.settings),
            "scorers": {a: dict(r) for a, r in self.grid.scorers.items()},
            "results": self.results,
            "seed_spread": {a: {"per_image_sd": s.per_image_sd, "mean_sd": s.mean_sd, "threshold": s.threshold}
                            for a, s in self.seed_spread.items()},
            "diversity": self.diversity,
            "comparisons": self.comparisons,
            "scales": dict(self.scales),
            "normalised": self.normalised,
            "share_of_own_gain": self.share_of_own_gain,
            "best_baseline": self.best_baseline,
            "scores": self.grid.to_dict()["scores"],
            "validation": None if self.validation is None else self.validation.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not an evaluation (format {data.get('format')!r}, expected {FORMAT_NAME!r})")
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"evaluation format version {data.get('version')!r} is not supported "
                             f"(this version reads {', '.join(map(str, READABLE_VERSIONS))})")
        scorers = data.get("scorers", {})
        grid = ScoreGrid.from_dict(data, scorers)
        validation = data.get("validation")
        spread = {a: SeedSpread(**s) for a, s in data["seed_spread"].items()}
        return cls(base=data["base"], grid=grid, settings=dict(data["settings"]), results=data["results"],
                   seed_spread=spread, diversity=data.get("diversity", {}),
                   comparisons=data.get("comparisons", {}),
                   validation=None if not validation else ScoreGrid.from_dict(validation, scorers),
                   scales=dict(data.get("scales", {})), normalised=data.get("normalised", {}),
                   share_of_own_gain=data.get("share_of_own_gain", {}), best_baseline=data.get("best_baseline"))


def _comparison(variant: np.ndarray, reference: np.ndarray, indices: np.ndarray, level: float,
                tie_tolerance: float) -> dict[str, Any]:
    comparison = compare_paired(variant, reference, indices, level=level, tie_tolerance=tie_tolerance)
    return {"diff": comparison.diff, "diff_ci": list(comparison.diff_ci), "win_rate": comparison.win_rate,
            "win_rate_ci": list(comparison.win_rate_ci), "significant": comparison.significant}


def evaluate(
    grid: ScoreGrid,
    *,
    base: str = "base",
    images: Mapping[str, Sequence[Any]] | None = None,
    embed: Callable[[Any], Any] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    splits: int = DEFAULT_SPLITS,
    seed: int = 0,
    level: float = 0.95,
    unit: str = "pairs",
    tie_tolerance: float = 0.0,
    head_to_head: Sequence[tuple[str, str]] = (),
    validation: Sequence[str] = (),
    own_lora: Mapping[str, str] | None = None,
    mixtures: Sequence[str] = (),
    baselines: Sequence[str] = (),
) -> Evaluation:
    """All statistics of the module docstring for every variant and aspect.

    ``images[variant][p]``: prompt p's images across its seeds ([S,H,W,3], seed order of the grid),
    for the diversity figure (optional; ``embed`` adds an embedding distance).
    ``head_to_head``: extra ``(variant, reference)`` pairs compared like a variant against the base
    (same resamples), e.g. ``("gated", "merge")``.
    ``validation``: the prompts set aside to choose settings (``validation_prompts``); every figure
    but the validation scores is computed on the other prompts.
    ``own_lora`` (aspect -> the variant of that aspect's own LoRA) and ``mixtures`` (the mixed
    variants): each mixture's share of each own LoRA's gain. ``baselines``: the merge baselines, of
    which the one with the best validation score is ``best_baseline`` (the best test score when
    there is no validation split).
    """
    _check_level(level)
    if base not in grid.scores:
        raise ValueError(f"base={base!r} is not among the variants ({', '.join(grid.variants)})")
    if grid.shape[1] < 2:
        raise ValueError("evaluation: needs at least 2 seeds per prompt (the seed-to-seed spread is measured "
                         "from them); use 8 or more for CIs narrower than most effects")
    for name in (*mixtures, *baselines, *(own_lora or {}).values()):
        if name not in grid.scores:
            raise ValueError(f"variant {name!r} is not among the variants ({', '.join(grid.variants)})")
    scales = aspect_scales(grid.scores[base])
    held = set(validation)
    unknown = sorted(held - set(grid.prompts))
    if unknown:
        raise ValueError(f"validation prompts {unknown[:3]} are not on the evaluation grid")
    validation_grid = None
    if held:
        test_rows = [row for row, prompt in enumerate(grid.prompts) if prompt not in held]
        if not test_rows:
            raise ValueError("validation: every prompt is a validation prompt; keep some for testing")
        validation_grid = grid.subset([row for row, prompt in enumerate(grid.prompts) if prompt in held])
        for variant, groups in (images or {}).items():
            if len(groups) != grid.shape[0]:
                raise ValueError(f"images[{variant!r}]: {len(groups)} prompt groups for {grid.shape[0]} prompts")
        images = {variant: RowsView(groups, test_rows) for variant, groups in (images or {}).items()}
        grid = grid.subset(test_rows)
    indices = resample_indices(grid.shape, resamples=resamples, seed=seed, unit=unit)
    spread = {aspect: seed_spread(grid.scores[base][aspect], splits=splits, seed=seed, level=level)
              for aspect in grid.aspects}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, by_aspect in grid.scores.items():
        results[variant] = {}
        for aspect, values in by_aspect.items():
            entry: dict[str, Any] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                "mean_ci": list(percentile_interval(bootstrap_means(values, indices), level)),
                "diff": None, "diff_ci": None, "win_rate": None, "win_rate_ci": None,
                "significant": None, "beyond_seed_spread": None,
            }
            if variant != base:
                entry.update(_comparison(values, grid.scores[base][aspect], indices, level, tie_tolerance))
                entry["beyond_seed_spread"] = spread[aspect].exceeded_by(entry["diff"])
            results[variant][aspect] = entry
    normalised_of = {v: normalised_scores(by_aspect, scales) for v, by_aspect in grid.scores.items()}
    validation_of = ({v: normalised_scores(by_aspect, scales) for v, by_aspect in validation_grid.scores.items()}
                     if validation_grid is not None else {})
    normalised = {}
    for variant in grid.variants:
        if variant == base:
            continue
        normalised[variant] = {
            "test": _comparison(normalised_of[variant], normalised_of[base], indices, level, tie_tolerance),
            "validation": (float(np.mean(validation_of[variant] - validation_of[base])) if validation_of else None),
        }
    comparisons: dict[str, dict[str, Any]] = {}
    for variant, reference in head_to_head:
        for name in (variant, reference):
            if name not in grid.scores:
                raise ValueError(f"head_to_head: {name!r} is not among the variants ({', '.join(grid.variants)})")
        by_aspect = {aspect: _comparison(grid.scores[variant][aspect], grid.scores[reference][aspect], indices,
                                         level, tie_tolerance) for aspect in grid.aspects}
        comparisons[f"{variant} vs {reference}"] = {
            "variant": variant, "reference": reference, "results": by_aspect,
            NORMALISED: _comparison(normalised_of[variant], normalised_of[reference], indices, level, tie_tolerance)}
    shares: dict[str, dict[str, dict[str, Any]]] = {}
    for aspect, own in (own_lora or {}).items():
        own_diff = grid.scores[own][aspect] - grid.scores[base][aspect]
        shares[aspect] = {}
        for mixed in mixtures:
            mixed_diff = grid.scores[mixed][aspect] - grid.scores[base][aspect]
            shares[aspect][mixed] = {**share_of_gain(mixed_diff, own_diff, indices, level=level), "own": own}
    best = None
    if baselines:
        key = "validation" if validation_of else None
        best = max(baselines, key=lambda v: normalised[v][key] if key else normalised[v]["test"]["diff"])
    figures: dict[str, dict[str, float | None]] = {}
    for variant, groups in (images or {}).items():
        if variant not in grid.scores:
            raise ValueError(f"images given for unknown variant {variant!r}")
        if len(groups) != grid.shape[0]:
            raise ValueError(f"images[{variant!r}]: {len(groups)} prompt groups for {grid.shape[0]} prompts")
        figures[variant] = diversity(groups, embed=embed)
    settings = {"resamples": resamples, "splits": splits, "seed": seed, "level": level, "unit": unit,
                "tie_tolerance": tie_tolerance, "ci_method": "percentile bootstrap",
                "normalised_score": "mean over aspects of the change in units of the base's per-image seed sd",
                "validation_prompts": len(held)}
    return Evaluation(base=base, grid=grid, settings=settings, results=results, seed_spread=spread,
                      diversity=figures, comparisons=comparisons, validation=validation_grid, scales=scales,
                      normalised=normalised, share_of_own_gain=shares, best_baseline=best)
