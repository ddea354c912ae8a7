"""Two rounds of ``versat2i loop`` with generation-time latents, on a tiny SD1.5 model (CPU, offline).

One aspect (so no gate: ~30 s), 2 prompts x 2 candidates, LoRA trainings of 2 steps (real training
processes). What is checked:

* round 2 samples its candidates with round 1's LoRA and with seeds no earlier round used, trains
  its own LoRA from them, and writes its own report; ``summary.json`` lists both reports;
* ``[dataset] save_latents``: every candidate has its latents file, carrying the checkpoint hash;
  the training set holds the kept images' latents (the same tensors), and the LoRA trainer used
  them instead of encoding the images again (its log says how many it reused);
* a second run of the finished folder skips every step of both rounds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
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
from versat2i.loop.run import SUMMARY_FILE, run_loop
from versat2i.training_set.layout import LATENTS_SUFFIX
from versat2i.training_set.manifest import read_manifest

PROMPTS = ("a red circle", "a blue square")
K = 2
LORA = {"resolution": 64, "bucket_step": 64, "rank": 2, "alpha": 2.0, "train_batch_size": 2, "max_train_steps": 2,
        "checkpointing_steps": 100, "learning_rate": 1e-3, "mixed_precision": "no", "cache_latents": True,
        "cache_text_embeddings": True, "seed": 5}


def candidate_seeds(folder: Path) -> list[int]:
    return [json.loads(line)["seed"] for line in (folder / "candidates.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
def test_two_rounds_with_generation_latents(tmp_path):
    model = build_tiny_sd15(tmp_path / "tiny")
    out = tmp_path / "run"
    config = LoopConfig(
        name="rounds", output_dir=str(out), rounds=2, device="cpu", dtype="float32",
        model=ModelSection(base_model=str(model.folder)),
        prompts=PromptsSection(train=PROMPTS, held_out=("a green triangle",), candidates_per_prompt=K, seed=3),
        generation=GenerationConfig(steps=2, guidance_scale=1.0, batch_size=2),
        aspects={"aesthetics": "analytic:contrast"},
        dataset=DatasetSection(save_latents=True),
        lora=dict(LORA),
        training=TrainingSection(cpu=True),
        evaluation=EvaluationSection(seeds_per_prompt=2, resamples=100),
    )
    result = run_loop(config, show_progress=False)
    rounds = [out / "round-1", out / "round-2"]

    # -- two rounds, the second sampled with the first one's LoRA ------------------------------------
    assert [r.number for r in result.rounds] == [1, 2]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [report["round"] for report in summary["reports"]] == [1, 2]
    for folder in rounds:
        assert (folder / "report" / "report.html").is_file() and (folder / "loras" / "aesthetics.safetensors").is_file()
    first, second = (json.loads((folder / "candidates" / "generation.json").read_text()) for folder in rounds)
    assert first["adapters"] is None
    assert ([Path(lora["path"]) for lora in second["adapters"]["loras"]]
            == [rounds[0] / "loras" / "aesthetics.safetensors"])
    seeds_1, seeds_2 = candidate_seeds(rounds[0] / "candidates"), candidate_seeds(rounds[1] / "candidates")
    assert len(seeds_2) == len(PROMPTS) * K and not set(seeds_1) & set(seeds_2)
    lora_1, lora_2 = (load_file(str(folder / "loras" / "aesthetics.safetensors")) for folder in rounds)
    assert any(not torch.equal(lora_1[key], lora_2[key]) for key in lora_1)  # trained again, on new data

    # -- generation latents: written, carried into the training set, reused by the trainer ------------
    for folder in rounds:
        candidates, training_set = folder / "candidates", folder / "training_set"
        latents_files = sorted(candidates.glob(f"*{LATENTS_SUFFIX}"))
        assert len(latents_files) == len(PROMPTS) * K
        with safe_open(str(latents_files[0]), framework="pt") as handle:
            assert len(handle.metadata()["vae_sha256"]) == 64
        kept = read_manifest(training_set)
        assert len(kept) == len(PROMPTS)  # the best of K per prompt (no threshold)
        for entry in kept:
            copied = training_set / Path(entry.file).with_suffix("").with_suffix(LATENTS_SUFFIX)
            original = candidates / f"{Path(entry.file).stem}{LATENTS_SUFFIX}"
            assert torch.equal(load_file(str(copied))["latents"], load_file(str(original))["latents"])
        (train_log,) = (folder / "runs").glob("aesthetics-*/train_output.log")
        match = re.search(r"cached latents for (\d+) images \((\d+) reused from generation\)", train_log.read_text())
        assert match is not None and match.group(1) == match.group(2) == str(len(kept))

    # -- a finished two-round folder: nothing to do --------------------------------------------------
    again = run_loop(config, show_progress=False)
    assert {record.step.split("/")[0] for record in again.steps} == {"round-1", "round-2"}
    assert all(record.status == "skipped" for record in again.steps)


def test_a_scorer_weight_file_replaced_under_the_same_name_redoes_scoring(tmp_path):
    """The score step's fingerprint covers the scorers' weight folders ([scoring] models_dir): the
    scores depend on the weights, not only on the scorer's name."""
    from versat2i.loop.config import ScoringSection
    from versat2i.loop.run import Ledger, LoopRound
    from versat2i.loop.stages import build_scorers

    model = build_tiny_sd15(tmp_path / "tiny")
    weights = tmp_path / "scorer-weights" / "aesthetic" / "predictor.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"first weights")
    out = tmp_path / "run"
    out.mkdir()
    config = LoopConfig(
        output_dir=str(out), device="cpu", dtype="float32", model=ModelSection(base_model=str(model.folder)),
        prompts=PromptsSection(train=PROMPTS, held_out=("a green triangle",), candidates_per_prompt=K),
        generation=GenerationConfig(steps=1, guidance_scale=1.0, batch_size=4),
        aspects={"aesthetics": "analytic:contrast"},
        scoring=ScoringSection(models_dir=(str(weights.parent.parent),)),
    )
    ledger = Ledger(out)
    round_ = LoopRound(config, 1, ledger, scorers=lambda: build_scorers(config), previous=None, show_progress=False)
    round_.generate()
    round_.score()
    round_.score()
    weights.write_bytes(b"other weights")  # same name, same size, new content (and mtime)
    round_.score()
    assert [(r.step, r.status) for r in ledger.records] == [
        ("round-1/generate", "ran"), ("round-1/score", "ran"), ("round-1/score", "skipped"), ("round-1/score", "ran")]


def test_the_step_table_labels_summed_step_times_and_the_wall_time_apart():
    from versat2i.loop.run import LoopResult, StepRecord

    steps = [StepRecord("round-1/generate", "skipped", 0.0, 50.0),
             StepRecord("round-1/train/a", "ran", 30.0, 30.0), StepRecord("round-1/train/b", "ran", 40.0, 40.0)]
    table = LoopResult(output_dir=None, rounds=[], steps=steps, seconds=45.5).timing_table()
    rows = table.split("\n\n")[0].splitlines()
    assert rows[2] == "| round-1/generate | skipped | 50.0 s |"
    assert rows[-2] == "| sum of step times | 70.0 s | 120.0 s |"  # two trainings side by side: more than the wall
    assert rows[-1] == "| **wall time of this run** | **45.5 s** | |"
    assert "side by side" in table.split("\n\n")[1]
