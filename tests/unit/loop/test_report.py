"""The evaluation report (loop/report.py) and `versat2i report`, on a small evaluation folder made
in the test (PNG files, candidates.jsonl, scores.jsonl per variant). No models; offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models.eval_folder import SCORERS, SEEDS, write_eval_dir

from versat2i.loop.evaluate import Evaluation, evaluate, grid_from_tables
from versat2i.loop.report import (
    REPORT_HTML,
    REPORT_JSON,
    evaluate_eval_dir,
    load_eval_dir,
    markdown_table,
    read_report,
    report_from_eval_dir,
    write_report,
)
from versat2i.rewards.score_table import ScoreTable
from versat2i.safe_io import TargetExistsError


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    return write_eval_dir(tmp_path / "eval")


def test_image_files_follow_the_test_prompts_when_validation_prompts_are_set_aside(eval_dir):
    """The files returned index like ``evaluation.grid`` (the test prompts), which the sample grids and
    the prompt sets read them by: with the first prompt set aside for validation, row 0 is the second
    prompt's images (it was the first prompt's: the report's training-prompt grid showed other
    prompts' images under each label)."""
    from tiny_models.eval_folder import PROMPTS

    evaluation, folder, files = evaluate_eval_dir(eval_dir, resamples=50, validation=[PROMPTS[0]])
    assert evaluation.grid.prompts == PROMPTS[1:]
    for variant, rows in files.items():
        assert len(rows) == len(PROMPTS) - 1
        for prompt, seeds, row in zip(evaluation.grid.prompts, evaluation.grid.seeds, rows, strict=True):
            assert row == [folder.image_files[variant][(prompt, seed)] for seed in seeds]


def test_eval_dir_is_read_with_variant_kinds_and_image_files(eval_dir):
    folder = load_eval_dir(eval_dir)
    assert list(folder.variants) == ["base", "lora:alignment", "merge"] and folder.base == "base"
    lora = folder.variants["lora:alignment"]
    assert (lora.kind, lora.aspect, lora.label) == ("lora", "alignment", "LoRA alignment")
    assert folder.config == {"round": 1, "k": 4}
    assert folder.image_files["merge"][("a blue square", 102)] == eval_dir / "merge" / "p00001_c002.png"


