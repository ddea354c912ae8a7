"""The evaluation report: a folder with an HTML page, PNG plots, sample grids and a JSON of every number.

Input: an *evaluation folder*, one sub-folder per variant, each sampled on the same held-out
prompts x seeds and scored with the same scorers::

    <eval>/variants.json           optional: {"base": "base",
                                              "variants": [{"name": "lora:alignment", "dir": "lora_alignment",
                                                            "kind": "lora", "aspect": "alignment", ...}, ...],
                                              "config": {... anything worth recording ...}}
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

Output (``write_report``, written under a temporary name and renamed when complete)::

    <out>/report.json       format "versat2i-report": the evaluation (every number, scores, seeds,
                            scorer ids, bootstrap settings), the config, the variants, the files
    <out>/report.html       self-contained page (inline CSS) linking the PNGs below
    <out>/plots/differences.png     paired difference vs base with 95 % CI, seed-spread band (summary)
    <out>/plots/distributions.png   per-aspect reward distributions per variant
    <out>/plots/win_rates.png       win rate vs base, variants x aspects
    <out>/plots/diversity.png       within-prompt diversity per variant (when images were given)
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
from pathlib import Path
from typing import Any

import numpy as np

from ..image_files import load_image_file
from ..rewards.score_table import ScoreTable
from ..safe_io import atomic_dir, atomic_write_text
from .evaluate import Evaluation, evaluate, grid_from_tables
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
    """Evaluate an evaluation folder: ``(evaluation, folder, image files per variant on the grid)``.
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


# -- plots ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window (also on a desktop)
    import matplotlib.pyplot as plt

    return plt


def _label(variants: Mapping[str, Variant], name: str) -> str:
    variant = variants.get(name)
    return (variant.label if variant and variant.label else name)


