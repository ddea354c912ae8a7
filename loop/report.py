"""The evaluation report: a folder with an HTML page, PNG plots, sample grids and a JSON of every number.

Input: an *evaluation folder*, one sub-folder per variant, each sampled on the same prompts x
seeds and scored with the same scorers::

    <eval>/variants.json           optional: {"base": "base",
                                              "variants": [{"name": "lora:alignment", "dir": "lora_alignment",
                                                            "kind": "lora", "aspect": "alignment", ...}, ...],
                                              "config": {"prompt_sets": {"held_out": [...], "train": [...]},
                                                         ... anything worth recording ...}}
    <eval>/<dir>/candidates.jsonl  + images   written by ``generate_candidates`` / ``versat2i generate``
    <eval>/<dir>/scores.jsonl      the ScoreTable of those images (``versat2i score --out`` /
                                   ``ScoreTable.save``); ``scores.json`` works too

Without variants.json every sub-folder with a scores file is a variant named after its folder, the
base is the folder ``base``. Variant kinds (for labels, the "own aspect" highlight and which
comparisons are made): ``base``, ``lora`` (with its ``aspect``; a name ``lora:<aspect>`` says the
same), the merge baselines (``MERGE_KINDS``: ``merge`` at 1/N, ``sum`` at full weight, ``uniform``
at the weight chosen on the validation prompts, peft's ``ties``, ``dare_linear``, ``dare_ties``) and
``gated`` (``gated:<name>`` for several gates). ``variants.json``'s config may list
``validation_prompts``: the prompts set aside to choose settings on (``evaluate.validation_prompts``).

Prompt sets: a loop evaluates its held-out prompts (never trained on) and, with
``include_train_prompts``, its own training prompts with new seeds. ``variants.json`` names them
(``prompt_sets``); the report then evaluates each set on its own (same statistics, same settings),
leads with the held-out prompts and shows the training prompts apart, labelled. Without
``prompt_sets`` every prompt of the folder is one set.

Output (``write_report``, written under a temporary name and renamed when complete)::

    <out>/report.json       format "versat2i-report": the evaluation of all prompts together (every
                            number, scores, seeds, scorer ids, bootstrap settings), each prompt set's
                            evaluation ("prompt_sets", headline first), the config, the variants, the files
    <out>/report.html       self-contained page (inline CSS) linking the PNGs below
    <out>/plots/differences.png     paired change vs base with its CI per prompt set, seed-spread band (summary)
    <out>/plots/distributions.png   per-aspect reward distributions per variant (headline set)
    <out>/plots/win_rates.png       win rate vs base, variants x aspects (headline set)
    <out>/plots/diversity.png       within-prompt diversity per variant (when images were given)
    <out>/grids/compare_<set>.png   base and every variant side by side, one row per (prompt, seed)
    <out>/grids/<variant>.png       sample grid: rows = prompts, columns = seeds

``markdown_table(report)`` gives the README table.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ..image_files import load_image_file
from ..rewards.score_table import ScoreTable
from ..safe_io import atomic_dir, atomic_write_text
from .evaluate import Evaluation, RowsView, ScoreGrid, evaluate, grid_from_tables
from .generate import read_candidates

logger = logging.getLogger(__name__)

FORMAT_NAME = "versat2i-report"
FORMAT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
VARIANTS_FILE = "variants.json"
SCORES_FILES = ("scores.jsonl", "scores.json")
SUMMARY_PLOT = "differences"
MERGE_KINDS = ("merge", "sum", "uniform", "ties", "dare_linear", "dare_ties")
VARIANT_KINDS = ("base", "lora", *MERGE_KINDS, "gated")
GRID_CELL_MIN = 96  # px: tiny images (the demo world's 32 px) are upscaled for the grids
COMPARE_CELL_MIN = 128  # px: the side-by-side grids, made to be compared by eye
COMPARE_ROWS = 8  # (prompt, seed) rows of each side-by-side grid
GRID_FONT_SIZE = 15
PLOT_WIDTH_INCHES = 11.0  # at 100 dpi: 1100 px, about the page's width, so fonts print at their size
# The prompt sets a loop evaluates (variants.json "prompt_sets"), in report order: (title, what they are).
PROMPT_SETS = {
    "held_out": ("Held-out prompts", "prompts the loop never trained on"),
    "train": ("Training prompts", "the loop's own prompts, sampled with seeds it never trained on"),
}
ALL_PROMPTS = ("Evaluation prompts", "every prompt of the evaluation folder")


# -- evaluation folders --------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    dir: str | None = None
    kind: str = "other"          # base | lora | one of MERGE_KINDS | gated | other
    aspect: str | None = None    # the aspect a single-aspect LoRA was trained for
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dir": self.dir, "kind": self.kind, "aspect": self.aspect,
                "label": self.label or self.name, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        known = {"name", "dir", "kind", "aspect", "label"}
        variant = cls(name=str(data["name"]), dir=data.get("dir"), kind=data.get("kind") or "other",
                      aspect=data.get("aspect"), label=data.get("label"),
                      extra={k: v for k, v in data.items() if k not in known})
        return variant.with_defaults()

    def with_defaults(self) -> Variant:
        """Kind and aspect from the conventional names: 'base', 'lora:<aspect>', a merge kind, 'gated[:<name>]'."""
        if self.kind == "other":
            head, _, tail = self.name.partition(":")
            if self.name == "base":
                self.kind = "base"
            elif head in VARIANT_KINDS:
                self.kind = head
                if head == "lora" and tail and self.aspect is None:
                    self.aspect = tail
        return self


@dataclass
class EvalFolder:
    """What ``load_eval_dir`` read: per variant its score table and image files on the grid."""

    path: Path
    base: str
    variants: dict[str, Variant]
    tables: dict[str, Any]                                  # variant -> ScoreTable
    image_files: dict[str, dict[tuple[str, int], Path]]     # variant -> (prompt, seed) -> image file
    config: dict[str, Any] = field(default_factory=dict)


def write_variants_file(eval_dir: str | os.PathLike, variants: Sequence[Variant | Mapping[str, Any]], *,
                        base: str = "base", config: Mapping[str, Any] | None = None,
                        overwrite: bool = True) -> Path:
    """Write ``<eval_dir>/variants.json`` (atomically): the variants in report order, which one is
    the base, and a free-form config recorded in the report."""

    entries = [(v if isinstance(v, Variant) else Variant.from_dict(v)).to_dict() for v in variants]
    names = [entry["name"] for entry in entries]
    if base not in names:
        raise ValueError(f"base={base!r} is not among the variants {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    text = json.dumps({"base": base, "variants": entries, "config": dict(config or {})}, indent=1,
                      ensure_ascii=False, default=str)
    return atomic_write_text(Path(eval_dir) / VARIANTS_FILE, text, overwrite=overwrite, what="variants file")


def _scores_file(folder: Path) -> Path | None:
    for name in SCORES_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def load_eval_dir(path: str | os.PathLike) -> EvalFolder:
    """Read an evaluation folder (layout in the module docstring)."""

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation folder {str(path)!r} not found")
    config: dict[str, Any] = {}
    listing = path / VARIANTS_FILE
    if listing.is_file():
        try:
            data = json.loads(listing.read_text(encoding="utf-8"))
            variants = [Variant.from_dict(v) for v in data["variants"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{listing}: not a variants list ({exc}); expected "
                             '{"base": "base", "variants": [{"name": ..., "dir": ...}, ...]}') from None
        base = data.get("base", "base")
        config = dict(data.get("config") or {})
    else:
        folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and _scores_file(p))
        variants = [Variant(name=p.name, dir=p.name).with_defaults() for p in folders]
        variants.sort(key=lambda v: (v.name != "base", v.name))
        base = "base"
    if not variants:
        raise ValueError(f"evaluation folder {str(path)!r} holds no variant: expected sub-folders with "
                         f"{' or '.join(SCORES_FILES)} (or a {VARIANTS_FILE})")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"{listing}: variant names repeat: {names}")
    if base not in names:
        raise ValueError(f"evaluation folder {str(path)!r}: no base variant {base!r} among {names}")
    tables, image_files = {}, {}
    for variant in variants:
        folder = path / (variant.dir or variant.name)
        scores = _scores_file(folder)
        if scores is None:
            raise FileNotFoundError(f"variant {variant.name!r}: no {' or '.join(SCORES_FILES)} in {folder}; "
                                    "score its images first (`versat2i score DIR --out DIR/scores.jsonl`)")
        table = ScoreTable.load(scores)
        tables[variant.name] = table
        files: dict[tuple[str, int], Path] = {}
        try:
            records, _summary = read_candidates(folder)
            for record in records:
                if record.file:
                    files[(record.prompt, record.seed)] = folder / record.file
        except FileNotFoundError:  # no candidates.jsonl: the score table's image ids are file names
            for prompt, seed, image_id in zip(table.prompts, table.seeds, table.image_ids):
                if image_id and seed is not None and (folder / image_id).is_file():
                    files[(prompt, int(seed))] = folder / image_id
        image_files[variant.name] = files
    return EvalFolder(path=path, base=base, variants={v.name: v for v in variants}, tables=tables,
                      image_files=image_files, config=config)


def load_image(path: Path) -> np.ndarray:
    """[H,W,3] float32 in 0..1."""

    return load_image_file(path).astype(np.float32) / 255.0


def grid_images(folder: EvalFolder, evaluation_grid, variant: str) -> list[list[Path]] | None:
    """Image files of ``variant`` on the grid ([prompt][seed]), or None when any is missing."""
    files = folder.image_files.get(variant, {})
    rows = []
    for prompt, seeds in zip(evaluation_grid.prompts, evaluation_grid.seeds):
        row = [files.get((prompt, seed)) for seed in seeds]
        if any(p is None or not p.is_file() for p in row):
            return None
        rows.append(row)
    return rows


def evaluate_eval_dir(path: str | os.PathLike, *, embed=None, **options) -> tuple[Evaluation, EvalFolder,
                                                                                   dict[str, list[list[Path]]]]:
    """Evaluate an evaluation folder: ``(evaluation, folder, image files per variant on
    ``evaluation.grid``, the test prompts)``.
    ``options`` go to ``evaluate.evaluate`` (resamples, seed, level, unit, ...)."""
    folder = load_eval_dir(path)
    grid = grid_from_tables(folder.tables)
    files = {}
    for variant in grid.variants:
        rows = grid_images(folder, grid, variant)
        if rows is None:
            logger.warning("variant %s: some images are missing; no diversity figure or sample grid for it", variant)
        else:
            files[variant] = rows
    # Diversity reads every image once per variant (only one variant's images in memory at a time).
    images = {variant: _LazyGroups(rows) for variant, rows in files.items()}
    base = options.pop("base", None) or folder.base
    options = {**variant_roles(folder.variants), **options}
    options.setdefault("validation", [p for p in folder.config.get("validation_prompts") or () if p in grid.prompts])
    evaluation = evaluate(grid, base=base, images=images, embed=embed, **options)
    # evaluation.grid holds the test prompts only (the validation prompts are set aside), and every
    # reader of these files indexes them by its rows (sample grids, prompt sets): they follow it. Indexed
    # by the whole grid instead, a row past the first validation prompt showed another prompt's images.
    row_of = {prompt: row for row, prompt in enumerate(grid.prompts)}
    files = {variant: [rows[row_of[prompt]] for prompt in evaluation.grid.prompts] for variant, rows in files.items()}
    return evaluation, folder, files


def variant_roles(variants: Mapping[str, Variant]) -> dict[str, Any]:
    """What ``evaluate`` compares, from the variants' kinds: each gated mixture head to head against
    every merge baseline (VersaT2I's claim is that a learned gate mixes aspect LoRAs better than a
    merge), each mixture's share of each aspect LoRA's own gain, and the baselines among which the
    best (by validation score) is picked."""
    kinds: dict[str, list[str]] = {}
    own_lora: dict[str, str] = {}
    for name, variant in variants.items():
        variant = variant.with_defaults()
        kinds.setdefault(variant.kind, []).append(name)
        if variant.kind == "lora" and variant.aspect and variant.aspect not in own_lora:
            own_lora[variant.aspect] = name
    baselines = [name for kind in MERGE_KINDS for name in kinds.get(kind, [])]
    gated = kinds.get("gated", [])
    return {"head_to_head": [(g, b) for g in gated for b in baselines], "own_lora": own_lora,
            "mixtures": [*baselines, *gated], "baselines": baselines}


class _LazyGroups(Sequence):
    """Per-prompt image stacks read from files on access (keeps memory to one prompt)."""

    def __init__(self, rows: list[list[Path]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return np.stack([load_image(p) for p in self.rows[index]])


# -- prompt sets ---------------------------------------------------------------------------------

@dataclass
class View:
    """One prompt set of the report and its evaluation (``key``: "held_out", "train" or "all")."""

    key: str
    title: str
    about: str
    evaluation: Evaluation


def prompt_sets_of(config: Mapping[str, Any], prompts: Sequence[str]) -> dict[str, list[str]]:
    """{set: its prompts in grid order} from variants.json's config ``prompt_sets`` (the sets of
    ``PROMPT_SETS`` with a prompt on the grid); {} when the folder names none."""
    named = config.get("prompt_sets")
    if not isinstance(named, Mapping):
        return {}
    sets = {}
    for key in PROMPT_SETS:
        members = set(named.get(key) or ())
        chosen = [prompt for prompt in prompts if prompt in members]
        if chosen:
            sets[key] = chosen
    return sets


def subset_grid(grid: ScoreGrid, prompts: Sequence[str]) -> ScoreGrid:
    """The rows of ``grid`` for ``prompts`` (every variant, aspect and seed)."""
    rows = [grid.prompts.index(prompt) for prompt in prompts]
    return ScoreGrid(prompts=list(prompts), seeds=[list(grid.seeds[row]) for row in rows],
                     scores={variant: {aspect: values[rows] for aspect, values in by_aspect.items()}
                             for variant, by_aspect in grid.scores.items()},
                     scorers=dict(grid.scorers))


def evaluate_prompt_sets(evaluation: Evaluation, sets: Mapping[str, Sequence[str]], *,
                         images: Mapping[str, Sequence[Any]] | None = None, embed=None) -> dict[str, Evaluation]:
    """Each prompt set evaluated on its own: ``evaluate`` on its rows of the grid, with the whole
    evaluation's settings and head-to-head comparisons. ``images[variant][p]``: prompt p's images
    on the whole grid (for diversity)."""
    options = {key: evaluation.settings[key] for key in ("resamples", "splits", "seed", "level", "unit",
                                                         "tie_tolerance") if key in evaluation.settings}
    head_to_head = [(c["variant"], c["reference"]) for c in evaluation.comparisons.values()]
    results = {}
    for key, prompts in sets.items():
        rows = [evaluation.grid.prompts.index(prompt) for prompt in prompts]
        groups = {variant: RowsView(by_prompt, rows) for variant, by_prompt in (images or {}).items()}
        results[key] = evaluate(subset_grid(evaluation.grid, prompts), base=evaluation.base, images=groups,
                                embed=embed, head_to_head=head_to_head, **options)
    return results


def report_views(evaluation: Evaluation, prompt_sets: Mapping[str, Evaluation] | None) -> list[View]:
    """The report's views, headline first: each prompt set (held-out first), or all prompts as one."""
    if not prompt_sets:
        return [View("all", *ALL_PROMPTS, evaluation)]
    return [View(key, *PROMPT_SETS[key], prompt_sets[key]) for key in PROMPT_SETS if key in prompt_sets]