def test_report_files_exist_and_json_round_trips(eval_dir, tmp_path):
    out = report_from_eval_dir(eval_dir, tmp_path / "report", resamples=300)
    report = read_report(out)
    evaluation = Evaluation.from_dict(report["evaluation"])
    assert evaluation.to_dict() == report["evaluation"]
    assert json.loads((out / REPORT_JSON).read_text()) == report
    # Every number is the evaluation of the same tables.
    folder = load_eval_dir(eval_dir)
    direct = evaluate(grid_from_tables(folder.tables), resamples=300)
    for variant in direct.variants:
        for aspect in direct.aspects:
            for key in ("mean", "diff", "diff_ci", "win_rate"):
                assert evaluation.results[variant][aspect][key] == direct.results[variant][aspect][key]
    assert report["config"]["round"] == 1 and report["config"]["eval_dir"] == str(eval_dir)
    assert report["evaluation"]["scorers"] == SCORERS
    assert report["evaluation"]["seeds"] == [SEEDS] * 3
    assert report["variants"]["lora:alignment"]["aspect"] == "alignment"
    lora = report["evaluation"]["results"]["lora:alignment"]
    assert lora["alignment"]["diff"] == pytest.approx(0.3) and lora["alignment"]["win_rate"] == 1.0
    assert lora["lowlevel"]["win_rate"] == 0.0
    # Brighter images in one variant: its diversity is computed from its own files.
    assert set(report["evaluation"]["diversity"]) == {"base", "lora:alignment", "merge"}
    assert all(0 < d["pixel"] < 1 for d in report["evaluation"]["diversity"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_html_references_existing_pngs(eval_dir, tmp_path):
    out = report_from_eval_dir(eval_dir, tmp_path / "report", resamples=200)
    page = (out / REPORT_HTML).read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert {"plots/differences.png", "plots/distributions.png", "plots/win_rates.png",
            "plots/diversity.png"} <= set(sources)
    assert sorted(s for s in sources if s.startswith("grids/")) == [
        "grids/base.png", "grids/compare_all.png", "grids/lora_alignment.png", "grids/merge.png"]
    for source in sources:
        with Image.open(out / source) as image:
            assert image.format == "PNG" and image.width > 50
    assert "LoRA alignment" in page and "a blue square" not in page  # prompts are in the grid images, not text
    report = read_report(out)
    assert report["files"]["summary_plot"] == "plots/differences.png"
    grid = Image.open(out / report["files"]["grids"]["base"])
    assert grid.height >= 3 * 96 and grid.width >= 4 * 96  # 16 px images upscaled for viewing
    side_by_side = Image.open(out / report["files"]["compare"]["all"])  # 3 prompts x (base, LoRA, merge)
    assert side_by_side.height >= 3 * 128 and side_by_side.width >= 3 * 128
    assert "embedding" not in page  # no embedding was given: no empty column for it


def test_markdown_table_has_one_row_per_variant_and_bolds_clear_effects(eval_dir, tmp_path):
    out = report_from_eval_dir(eval_dir, tmp_path / "report", resamples=300)
    report = read_report(out)
    table = markdown_table(report)
    assert table == report["markdown"]
    lines = table.splitlines()
    assert lines[0] == "| variant | alignment | lowlevel | diversity |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:5]}
    assert set(rows) == {"base", "LoRA alignment", "merge"}
    assert "**+0.3 [+0.3, +0.3]**" in rows["LoRA alignment"] and "win 100%" in rows["LoRA alignment"]
    assert "**" not in rows["merge"]
    assert "seed-to-seed spread" in table.lower()
    assert "12 (prompt, seed) pairs (3 prompts × 4 seeds, every prompt with the same seeds)" in table
    assert markdown_table(Evaluation.from_dict(report["evaluation"])).splitlines()[:2] == [
        "| variant | alignment | lowlevel | diversity |", "|---|---:|---:|---:|"]


def test_existing_report_is_not_overwritten(eval_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(TargetExistsError):
        report_from_eval_dir(eval_dir, out, resamples=50)
    assert (out / "mine.txt").read_text() == "keep"
    report_from_eval_dir(eval_dir, out, resamples=50, overwrite=True)
    assert (out / REPORT_JSON).is_file() and not (out / "mine.txt").exists()


def test_variants_file_written_by_the_helper_is_read_back(eval_dir):
    from versat2i.loop.report import Variant, write_variants_file

    write_variants_file(eval_dir, [Variant(name="base", dir="base"), {"name": "merge", "dir": "merge"}],
                        config={"seeds": SEEDS})
    folder = load_eval_dir(eval_dir)
    assert list(folder.variants) == ["base", "merge"] and folder.config == {"seeds": SEEDS}
    assert folder.variants["merge"].kind == "merge"
    with pytest.raises(ValueError, match="base='x'"):
        write_variants_file(eval_dir, [{"name": "base"}], base="x")


def test_variants_are_found_without_a_variants_file(eval_dir, tmp_path):
    (eval_dir / "variants.json").unlink()
    (eval_dir / "merge" / "p00000_c001.png").unlink()  # a missing image: no grid / diversity for merge
    folder = load_eval_dir(eval_dir)
    assert list(folder.variants) == ["base", "lora_alignment", "merge"]
    out = report_from_eval_dir(eval_dir, tmp_path / "report", resamples=50)
    report = read_report(out)
    assert set(report["files"]["grids"]) == {"base", "lora_alignment"}
    assert "merge" not in report["evaluation"]["diversity"]


def test_write_report_from_an_evaluation_with_in_memory_images(tmp_path):
    rng = np.random.default_rng(5)
    tables = {}
    for name, shift in (("base", 0.0), ("gated", 0.1)):
        values = rng.normal(0.5 + shift, 0.1, 6).tolist()
        tables[name] = ScoreTable.from_scores({"alignment": values}, {"alignment": SCORERS["alignment"]},
                                              ["a", "a", "a", "b", "b", "b"], seeds=[1, 2, 3, 1, 2, 3])
    evaluation = evaluate(grid_from_tables(tables), resamples=100)
    images = {name: [[rng.random((8, 8, 3)) for _ in range(3)] for _ in range(2)] for name in tables}
    out = write_report(evaluation, tmp_path / "r", images=images, title="demo <run>")
    page = (out / REPORT_HTML).read_text()
    assert "demo &lt;run&gt;" in page  # titles are escaped
    assert set(read_report(out)["files"]["grids"]) == {"base", "gated"}
    assert read_report(out)["variants"]["gated"]["kind"] == "gated"


def test_bad_eval_dirs_are_clear_errors(tmp_path, eval_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_dir(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no variant"):
        load_eval_dir(empty)
    data = json.loads((eval_dir / "variants.json").read_text())
    data["base"] = "nope"
    (eval_dir / "variants.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no base variant 'nope'"):
        load_eval_dir(eval_dir)
    with pytest.raises(ValueError, match="not a VersaT2I report"):
        (tmp_path / "fake.json").write_text(json.dumps({"format": "other"}))
        read_report(tmp_path / "fake.json")


def test_cli_report(eval_dir, tmp_path, capsys):
    from versat2i.cli import main

    out = tmp_path / "report"
    assert main(["report", "--eval", str(eval_dir), "--out", str(out), "--resamples", "100", "--unit", "prompts"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| variant | alignment | lowlevel | diversity |")
    assert printed.strip().endswith(str(out / REPORT_HTML))
    assert read_report(out)["evaluation"]["settings"]["unit"] == "prompts"
    assert main(["report", "--eval", str(eval_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["report", "--eval", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2


def test_gated_mixture_is_compared_head_to_head_with_the_merge(tmp_path):
    """With both a merge and a gated variant, the report adds their paired comparison (table + HTML)."""
    import shutil

    eval_dir = write_eval_dir(tmp_path / "eval")
    shutil.copytree(eval_dir / "merge", eval_dir / "gated")
    variants = json.loads((eval_dir / "variants.json").read_text())
    variants["variants"].append({"name": "gated", "dir": "gated", "kind": "gated"})
    (eval_dir / "variants.json").write_text(json.dumps(variants))
    report = read_report(report_from_eval_dir(eval_dir, tmp_path / "report", resamples=200))
    comparison = report["evaluation"]["comparisons"]["gated vs merge"]
    assert comparison["results"]["alignment"]["diff"] == 0.0  # identical images and scores
    assert "| gated vs merge |" in report["markdown"]
    assert "Head to head" in (tmp_path / "report" / REPORT_HTML).read_text()
    # no validation split: the variants table has no (empty) validation column
    assert "| variant | test score |" in report["markdown"] and "validation score" not in report["markdown"]
    # without a gated variant there is nothing to compare
    plain = read_report(report_from_eval_dir(write_eval_dir(tmp_path / "eval2"), tmp_path / "r2", resamples=200))
    assert plain["evaluation"]["comparisons"] == {} and "| gated vs merge |" not in plain["markdown"]


def test_prompt_sets_are_evaluated_apart_held_out_first(eval_dir, tmp_path):
    from tiny_models.eval_folder import PROMPTS

    listing = json.loads((eval_dir / "variants.json").read_text())
    listing["config"]["prompt_sets"] = {"held_out": [PROMPTS[2]], "train": PROMPTS[:2]}
    (eval_dir / "variants.json").write_text(json.dumps(listing))
    out = report_from_eval_dir(eval_dir, tmp_path / "report", resamples=200)
    report = read_report(out)
    whole = Evaluation.from_dict(report["evaluation"])
    assert whole.grid.prompts == PROMPTS  # all prompts together, as before
    sets = report["prompt_sets"]
    assert list(sets) == ["held_out", "train"]
    assert sets["held_out"]["prompts"] == [PROMPTS[2]] and sets["train"]["prompts"] == PROMPTS[:2]
    for key, rows in (("held_out", [2]), ("train", [0, 1])):
        own = sets[key]["evaluation"]
        assert own["prompts"] == [PROMPTS[r] for r in rows] and own["pairs"] == 4 * len(rows)
        for aspect in whole.aspects:
            paired = whole.grid.scores["lora:alignment"][aspect][rows] - whole.grid.scores["base"][aspect][rows]
            assert own["results"]["lora:alignment"][aspect]["diff"] == pytest.approx(paired.mean())
        assert set(own["diversity"]) == {"base", "lora:alignment", "merge"}
    markdown = report["markdown"]
    assert markdown.startswith("**Held-out prompts** (prompts the loop never trained on):")
    assert markdown.index("**Held-out prompts**") < markdown.index("**Training prompts**")
    assert "4 (prompt, seed) pairs (1 prompts × 4 seeds" in markdown
    page = (out / REPORT_HTML).read_text()
    assert page.index("<h2>Held-out prompts</h2>") < page.index("<h2>Training prompts</h2>")
    assert "headline numbers are on the held-out prompts" in page
    assert sorted(report["files"]["compare"]) == ["held_out", "train"]
    for relative in report["files"]["compare"].values():
        assert (out / relative).is_file()


def test_sample_prompts_cover_every_word_of_the_set():
    from versat2i.loop.report import covering_prompts

    prompts = [f"a {colour} {shape} on a {background} background" for shape in ("circle", "square", "triangle")
               for colour in ("red", "green", "blue") for background in ("white", "black")]
    chosen = covering_prompts(prompts, 4)
    words = {word for prompt in chosen for word in prompt.split()}
    assert len(chosen) == 4 and {"red", "green", "blue", "circle", "square", "triangle", "white", "black"} <= words
    assert chosen == [p for p in prompts if p in chosen]  # in the set's order
    assert covering_prompts(prompts[:2], 5) == prompts[:2]


def test_sample_prompts_do_not_depend_on_hash_randomisation():
    import os
    import subprocess
    import sys

    code = ("from versat2i.loop.report import covering_prompts\n"
            "prompts = [f'a {c} {s} on a {b} background' for s in ('circle', 'square', 'triangle')"
            " for c in ('red', 'green', 'blue', 'orange') for b in ('white', 'gray')]\n"
            "print(covering_prompts(prompts, 8))")
    chosen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True, timeout=120).stdout for seed in (1, 2, 3)}
    assert len(chosen) == 1, chosen
def test_report_gives_shares_scores_and_every_head_to_head(tmp_path):
    """With merge baselines and a gated mixture: the variants table (validation and test scores), each
    mixture's share of the aspect LoRA's own gain (JSON ``share_of_own_gain`` keyed by aspect), the
    gate against every baseline, and figures from the test prompts only when variants.json names
    validation prompts."""
    from tiny_models.eval_folder import PROMPTS, SCORERS, write_variant

    eval_dir = write_eval_dir(tmp_path / "eval")
    rng = np.random.default_rng(1)
    base = {a: np.asarray(ScoreTable.load(eval_dir / "base" / "scores.jsonl").scores[a]).reshape(3, 4)
            for a in SCORERS}
    lora = {a: np.asarray(ScoreTable.load(eval_dir / "lora_alignment" / "scores.jsonl").scores[a]).reshape(3, 4)
            for a in SCORERS}
    half = {"alignment": (base["alignment"] + lora["alignment"]) / 2, "lowlevel": base["lowlevel"]}
    write_variant(eval_dir / "sum", {a: v + rng.normal(0, 0.02, v.shape) for a, v in lora.items()}, seed=4)
    write_variant(eval_dir / "gated", half, seed=5)
    variants = json.loads((eval_dir / "variants.json").read_text())
    variants["variants"] += [{"name": "sum", "dir": "sum", "kind": "sum", "label": "sum"},
                             {"name": "gated", "dir": "gated", "kind": "gated", "label": "gated mixture"}]
    variants["config"]["validation_prompts"] = [PROMPTS[0]]
    (eval_dir / "variants.json").write_text(json.dumps(variants))
    report = read_report(report_from_eval_dir(eval_dir, tmp_path / "report", resamples=200))
    evaluation = report["evaluation"]
    assert evaluation["prompts"] == PROMPTS[1:] and evaluation["validation"]["prompts"] == PROMPTS[:1]
    assert evaluation["pairs"] == 8
    share = evaluation["share_of_own_gain"]["alignment"]["gated"]
    assert share["share"] == pytest.approx(0.5) and share["own"] == "lora:alignment"
    assert set(evaluation["share_of_own_gain"]["alignment"]) == {"merge", "sum", "gated"}
    assert [(c["variant"], c["reference"]) for c in evaluation["comparisons"].values()] == [
        ("gated", "merge"), ("gated", "sum")]
    assert evaluation["best_baseline"] in ("merge", "sum")
    assert set(evaluation["normalised"]) == {"lora:alignment", "merge", "sum", "gated"}
    assert all(entry["validation"] is not None for entry in evaluation["normalised"].values())
    markdown = report["markdown"]
    assert "| variant | validation score | test score |" in markdown
    assert "| gated mixture | 50% [50%, 50%] |" in markdown
    assert "| gated mixture vs sum |" in markdown and "normalised score |" in markdown
    page = (tmp_path / "report" / REPORT_HTML).read_text()
    assert "Share of each aspect LoRA&#x27;s own gain" in page and "Head to head" in page