def plot_distributions(evaluation: Evaluation, path: Path, variants: Mapping[str, Variant]) -> None:
    plt = _pyplot()
    aspects = evaluation.aspects
    names = evaluation.variants
    fig, axes = plt.subplots(1, len(aspects), figsize=(max(4.0, 1.1 * len(names) + 1.5) * len(aspects), 4.2),
                             squeeze=False)
    rng = np.random.default_rng(0)
    for ax, aspect in zip(axes[0], aspects):
        data = [evaluation.grid.scores[v][aspect].reshape(-1) for v in names]
        ax.boxplot(data, showfliers=False, widths=0.6)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=6, alpha=0.35, color="tab:blue")
            ax.scatter([i], [values.mean()], marker="D", color="tab:red", s=22, zorder=3)
        ax.set_title(aspect)
        ax.set_xticks(range(1, len(names) + 1), [_label(variants, v) for v in names], rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("reward (box: quartiles, red: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_differences(evaluation: Evaluation, path: Path, variants: Mapping[str, Variant]) -> None:
    plt = _pyplot()
    aspects = evaluation.aspects
    others = [v for v in evaluation.variants if v != evaluation.base]
    fig, axes = plt.subplots(1, len(aspects), figsize=(max(4.0, 0.9 * len(others) + 1.8) * len(aspects), 4.2),
                             squeeze=False)
    for ax, aspect in zip(axes[0], aspects):
        threshold = evaluation.seed_spread[aspect].threshold
        ax.axhspan(-threshold, threshold, color="0.85", label="seed-to-seed spread")
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        for i, name in enumerate(others):
            result = evaluation.results[name][aspect]
            low, high = result["diff_ci"]
            own = variants.get(name) is not None and variants[name].aspect == aspect
            color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:gray"
            ax.errorbar([i], [result["diff"]], yerr=[[result["diff"] - low], [high - result["diff"]]], fmt="o",
                        color=color, capsize=4, markersize=8 if own else 5)
        ax.set_title(aspect)
        ax.set_xticks(range(len(others)), [_label(variants, v) for v in others], rotation=30, ha="right")
        ax.set_xlim(-0.6, len(others) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"mean difference vs {evaluation.base} (95 % CI)")
    axes[0][0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_win_rates(evaluation: Evaluation, path: Path, variants: Mapping[str, Variant]) -> None:
    plt = _pyplot()
    others = [v for v in evaluation.variants if v != evaluation.base]
    aspects = evaluation.aspects
    rates = np.array([[evaluation.results[v][a]["win_rate"] for a in aspects] for v in others])
    fig, ax = plt.subplots(figsize=(1.3 * len(aspects) + 2.5, 0.5 * len(others) + 1.6))
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(others)):
        for j in range(len(aspects)):
            ax.text(j, i, f"{rates[i, j]:.0%}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(aspects)), aspects)
    ax.set_yticks(range(len(others)), [_label(variants, v) for v in others])
    ax.set_title(f"win rate vs {evaluation.base} (ties count half)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_diversity(evaluation: Evaluation, path: Path, variants: Mapping[str, Variant]) -> None:
    plt = _pyplot()
    names = [v for v in evaluation.variants if v in evaluation.diversity]
    kinds = [k for k in ("pixel", "embedding") if any(evaluation.diversity[v].get(k) is not None for v in names)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(4.0, 0.8 * len(names) + 1.5) * len(kinds), 3.8),
                             squeeze=False)
    titles = {"pixel": "pixel RMS distance", "embedding": "embedding cosine distance"}
    for ax, kind in zip(axes[0], kinds):
        values = [evaluation.diversity[v].get(kind) or 0.0 for v in names]
        ax.bar(range(len(names)), values, color=["tab:gray" if v == evaluation.base else "tab:blue" for v in names])
        ax.set_xticks(range(len(names)), [_label(variants, v) for v in names], rotation=30, ha="right")
        ax.set_title(f"diversity within a prompt: {titles[kind]}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid(rows: Sequence[Sequence[Any]], path: Path, *, row_labels: Sequence[str] = (),
                column_labels: Sequence[str] = ()) -> None:
    """A PNG grid of images (file paths or [H,W,3] arrays in 0..1), with prompt / seed labels."""
    from PIL import Image, ImageDraw, ImageFont

    def as_image(item) -> Image.Image:
        if isinstance(item, (str, Path)):
            return Image.open(item).convert("RGB")
        array = np.asarray(item.detach().cpu().numpy() if hasattr(item, "detach") else item, dtype=np.float32)
        return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8), mode="RGB")

    cells = [[as_image(item) for item in row] for row in rows]
    height = max(im.height for row in cells for im in row)
    width = max(im.width for row in cells for im in row)
    scale = max(1, math.ceil(GRID_CELL_MIN / min(height, width)))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    label_w = 220 if row_labels else 0
    label_h = 16 if column_labels else 0
    pad = 2
    columns = max(len(row) for row in cells)
    canvas = Image.new("RGB", (label_w + columns * (cell_w + pad) + pad, label_h + len(cells) * (cell_h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(column_labels[:columns]):
        draw.text((label_w + pad + j * (cell_w + pad), 2), str(text), fill=(0, 0, 0), font=font)
    for i, row in enumerate(cells):
        top = label_h + pad + i * (cell_h + pad)
        if i < len(row_labels):
            words, lines, line = str(row_labels[i]).split(), [], ""
            for word in words:  # wrap at ~34 characters
                if len(line) + len(word) + 1 > 34 and line:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            draw.multiline_text((4, top + 2), "\n".join(lines[:6]), fill=(0, 0, 0), font=font)
        for j, image in enumerate(row):
            if scale > 1 or image.size != (width, height):
                image = image.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(image, (label_w + pad + j * (cell_w + pad), top))
    canvas.save(path, format="PNG", compress_level=4)


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
    beyond the seed-to-seed spread. A notes line says what every number is."""
    data, variants = _evaluation_dict(report)
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
             f"{len(data['seeds'][0])} seeds{_seed_layout(data['seeds'])}); in brackets the paired change vs {base} with its {level:.0%} bootstrap "
             f"CI ({data['settings']['resamples']} resamples of {data['settings']['unit']}); win = share of pairs "
             f"scoring above {base} (ties count half). Seed-to-seed spread ({level:.0%} of the mean changes from "
             f"re-rolling seeds alone): {spread}. **Bold**: CI excludes 0 and the change is beyond that spread.")
    if has_diversity:
        notes += " Diversity: mean RMS pixel distance between a prompt's images across seeds (0..1)."
    return "\n".join(lines) + "\n" + notes + "\n" + _markdown_mixture_tables(data, variants)


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
        tables.append({
            "title": "Variants", "header": ["variant", "validation score", "test score"], "rows": rows,
            "note": (f"Normalised score: the mean over aspects of the change vs {data['base']} in units of each "
                     f"aspect's per-image seed-to-seed sd of {data['base']}, on {where}; test: with its "
                     f"{level:.0%} bootstrap CI and win rate over pairs. The best baseline is the merge baseline "
                     "with the best validation score.")})
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
.note { color: #555; font-size: 13px; }
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


def _render_html(report: Mapping[str, Any]) -> str:
    data = report["evaluation"]
    variants = report.get("variants", {})
    files = report["files"]
    title = html.escape(report.get("title") or "VersaT2I evaluation report")
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
              f"</head><body><h1>{title}</h1>"),
             (f"<p class='note'>Created {html.escape(report['created'])}. {len(data['prompts'])} prompts × "
              f"{len(data['seeds'][0])} seeds{html.escape(_seed_layout(data['seeds']))} = {data['pairs']} pairs per "
              "variant; base: "
              f"<code>{html.escape(data['base'])}</code>.</p>"),
             "<h2>Rewards</h2>", _html_table(data, variants)]
    spread_rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{_plain(s['per_image_sd'])}</td><td>{_plain(s['mean_sd'])}</td>"
        f"<td>{_plain(s['threshold'])}</td></tr>" for a, s in data["seed_spread"].items())
    level = data["settings"].get("level", 0.95)
    parts.append("<h2>Seed-to-seed spread of the base</h2><table><tr><th>aspect</th><th>one image, sd across seeds"
                 f"</th><th>grid mean, sd across reruns</th><th>threshold ({level:.0%} of reruns)</th></tr>"
                 f"{spread_rows}</table><p class='note'>Estimated in this run from disjoint halves of each prompt's "
                 "seeds, rescaled to a full rerun. A change larger than the threshold is beyond what re-rolling "
                 "seeds alone produces.</p>")
    parts.append(_html_mixture_tables(data, variants))
    for key, heading in (("differences", "Change vs base"), ("distributions", "Reward distributions"),
                         ("win_rates", "Win rates"), ("diversity", "Diversity")):
        if key in files["plots"]:
            parts.append(f"<h2>{heading}</h2><img src='{html.escape(files['plots'][key])}' alt='{heading}'>")
    if data.get("diversity"):
        rows = "".join(
            f"<tr><td>{html.escape((variants.get(v) or {}).get('label') or v)}</td><td>{_plain(d['pixel'])}</td>"
            f"<td>{'' if d.get('embedding') is None else _plain(d['embedding'])}</td></tr>"
            for v, d in data["diversity"].items())
        parts.append("<table><tr><th>variant</th><th>pixel RMS distance</th><th>embedding distance</th></tr>"
                     f"{rows}</table><p class='note'>Mean distance between the images of one prompt across seeds; "
                     "a drop against the base is a sign of over-optimisation (mode collapse).</p>")
    if files.get("grids"):
        parts.append("<h2>Samples</h2><p class='note'>Rows: prompts; columns: seeds (a cell has the same prompt "
                     "and seed in every variant's grid).</p>")
        for name, grid in files["grids"].items():
            label = html.escape((variants.get(name) or {}).get("label") or name)
            parts.append(f"<h3>{label}</h3><img src='{html.escape(grid)}' alt='{label} samples'>")
    scorers = "".join(f"<li>{html.escape(a)}: <code>{html.escape(str(s.get('id')))}</code> "
                      f"(weights {html.escape(str(s.get('weights_hash'))[:16])})</li>"
                      for a, s in data.get("scorers", {}).items())
    parts.append(f"<h2>Setup</h2><ul>{scorers}</ul><pre>{html.escape(json.dumps(report.get('config', {}), indent=1))}"
                 f"</pre><p class='note'>Every number is in <a href='{REPORT_JSON}'>{REPORT_JSON}</a>.</p>")
    parts.append("</body></html>")
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
) -> Path:
    """Write the report folder (layout in the module docstring); returns its path.

    ``images[variant][p][s]``: image file paths or [H,W,3] arrays on the evaluation grid (for the
    sample grids; optional). ``variants``: names, kinds, labels (default: from the names).
    """
    if isinstance(variants, Mapping):
        variant_info = dict(variants)
    else:
        variant_info = {v.name: v for v in (variants or [])}
    for name in evaluation.variants:
        variant_info.setdefault(name, Variant(name=name).with_defaults())
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, what="report folder") as temp:
        (temp / "plots").mkdir()
        plots = {"differences": "plots/differences.png", "distributions": "plots/distributions.png",
                 "win_rates": "plots/win_rates.png"}
        if len(evaluation.variants) < 2:
            plots = {"distributions": "plots/distributions.png"}
        if "differences" in plots:
            plot_differences(evaluation, temp / plots["differences"], variant_info)
            plot_win_rates(evaluation, temp / plots["win_rates"], variant_info)
        plot_distributions(evaluation, temp / plots["distributions"], variant_info)
        if evaluation.diversity:
            plots["diversity"] = "plots/diversity.png"
            plot_diversity(evaluation, temp / plots["diversity"], variant_info)
        grids = {}
        if images:
            (temp / "grids").mkdir()
            prompts = evaluation.grid.prompts[:grid_prompts]
            seed_rows = [row[:grid_seeds] for row in evaluation.grid.seeds[:grid_prompts]]
            if all(row == seed_rows[0] for row in seed_rows):
                columns = [f"seed {s}" for s in seed_rows[0]]
            else:  # every prompt has its own seeds: a column is the prompt's n-th seed
                columns = [f"seed #{c + 1}" for c in range(len(seed_rows[0]))]
            used: set[str] = set()
            for name in evaluation.variants:
                if name not in images:
                    continue
                rows = [list(row[:grid_seeds]) for row in list(images[name])[:grid_prompts]]
                slug = _slug(name)
                while slug in used:
                    slug += "_"
                used.add(slug)
                grids[name] = f"grids/{slug}.png"
                sample_grid(rows, temp / grids[name], row_labels=prompts, column_labels=columns)
        report = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "title": title or "VersaT2I evaluation report",
            "evaluation": evaluation.to_dict(),
            "variants": {name: variant_info[name].to_dict() for name in evaluation.variants},
            "config": dict(config or {}),
            "files": {"html": REPORT_HTML, "plots": plots, "grids": grids,
                      "summary_plot": plots.get(SUMMARY_PLOT, plots["distributions"])},
            "markdown": None,
        }
        report["markdown"] = markdown_table(report)
        (temp / REPORT_JSON).write_text(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False),
                                        encoding="utf-8")
        (temp / REPORT_HTML).write_text(_render_html(report), encoding="utf-8")
    logger.info("report written to %s", out_dir)
    return out_dir


def report_from_eval_dir(eval_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                         title: str | None = None, embed=None, config: Mapping[str, Any] | None = None,
                         **options) -> Path:
    """Evaluate an evaluation folder and write its report (``options``: see ``evaluate.evaluate``)."""
    evaluation, folder, files = evaluate_eval_dir(eval_dir, embed=embed, **options)
    return write_report(evaluation, out_dir, images=files, variants=folder.variants,
                        config={**folder.config, **dict(config or {}), "eval_dir": str(folder.path)},
                        title=title, overwrite=overwrite)


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