def covering_prompts(prompts: Sequence[str], count: int) -> list[str]:
    """Up to ``count`` prompts whose words are spread as evenly as possible: greedily the prompt
    whose words were used least so far (each word counts 1 / (1 + its uses); the first on ties).
    Grids then show every shape and colour, each about as often, rather than the first few prompts."""
    chosen: list[str] = []
    uses: dict[str, int] = {}
    remaining = list(prompts)
    while remaining and len(chosen) < count:
        # exact fractions: a float sum would depend on the (hash-randomised) order of the set's words
        best = max(remaining, key=lambda prompt: sum(Fraction(1, 1 + uses.get(w, 0)) for w in _content_words(prompt)))
        chosen.append(best)
        for word in _content_words(best):
            uses[word] = uses.get(word, 0) + 1
        remaining.remove(best)
    return [prompt for prompt in prompts if prompt in chosen]


def _content_words(prompt: str) -> set[str]:
    # Words of one or two letters ("a", "an", "on", "of") say nothing about what a prompt shows, and
    # "an" would make every prompt it goes with (an orange ...) look new.
    return {word for word in re.findall(r"[\w'-]+", prompt.lower()) if len(word) > 2}


# -- plots ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window (also on a desktop)
    import matplotlib.pyplot as plt

    return plt


