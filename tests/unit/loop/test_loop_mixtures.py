"""The loop's mixture stages on a tiny SD1.5 model (CPU, offline, real training processes of a few
steps): the gate trained on its own jointly-best set, a [gate_variants] gate, a [lora_aspects]
override, the merge baselines with the uniform weight chosen on the validation prompts, and the
report's shares and head-to-heads. Then a changed gate setting redoes the gates and what reads them,
never the LoRAs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models.sd import build_tiny_sd15

from versat2i.loop.config import (
    DatasetSection,
    EvaluationSection,
    GenerationConfig,
    LoopConfig,
    ModelSection,
    PromptsSection,
    TrainingSection,
)
from versat2i.loop.report import read_report
from versat2i.loop.run import run_loop
from versat2i.rewards.score_table import ScoreTable
from versat2i.rewards.selection import JOINT, select_best_per_prompt, with_joint_scores
from versat2i.trainer.mol_file import read_mol
from versat2i.training_set.manifest import read_manifest

LORA = {"resolution": 64, "bucket_step": 64, "rank": 2, "alpha": 2.0, "train_batch_size": 2, "max_train_steps": 2,
        "checkpointing_steps": 100, "learning_rate": 1e-3, "mixed_precision": "no", "cache_latents": True,
        "cache_text_embeddings": True, "seed": 5}
HELD_OUT = ("a green triangle", "a red square", "a blue circle", "a yellow star")


def make_config(model, out, **gate) -> LoopConfig:
    return LoopConfig(
        name="mixtures", output_dir=str(out), device="cpu", dtype="float32",
        model=ModelSection(base_model=str(model.folder)),
        prompts=PromptsSection(train=("a red circle", "a blue square"), held_out=HELD_OUT, candidates_per_prompt=3,
                               seed=3),
        generation=GenerationConfig(steps=2, guidance_scale=1.0, batch_size=4),
        aspects={"aesthetics": "analytic:contrast", "lowlevel": "analytic:sharpness"},
        dataset=DatasetSection(gate_data="joint"),
        lora=dict(LORA), lora_aspects={"lowlevel": {"max_train_steps": 3}},
        gate={"max_train_steps": 2, "learning_rate": 1e-2, "granularity": "layer", "gate_kind": "sigmoid", **gate},
        gate_variants={"token": {"granularity": "token", "gate_kind": "softmax_n", "timestep_knots": 2}},
        training=TrainingSection(cpu=True, parallel_jobs=2),
        evaluation=EvaluationSection(seeds_per_prompt=2, resamples=100, validation_fraction=0.25,
                                     uniform_weights=(0.5, 1.0),
                                     variants=("base", "lora", "merge", "sum", "uniform", "ties", "gated")),
    )


@pytest.mark.slow
def test_gate_set_gate_variants_baselines_and_the_report(tmp_path):
    model = build_tiny_sd15(tmp_path / "tiny")
    out = tmp_path / "run"
    config = make_config(model, out)
    assert config.problems() == []
    run_loop(config, show_progress=False)
    round_ = out / "round-1"

    # the gate's own set: one folder, the jointly best candidate of each prompt
    table = ScoreTable.load(round_ / "scores.jsonl")
    joint = select_best_per_prompt(with_joint_scores(table), "none", aspects=[JOINT]).aspects[JOINT].kept
    entries = read_manifest(round_ / "gate_set")
    assert sorted(e.source for e in entries) == sorted(table.image_ids[row] for row in joint)
    assert {e.file.split("/")[0] for e in entries} == {"1_joint"}
    # the gates: [gate] trained on that set, the variant with its own form
    mol = read_mol(round_ / "loras" / "mixture.mol.safetensors")
    assert (mol.gate.granularity, mol.gate.kind) == ("layer", "sigmoid") and mol.training["dataset"] == "gate_set"
    variant = read_mol(round_ / "loras" / "mixture-token.mol.safetensors")
    assert (variant.gate.granularity, variant.gate.kind, variant.gate.timestep_knots) == ("token", "softmax_n", 2)
    # [lora_aspects]: the lowlevel LoRA trained 3 steps, aesthetics 2
    steps = {}
    for aspect in ("aesthetics", "lowlevel"):
        (log,) = (round_ / "runs").glob(f"{aspect}-*/train_log.jsonl")
        steps[aspect] = [json.loads(line) for line in log.read_text().splitlines() if '"done"' in line][-1]["step"]
    assert steps == {"aesthetics": 2, "lowlevel": 3}

    # the uniform weight: the best validation score of the weights tried, on the validation prompts
    search = json.loads((round_ / "eval" / "uniform_search" / "search.json").read_text())
    assert set(search["scores"]) == {"0.5", "1"} and search["validation_prompts"] == config.validation_prompts()
    assert search["chosen"] == max((0.5, 1.0), key=lambda w: search["scores"][f"{w:g}"])
    assert search["reused"] == {"0.5": "merge", "1": "sum"}  # 1/N and 1 are the merge and the sum, already sampled
    uniform_run = json.loads((round_ / "eval" / "uniform" / "generation.json").read_text())
    assert {lora["weight"] for lora in uniform_run["adapters"]["loras"]} == {search["chosen"]}

    # the report: test prompts only, shares keyed by aspect, the gates against every baseline
    evaluation = read_report(round_ / "report")["evaluation"]
    validation = config.validation_prompts()
    assert len(validation) == 1 and evaluation["validation"]["prompts"] == validation
    assert validation[0] not in evaluation["prompts"]
    assert set(evaluation["share_of_own_gain"]) == {"aesthetics", "lowlevel"}
    assert set(evaluation["share_of_own_gain"]["aesthetics"]) == {"merge", "sum", "uniform", "ties", "gated",
                                                                  "gated:token"}
    pairs = {(c["variant"], c["reference"]) for c in evaluation["comparisons"].values()}
    assert pairs == {(g, b) for g in ("gated", "gated:token") for b in ("merge", "sum", "uniform", "ties")}
    assert evaluation["best_baseline"] == max(("merge", "sum", "uniform", "ties"),
                                              key=lambda b: evaluation["normalised"][b]["validation"])
    for entry in evaluation["normalised"].values():
        assert np.isfinite(entry["validation"]) and len(entry["test"]["diff_ci"]) == 2

    # another [gate] setting: the gates and everything reading them are redone, the LoRAs are not
    again = run_loop(make_config(model, out, balance_weight=0.5), overwrite=True, show_progress=False)
    ran = {record.step for record in again.steps if record.status == "ran"}
    assert "round-1/gate" in ran and "round-1/gate/token" in ran and "round-1/evaluate/gated" in ran
    assert not {step for step in ran if "/train/" in step or step.endswith(("filter", "gate_set"))}