def _label(variants: Mapping[str, Variant], name: str) -> str:
    variant = variants.get(name)
    return (variant.label if variant and variant.label else name)


def _aspect_axes(plt, count: int, row_height: float, extra_height: float = 0.0):
    """One panel per aspect, two per row: at the page's width (``PLOT_WIDTH_INCHES``) whatever the
    number of aspects, so tick labels print at their font size instead of shrinking with the figure."""
    columns = 2 if count > 1 else 1
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PLOT_WIDTH_INCHES, row_height * rows + extra_height),
                             squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _variant_ticks(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=9)


def plot_distributions(evaluation: Evaluation, path: Path, variants: Mapping[str, Variant], *, about: str = "") -> None:
    plt = _pyplot()
    names = evaluation.variants
    fig, axes = _aspect_axes(plt, len(evaluation.aspects), row_height=3.9, extra_height=0.6)
    rng = np.random.default_rng(0)
    for ax, aspect in zip(axes, evaluation.aspects):
        data = [evaluation.grid.scores[v][aspect].reshape(-1) for v in names]
        ax.boxplot(data, positions=range(len(names)), showfliers=False, widths=0.6)
        for i, values in enumerate(data):
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=6, alpha=0.35, color="tab:blue")
            ax.scatter([i], [values.mean()], marker="D", color="tab:red", s=24, zorder=3)
        ax.set_title(aspect)
        ax.set_ylabel("reward")
        _variant_ticks(ax, [_label(variants, v) for v in names])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Reward of every image{about}: box = quartiles, orange line = median, whiskers = 1.5 × IQR, "
                 "blue dots = images, red diamond = mean", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_differences(views: Sequence[View], path: Path, variants: Mapping[str, Variant]) -> None:
    """Per aspect, every variant's paired change vs the base with its CI, one marker per prompt set
    (filled: the headline set, hollow: the next); colour says where the CI lies; the larger marker
    is a LoRA on its own aspect; the grey band is the headline set's seed-to-seed spread."""
    plt = _pyplot()
    headline = views[0].evaluation
    others = [v for v in headline.variants if v != headline.base]
    fig, axes = _aspect_axes(plt, len(headline.aspects), row_height=3.6, extra_height=1.0)
    offsets = np.linspace(-0.16, 0.16, len(views)) if len(views) > 1 else [0.0]
    for ax, aspect in zip(axes, headline.aspects):
        threshold = headline.seed_spread[aspect].threshold
        ax.axhspan(-threshold, threshold, color="0.88", zorder=0)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        for number, (view, offset) in enumerate(zip(views, offsets)):
            for i, name in enumerate(others):
                result = view.evaluation.results[name][aspect]
                low, high = result["diff_ci"]
                colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
                own = variants.get(name) is not None and variants[name].aspect == aspect
                ax.errorbar([i + offset], [result["diff"]], yerr=[[result["diff"] - low], [high - result["diff"]]],
                            fmt="o", color=colour, markerfacecolor=colour if number == 0 else "white",
                            capsize=3, markersize=9 if own else 5, zorder=3)
        ax.set_title(aspect)
        ax.set_ylabel(f"change vs {_label(variants, headline.base)}")
        _variant_ticks(ax, [_label(variants, v) for v in others])
        ax.set_xlim(-0.6, len(others) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=_difference_legend(views), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"Paired change vs the base with its {headline.settings.get('level', 0.95):.0%} CI "
                 "(mean over the same prompts and seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.95 / fig.get_figheight(), 1, 1))  # the legend's 0.95 inch at the bottom
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _difference_legend(views: Sequence[View]) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def dot(colour, label, *, size=6, filled=True):
        return Line2D([], [], marker="o", linestyle="", color=colour, markersize=size,
                      markerfacecolor=colour if filled else "white", label=label)

    handles = [dot("tab:green", "CI above 0: better than the base"), dot("tab:red", "CI below 0: worse"),
               dot("tab:gray", "CI includes 0: no clear change"), dot("black", "larger dot: a LoRA on its own aspect",
                                                                       size=10),
               Patch(color="0.88", label=f"seed-to-seed spread of the base ({views[0].title.lower()})")]
    if len(views) > 1:
        handles += [dot("black", f"filled: {views[0].title.lower()}"),
                    *[dot("black", f"hollow: {view.title.lower()}", filled=False) for view in views[1:2]]]
    return handles


def plot_win_rates(evaluation: Evaluation, path: Path, variants: Mapping[str, Variant], *, about: str = "") -> None:
    plt = _pyplot()
    others = [v for v in evaluation.variants if v != evaluation.base]
    aspects = evaluation.aspects
    rates = np.array([[evaluation.results[v][a]["win_rate"] for a in aspects] for v in others])
    fig, ax = plt.subplots(figsize=(1.3 * len(aspects) + 3.5, 0.5 * len(others) + 1.8))
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(others)):
        for j in range(len(aspects)):
            ax.text(j, i, f"{rates[i, j]:.0%}", ha="center", va="center", fontsize=10)
    ax.set_xticks(range(len(aspects)), aspects)
    ax.set_yticks(range(len(others)), [_label(variants, v) for v in others])
    ax.set_title(f"Share of pairs scoring above {_label(variants, evaluation.base)}{about} (ties count half)",
                 fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DIVERSITY_KINDS = {"pixel": "mean RMS pixel distance (0..1)", "embedding": "mean embedding cosine distance"}


def plot_diversity(views: Sequence[View], path: Path, variants: Mapping[str, Variant]) -> None:
    """Within-prompt diversity per variant, one marker per prompt set, the base's level as a dashed
    line. Dots, not bars: the axis is zoomed to the values (changes are a few percent), and a bar
    that does not start at 0 would exaggerate them."""
    plt = _pyplot()
    headline = views[0].evaluation
    names = [v for v in headline.variants if v in headline.diversity]
    kinds = [k for k in DIVERSITY_KINDS if any(headline.diversity[v].get(k) is not None for v in names)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(PLOT_WIDTH_INCHES * (0.7 if len(kinds) == 1 else 1.0), 5.2),
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for number, view in enumerate(views):
            values = [(view.evaluation.diversity.get(v) or {}).get(kind) for v in names]
            marker = "o" if number == 0 else "s"
            ax.plot(range(len(names)), values, marker=marker, linestyle="", markersize=8,
                    markerfacecolor="tab:blue" if number == 0 else "white", color="tab:blue", label=view.title)
            ax.axhline(values[names.index(headline.base)], color="tab:blue", linestyle="--" if number == 0 else ":",
                       linewidth=0.9, label=f"{_label(variants, headline.base)}, {view.title.lower()}")
        ax.set_ylabel(DIVERSITY_KINDS[kind])
        _variant_ticks(ax, [_label(variants, v) for v in names])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
        ax.set_title("Diversity between a prompt's images across seeds\n(higher = more varied; the axis is "
                     "zoomed: it does not start at 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid(rows: Sequence[Sequence[Any]], path: Path, *, row_labels: Sequence[str] = (),
                column_labels: Sequence[str] = (), cell_min: int = GRID_CELL_MIN) -> None:
    """A PNG grid of images (file paths or [H,W,3] arrays in 0..1), with row and column labels.
    Small images are upscaled (nearest neighbour: pixels stay visible) to at least ``cell_min`` px."""
    from PIL import Image, ImageDraw

    def as_image(item) -> Image.Image:
        if isinstance(item, (str, Path)):
            return Image.open(item).convert("RGB")
        array = np.asarray(item.detach().cpu().numpy() if hasattr(item, "detach") else item, dtype=np.float32)
        return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8), mode="RGB")

    cells = [[as_image(item) for item in row] for row in rows]
    height = max(im.height for row in cells for im in row)
    width = max(im.width for row in cells for im in row)
    scale = max(1, math.ceil(cell_min / min(height, width)))
    cell_w, cell_h = width * scale, height * scale
    font = _grid_font()
    line_h = font.getbbox("Ag")[3] + 3
    pad = 3
    label_w = 240 if row_labels else 0
    columns = max(len(row) for row in cells)
    heads = [_wrap(str(text), font, cell_w) for text in column_labels[:columns]]
    label_h = max((len(lines) for lines in heads), default=0) * line_h + (pad if heads else 0)
    canvas = Image.new("RGB", (label_w + columns * (cell_w + pad) + pad, label_h + len(cells) * (cell_h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(heads):
        draw.multiline_text((label_w + pad + j * (cell_w + pad), 2), "\n".join(lines), fill=(0, 0, 0), font=font,
                            spacing=3)
    for i, row in enumerate(cells):
        top = label_h + pad + i * (cell_h + pad)
        if i < len(row_labels):
            lines = _wrap(str(row_labels[i]), font, label_w - 8)[: max(1, cell_h // line_h)]
            draw.multiline_text((4, top + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=3)
        for j, image in enumerate(row):
            if scale > 1 or image.size != (width, height):
                image = image.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (label_w + pad + j * (cell_w + pad), top))
    canvas.save(path, format="PNG", compress_level=4)


def _grid_font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=GRID_FONT_SIZE)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px (a longer single word gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "variant"


# -- tables ----------------------------------------------------------------------------------------

def _signed(value: float) -> str:
    return f"{value:+.3g}"


def _plain(value: float) -> str:
    return f"{value:.4g}"


def _evaluation_dict(report: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(evaluation dict, variants dict) from a report dict, an Evaluation or an evaluation dict."""
    if isinstance(report, Evaluation):
        return report.to_dict(), {}
    if isinstance(report, Mapping) and report.get("format") == FORMAT_NAME:
        return report["evaluation"], report.get("variants", {})
    if isinstance(report, Mapping) and "results" in report and "seed_spread" in report:
        return dict(report), {}
    raise ValueError("report: expected a report (report.json contents), an Evaluation or an evaluation dict")


def markdown_table(report: Any) -> str:
    """The README table: one row per variant, one column per aspect (mean; change vs base with its
    95 % CI; win rate), plus diversity; **bold** marks a change whose CI excludes zero and that is
    beyond the seed-to-seed spread. A notes line says what every number is. A report with prompt
    sets gets one table per set, the held-out prompts first, each under a line naming its prompts."""
    missing = not_trained_note(report) if isinstance(report, Mapping) else ""
    missing = f"\n{missing}\n" if missing else ""
    if isinstance(report, Mapping) and report.get("format") == FORMAT_NAME and report.get("prompt_sets"):
        variants = report.get("variants", {})
        return "\n".join(f"**{entry['title']}** ({entry['about']}):\n\n"
                          + _markdown_evaluation(entry["evaluation"], variants)
                          for entry in report["prompt_sets"].values()) + missing
    return _markdown_evaluation(*_evaluation_dict(report)) + missing


def _markdown_evaluation(data: Mapping[str, Any], variants: Mapping[str, Any]) -> str:
    aspects, base = data["aspects"], data["base"]
    level = data["settings"].get("level", 0.95)
    has_diversity = bool(data.get("diversity"))
    header = ["variant", *aspects] + (["diversity"] if has_diversity else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name in data["variants"]:
        label = (variants.get(name) or {}).get("label") or name
        cells = [label]
        for aspect in aspects:
            result = data["results"][name][aspect]
            if name == base or result.get("diff") is None:
                cells.append(_plain(result["mean"]))
                continue
            low, high = result["diff_ci"]
            change = f"{_signed(result['diff'])} [{_signed(low)}, {_signed(high)}]"
            if result.get("significant") and result.get("beyond_seed_spread"):
                change = f"**{change}**"
            cells.append(f"{_plain(result['mean'])} ({change}; win {result['win_rate']:.0%})")
        if has_diversity:
            figure = (data.get("diversity") or {}).get(name) or {}
            cells.append("" if figure.get("pixel") is None else _plain(figure["pixel"]))
        lines.append("| " + " | ".join(cells) + " |")
    spread = ", ".join(f"{a} ±{data['seed_spread'][a]['threshold']:.3g}" for a in aspects)
    notes = (f"\nMean reward over {data['pairs']} (prompt, seed) pairs ({len(data['prompts'])} prompts × "
             f"{len(data['seeds'][0])} seeds{_seed_layout(data['seeds'])}); in brackets the paired change vs {base} "
             f"with its {level:.0%} bootstrap "
             f"CI ({data['settings']['resamples']} resamples of {data['settings']['unit']}); win = share of pairs "
             f"scoring above {base} (ties count half). Seed-to-seed spread ({level:.0%} of the mean changes from "
             f"re-rolling seeds alone): {spread}. **Bold**: CI excludes 0 and the change is beyond that spread.")
    if has_diversity:
        notes += " Diversity: mean RMS pixel distance between a prompt's images across seeds (0..1)."
    return "\n".join(lines) + "\n" + notes + "\n" + _markdown_mixture_tables(data, variants)


def not_trained_note(report: Mapping[str, Any]) -> str:
    """A line naming the aspects a loop round trained no LoRA for (they kept no image), or ''."""
    missing = (report.get("config") or {}).get("not_trained") or {}
    if not missing:
        return ""
    return ("**Not trained** (no image kept, so no LoRA, and the merge and the gated mixture are made of the other "
            "aspects): " + "; ".join(str(reason) for reason in missing.values()) + ".")


def _seed_layout(seeds: Sequence[Sequence[int]]) -> str:
    """How the grid's seeds are laid out, for the notes: shared by every prompt, or each prompt its own."""
    if len(seeds) > 1 and all(list(row) == list(seeds[0]) for row in seeds):
        return ", every prompt with the same seeds"
    return ", each pair its own seed" if len({s for row in seeds for s in row}) == sum(map(len, seeds)) else ""


# The mixture tables (rows built once, rendered as markdown for the README and as HTML): each variant's
# normalised score on the validation and the test prompts, each mixture's share of each aspect LoRA's
# own gain, and the head-to-heads of the gated mixtures against the merge baselines.

def _label_of(variants: Mapping[str, Any], name: str) -> str:
    return (variants.get(name) or {}).get("label") or name


def _change_cell(result: Mapping[str, Any]) -> tuple[str, str]:
    """(``diff [low, high]; win w``, ``up`` / ``down`` when the CI excludes 0 above / below, else "")."""
    low, high = result["diff_ci"]
    return (f"{_signed(result['diff'])} [{_signed(low)}, {_signed(high)}]; win {result['win_rate']:.0%}",
            "up" if low > 0 else "down" if high < 0 else "")


def _variants_rows(data: Mapping[str, Any], variants: Mapping[str, Any]) -> list[list[tuple[str, str]]]:
    best = data.get("best_baseline")
    rows = []
    for name, entry in (data.get("normalised") or {}).items():
        validation = entry.get("validation")
        label = _label_of(variants, name) + (" (best baseline)" if name == best else "")
        rows.append([(label, ""), ("" if validation is None else _signed(validation), ""),
                     _change_cell(entry["test"])])
    return rows


def _share_rows(data: Mapping[str, Any], variants: Mapping[str, Any]) -> list[list[tuple[str, str]]]:
    shares = data.get("share_of_own_gain") or {}
    aspects = [a for a in data["aspects"] if a in shares]
    mixtures = list(dict.fromkeys(m for a in aspects for m in shares[a]))
    rows = [[("own LoRA's gain", "")] + [(_signed(next(iter(shares[a].values()))["own_gain"]), "")
                                         for a in aspects]] if mixtures else []
    for mixed in mixtures:
        cells = [(_label_of(variants, mixed), "")]
        for aspect in aspects:
            entry = shares[aspect][mixed]
            if entry["share"] is None:
                cells.append(("n/a (own gain 0)", ""))
                continue
            low, high = entry["share_ci"] or (math.nan, math.nan)
            cells.append((f"{entry['share']:.0%} [{low:.0%}, {high:.0%}]", ""))
        rows.append(cells)
    return rows


def _head_to_head_rows(data: Mapping[str, Any], variants: Mapping[str, Any]) -> list[list[tuple[str, str]]]:
    rows = []
    for comparison in (data.get("comparisons") or {}).values():
        label = " vs ".join(_label_of(variants, n) for n in (comparison["variant"], comparison["reference"]))
        cells = [(label, "")] + [_change_cell(comparison["results"][a]) for a in data["aspects"]]
        if comparison.get("normalised"):
            cells.append(_change_cell(comparison["normalised"]))
        rows.append(cells)
    return rows


def mixture_tables(data: Mapping[str, Any], variants: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The mixture tables: ``{"title", "header", "rows" (cells: (text, "up" | "down" | "")), "note"}``."""
    level = data["settings"].get("level", 0.95)
    aspects = data["aspects"]
    validation = data["settings"].get("validation_prompts") or 0
    where = (f"{validation} validation prompts (used to choose settings) and the {len(data['prompts'])} test "
             "prompts (every other figure)" if validation else "the evaluation prompts (no validation split)")
    tables = []
    rows = _variants_rows(data, variants)
    if rows:
        header = ["variant", "validation score", "test score"]
        if not validation:  # no validation split, no validation scores: no empty column
            header, rows = ["variant", "test score"], [[row[0], row[2]] for row in rows]
        tables.append({
            "title": "Variants", "header": header, "rows": rows,
            "note": (f"Normalised score: the mean over aspects of the change vs {data['base']} in units of each "
                     f"aspect's per-image seed-to-seed sd of {data['base']}, on {where}; test: with its "
                     f"{level:.0%} bootstrap CI and win rate over pairs. The best baseline is the merge baseline "
                     f"with the best {'validation' if validation else 'test'} score.")})
    rows = _share_rows(data, variants)
    if rows:
        tables.append({
            "title": "Share of each aspect LoRA's own gain", "header": ["variant", *[
                a for a in aspects if a in (data.get("share_of_own_gain") or {})]], "rows": rows,
            "note": (f"A mixture's change on an aspect divided by that aspect's own LoRA's change (both vs "
                     f"{data['base']}, test prompts), {level:.0%} bootstrap CI of the ratio; 100% keeps all of the "
                     "LoRA's gain. A ratio is only as reliable as its denominator: a small own gain gives a wide CI.")})
    rows = _head_to_head_rows(data, variants)
    if rows:
        tables.append({
            "title": "Head to head", "header": ["comparison", *aspects, "normalised score"], "rows": rows,
            "note": (f"Paired change of the first variant against the second on the same (prompt, seed) pairs "
                     f"(test prompts), {level:.0%} bootstrap CI; bold: CI excludes 0. The gated mixture "
                     "against the merge baselines tests whether the learned gate mixes the aspect LoRAs better than "
                     "a merge.")})
    return tables


def _markdown_mixture_tables(data: Mapping[str, Any], variants: Mapping[str, Any]) -> str:
    parts = []
    for table in mixture_tables(data, variants):
        header = table["header"]
        lines = ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for row in table["rows"]:
            cells = [f"**{text}**" if css else text for text, css in row]
            lines.append("| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |")
        parts.append("\n".join(lines) + f"\n\n{table['title']}: {table['note']}\n")
    return "".join(parts)


def _html_mixture_tables(data: Mapping[str, Any], variants: Mapping[str, Any]) -> str:
    parts = []
    for table in mixture_tables(data, variants):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in table["header"])
        rows = "".join("<tr>" + "".join(f"<td class='{css}'>{html.escape(text)}</td>" for text, css in row) + "</tr>"
                       for row in table["rows"])
        parts.append(f"<h2>{html.escape(table['title'])}</h2><table><tr>{head}</tr>{rows}</table>"
                     f"<p class='note'>{html.escape(table['note'])}</p>")
    return "".join(parts)


# -- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.up { background: #e3f5e1; } td.down { background: #fbe3e1; } td.own { font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
code, pre { background: #f4f4f4; padding: 2px 4px; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #333; }
"""


def _html_table(data: Mapping[str, Any], variants: Mapping[str, Any]) -> str:
    aspects, base = data["aspects"], data["base"]
    level = data["settings"].get("level", 0.95)
    head = "".join(f"<th>{html.escape(a)}</th>" for a in aspects)
    rows = []
    for name in data["variants"]:
        meta = variants.get(name) or {}
        cells = [f"<td>{html.escape(meta.get('label') or name)}</td>"]
        for aspect in aspects:
            r = data["results"][name][aspect]
            low_m, high_m = r["mean_ci"]
            text = f"{_plain(r['mean'])}<br><span class='note'>[{_plain(low_m)}, {_plain(high_m)}]</span>"
            css = []
            if r.get("diff") is not None:
                low, high = r["diff_ci"]
                text += (f"<br>Δ {_signed(r['diff'])} [{_signed(low)}, {_signed(high)}]"
                         f"<br>win {r['win_rate']:.1%} [{r['win_rate_ci'][0]:.0%}, {r['win_rate_ci'][1]:.0%}]")
                if r.get("beyond_seed_spread"):
                    text += "<br><span class='note'>beyond seed spread</span>"
                if low > 0:
                    css.append("up")
                elif high < 0:
                    css.append("down")
            if meta.get("aspect") == aspect:
                css.append("own")
            cells.append(f"<td class='{' '.join(css)}'>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = (f"Mean reward [{level:.0%} CI]; Δ = paired change vs {html.escape(base)} [{level:.0%} bootstrap CI]; "
               "win = share of pairs above the base (ties count half). Green: CI above 0; red: below 0; bold: "
               "the LoRA's own aspect.")
    return (f"<table><tr><th>variant</th>{head}</tr>{''.join(rows)}</table><p class='note'>{caption}</p>")


def _report_views(report: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(title, what the prompts are, evaluation dict) per prompt set of a report, headline first."""
    sets = report.get("prompt_sets") or {}
    if sets:
        return [(entry["title"], entry["about"], entry["evaluation"]) for entry in sets.values()]
    return [(*ALL_PROMPTS, report["evaluation"])]


def _grid_size(data: Mapping[str, Any]) -> str:
    return (f"{len(data['prompts'])} prompts × {len(data['seeds'][0])} seeds{_seed_layout(data['seeds'])} = "
            f"{data['pairs']} (prompt, seed) pairs per variant")


def _render_html(report: Mapping[str, Any]) -> str:
    variants = report.get("variants", {})
    views = _report_views(report)
    title = html.escape(report.get("title") or "VersaT2I evaluation report")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
             f"</head><body><h1>{title}</h1>", _html_intro(report, views)]
    missing = not_trained_note(report)
    if missing:
        parts.append(f"<p class='down'>{html.escape(missing.replace('**', ''))}</p>")
    parts += [_html_view(view_title, about, data, variants) for view_title, about, data in views]
    parts += [_html_plots(report["files"], views), _html_diversity(views, variants),
              _html_samples(report["files"], variants)]
    data = report["evaluation"]
    scorers = "".join(f"<li>{html.escape(a)}: <code>{html.escape(str(s.get('id')))}</code> "
                      f"(weights {html.escape(str(s.get('weights_hash'))[:16])})</li>"
                      for a, s in data.get("scorers", {}).items())
    # The settings run to hundreds of lines (every prompt of every set): folded, so the page ends with the
    # scorers and a reader opens the rest when needed.
    parts.append(f"<h2>Setup</h2><ul>{scorers}</ul><details><summary>Settings of this run (prompt sets, loop "
                 f"config)</summary><pre>{html.escape(json.dumps(report.get('config', {}), indent=1))}</pre>"
                 f"</details><p class='note'>Every number is in <a href='{REPORT_JSON}'>{REPORT_JSON}</a>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_intro(report: Mapping[str, Any], views) -> str:
    sets = "".join(f"<li><b>{html.escape(t)}</b>: {html.escape(about)}; {_grid_size(d)}.</li>" for t, about, d in views)
    headline = views[0][0].lower()
    train_note = (" A gain on the training prompts alone may only fit those prompts; the held-out prompts show "
                  "whether it carries over." if len(views) > 1 else "")
    return (f"<p class='note'>Created {html.escape(report['created'])}. Every variant was sampled on the same "
            "prompts and seeds (the same starting noise) and scored with the same scorers, so each variant is "
            f"compared with the base <code>{html.escape(report['evaluation']['base'])}</code> pair by pair. "
            f"The headline numbers are on the {html.escape(headline)}.{train_note}</p><ul>{sets}</ul>")


def _html_view(title: str, about: str, data: Mapping[str, Any], variants: Mapping[str, Any]) -> str:
    parts = [f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(about)}; {_grid_size(data)}.</p>",
             _html_table(data, variants)]
    parts.append(_html_mixture_tables(data, variants))
    level = data["settings"].get("level", 0.95)
    rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{_plain(s['per_image_sd'])}</td><td>{_plain(s['mean_sd'])}</td>"
                   f"<td>{_plain(s['threshold'])}</td></tr>" for a, s in data["seed_spread"].items())
    parts.append("<details><summary>Seed-to-seed spread of the base</summary><table><tr><th>aspect</th><th>one image, "
                 f"sd across seeds</th><th>grid mean, sd across reruns</th><th>threshold ({level:.0%} of reruns)</th>"
                 f"</tr>{rows}</table><p class='note'>Estimated in this run from disjoint halves of each prompt's "
                 "seeds, rescaled to a full rerun. A change larger than the threshold is beyond what re-rolling "
                 "seeds alone produces.</p></details>")
    return "\n".join(parts)


def _plot_captions(views) -> dict[str, tuple[str, str]]:
    headline = views[0][0].lower()
    sets = (f" Filled dots: {headline}; hollow dots: {views[1][0].lower()}." if len(views) > 1 else "")
    return {
        "differences": ("Change vs base", "Each dot is a variant's mean change against the base on one aspect, the "
                        "bar its confidence interval. Green: the interval is above 0 (better than the base); red: "
                        "below 0 (worse); grey: it includes 0 (no clear change). The larger dot is a LoRA on the "
                        f"aspect it was trained for.{sets} The grey band is the base's seed-to-seed spread on the "
                        f"{headline}: a change inside it is no larger than re-rolling the seeds produces."),
        "distributions": ("Reward distributions", f"Every image's reward on the {headline}, per variant and aspect."),
        "win_rates": ("Win rates", f"Share of (prompt, seed) pairs of the {headline} where the variant scores above "
                      "the base (ties count half): 50 % is no difference."),
        "diversity": ("Diversity", "Mean distance between the images of one prompt across its seeds. A drop against "
                      "the base (dashed line) is a sign of over-optimisation (every seed giving the same picture). "
                      "The axis is zoomed to the values, it does not start at 0."),
    }


def _html_plots(files: Mapping[str, Any], views) -> str:
    parts = []
    for key, (heading, caption) in _plot_captions(views).items():
        if key in files["plots"]:
            parts.append(f"<h2>{heading}</h2><img src='{html.escape(files['plots'][key])}' alt='{heading}'>"
                         f"<p class='note'>{html.escape(caption)}</p>")
    return "\n".join(parts)


def _html_diversity(views, variants: Mapping[str, Any]) -> str:
    """The diversity figures per variant and prompt set; a measure no variant has is left out."""
    columns = [(title, kind) for title, _about, data in views for kind in DIVERSITY_KINDS
               if any((figure or {}).get(kind) is not None for figure in (data.get("diversity") or {}).values())]
    if not columns:
        return ""
    names = list(views[0][2].get("diversity") or {})
    head = "".join(f"<th>{html.escape(DIVERSITY_KINDS[kind])}, {html.escape(title.lower())}</th>"
                   for title, kind in columns)
    by_title = {title: data.get("diversity") or {} for title, _about, data in views}

    def cell(title: str, variant: str, kind: str) -> str:
        value = (by_title[title].get(variant) or {}).get(kind)
        return f"<td>{'' if value is None else _plain(value)}</td>"

    rows = "".join(f"<tr><td>{html.escape((variants.get(v) or {}).get('label') or v)}</td>"
                   + "".join(cell(t, v, k) for t, k in columns) + "</tr>" for v in names)
    return f"<table><tr><th>variant</th>{head}</tr>{rows}</table>"


def _html_samples(files: Mapping[str, Any], variants: Mapping[str, Any]) -> str:
    if not files.get("grids") and not files.get("compare"):
        return ""
    parts = ["<h2>Samples</h2>"]
    for key, grid in (files.get("compare") or {}).items():
        title = html.escape(PROMPT_SETS.get(key, ALL_PROMPTS)[0])
        parts.append(f"<h3>{title}: the base and every variant side by side</h3><img src='{html.escape(grid)}' "
                     f"alt='{title}, side by side'><p class='note'>Each row is one prompt with one seed; every image "
                     "of a row starts from the same noise, so what differs between its columns is the variant's doing. "
                     "The prompts are chosen to cover every word of the set (each shape, colour, background...).</p>")
    if files.get("grids"):
        parts.append("<details><summary>Each variant across seeds (rows: prompts, columns: seeds; a cell has the "
                     "same prompt and seed in every variant's grid)</summary>")
        for name, grid in files["grids"].items():
            label = html.escape((variants.get(name) or {}).get("label") or name)
            parts.append(f"<h3>{label}</h3><img src='{html.escape(grid)}' alt='{label} samples'>")
        parts.append("</details>")
    return "\n".join(parts)


# -- writing ---------------------------------------------------------------------------------------

def write_report(
    evaluation: Evaluation,
    out_dir: str | os.PathLike,
    *,
    images: Mapping[str, Sequence[Sequence[Any]]] | None = None,
    variants: Mapping[str, Variant] | Sequence[Variant] | None = None,
    config: Mapping[str, Any] | None = None,
    title: str | None = None,
    overwrite: bool = False,
    grid_prompts: int = 6,
    grid_seeds: int = 6,
    prompt_sets: Mapping[str, Evaluation] | None = None,
) -> Path:
    """Write the report folder (layout in the module docstring); returns its path.

    ``images[variant][p][s]``: image file paths or [H,W,3] arrays on the evaluation grid (for the
    sample grids; optional). ``variants``: names, kinds, labels (default: from the names).
    ``prompt_sets``: {"held_out" / "train": that set's evaluation} (``evaluate_prompt_sets``); the
    report then leads with the held-out prompts and shows each set apart.
    """
    if isinstance(variants, Mapping):
        variant_info = dict(variants)
    else:
        variant_info = {v.name: v for v in (variants or [])}
    for name in evaluation.variants:
        variant_info.setdefault(name, Variant(name=name).with_defaults())
    views = report_views(evaluation, prompt_sets)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, what="report folder") as temp:
        plots = _write_plots(views, temp, variant_info)
        grids, compare = {}, {}
        if images:
            (temp / "grids").mkdir()
            grids = _write_variant_grids(evaluation, views[0], images, temp, variant_info, grid_prompts, grid_seeds)
            compare = {view.key: _write_comparison_grid(evaluation, view, images, temp, variant_info)
                       for view in views}
        report = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "title": title or "VersaT2I evaluation report",
            "evaluation": evaluation.to_dict(),
            "prompt_sets": {view.key: {"title": view.title, "about": view.about,
                                       "prompts": view.evaluation.grid.prompts, "evaluation": view.evaluation.to_dict()}
                            for view in views} if prompt_sets else {},
            "variants": {name: variant_info[name].to_dict() for name in evaluation.variants},
            "config": dict(config or {}),
            "files": {"html": REPORT_HTML, "plots": plots, "grids": grids, "compare": compare,
                      "summary_plot": plots.get(SUMMARY_PLOT, plots["distributions"])},
            "markdown": None,
        }
        report["markdown"] = markdown_table(report)
        (temp / REPORT_JSON).write_text(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False),
                                        encoding="utf-8")
        (temp / REPORT_HTML).write_text(_render_html(report), encoding="utf-8")
    logger.info("report written to %s", out_dir)
    return out_dir


def _write_plots(views: Sequence[View], folder: Path, variants: Mapping[str, Variant]) -> dict[str, str]:
    """The PNG plots under ``folder/plots``; {plot: relative path}."""
    (folder / "plots").mkdir()
    headline = views[0]
    about = "" if headline.key == "all" else f", {headline.title.lower()}"
    plots = {}
    if len(headline.evaluation.variants) >= 2:
        plots["differences"] = "plots/differences.png"
        plot_differences(views, folder / plots["differences"], variants)
        plots["win_rates"] = "plots/win_rates.png"
        plot_win_rates(headline.evaluation, folder / plots["win_rates"], variants, about=about)
    plots["distributions"] = "plots/distributions.png"
    plot_distributions(headline.evaluation, folder / plots["distributions"], variants, about=about)
    if headline.evaluation.diversity:
        plots["diversity"] = "plots/diversity.png"
        plot_diversity(views, folder / plots["diversity"], variants)
    return plots


def _write_variant_grids(evaluation: Evaluation, headline: View, images, folder: Path,
                         variants: Mapping[str, Variant], grid_prompts: int, grid_seeds: int) -> dict[str, str]:
    """One grid per variant (rows: prompts of the headline set chosen to cover its words; columns:
    seeds); {variant: relative path}."""
    grid = evaluation.grid
    prompts = covering_prompts(headline.evaluation.grid.prompts, grid_prompts)
    rows = [grid.prompts.index(prompt) for prompt in prompts]
    seed_rows = [grid.seeds[row][:grid_seeds] for row in rows]
    if all(row == seed_rows[0] for row in seed_rows):
        columns = [f"seed {s}" for s in seed_rows[0]]
    else:  # every prompt has its own seeds: a column is the prompt's n-th seed
        columns = [f"seed #{c + 1}" for c in range(len(seed_rows[0]))]
    grids: dict[str, str] = {}
    used: set[str] = set()
    for name in evaluation.variants:
        if name not in images:
            continue
        slug = _slug(name)
        while slug in used:
            slug += "_"
        used.add(slug)
        grids[name] = f"grids/{slug}.png"
        by_prompt = images[name]
        sample_grid([list(by_prompt[row])[:grid_seeds] for row in rows], folder / grids[name], row_labels=prompts,
                    column_labels=columns)
    return grids


def _write_comparison_grid(evaluation: Evaluation, view: View, images, folder: Path,
                           variants: Mapping[str, Variant]) -> str:
    """The base and every variant side by side (columns), one row per prompt of ``view`` (chosen to
    cover its words) with its first seed; the relative path."""
    grid = evaluation.grid
    names = [name for name in evaluation.variants if name in images]
    prompts = covering_prompts(view.evaluation.grid.prompts, COMPARE_ROWS)
    rows = [grid.prompts.index(prompt) for prompt in prompts]
    cells = [[images[name][row][0] for name in names] for row in rows]
    labels = [f"{prompt} (seed {grid.seeds[row][0]})" for prompt, row in zip(prompts, rows)]
    path = f"grids/compare_{view.key}.png"
    sample_grid(cells, folder / path, row_labels=labels, column_labels=[_label(variants, n) for n in names],
                cell_min=COMPARE_CELL_MIN)
    return path


def report_from_eval_dir(eval_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                         title: str | None = None, embed=None, config: Mapping[str, Any] | None = None,
                         **options) -> Path:
    """Evaluate an evaluation folder and write its report (``options``: see ``evaluate.evaluate``);
    the prompt sets variants.json names are evaluated each on its own too."""
    evaluation, folder, files = evaluate_eval_dir(eval_dir, embed=embed, **options)
    sets = prompt_sets_of(folder.config, evaluation.grid.prompts)
    by_set = evaluate_prompt_sets(evaluation, sets, images={v: _LazyGroups(rows) for v, rows in files.items()},
                                  embed=embed) if sets else None
    return write_report(evaluation, out_dir, images=files, variants=folder.variants,
                        config={**folder.config, **dict(config or {}), "eval_dir": str(folder.path)},
                        title=title, overwrite=overwrite, prompt_sets=by_set)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """report.json of a report folder (or the file itself)."""
    path = Path(path)
    file = path / REPORT_JSON if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no {REPORT_JSON}; write a report first (`versat2i report`)")
    data = json.loads(file.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT_NAME:
        raise ValueError(f"{file}: not a VersaT2I report (format {data.get('format')!r})")
    return data
