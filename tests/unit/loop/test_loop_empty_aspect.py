"""``versat2i loop`` when one aspect keeps no image (its threshold keeps nothing, as geometry does when
no candidate shows a person): the run goes on without it. Tiny SD1.5 model on the CPU, offline.

Three aspects, one with an absolute threshold no score reaches. What is checked: the training set
records the aspect with no image (and no folder); LoRAs are trained for the other two and the gate
mixes exactly those; the evaluation has no variant for the missing aspect and the report names it;
a second run skips every step (the missing aspect is not "unfinished").
"""

from __future__ import annotations

import json

from tiny_models.sd import build_tiny_sd15

from versat2i.loop.config import (
    EvaluationSection,
    GenerationConfig,
    LoopConfig,
    ModelSection,
    PromptsSection,
    TrainingSection,
)
from versat2i.loop.report import read_report
from versat2i.loop.run import run_loop
from versat2i.trainer.mol_file import read_mol
from versat2i.training_set.manifest import empty_aspects, read_training_set

TRAINING = {"resolution": 64, "bucket_step": 64, "rank": 2, "alpha": 2.0, "train_batch_size": 2,
            "max_train_steps": 2, "checkpointing_steps": 100, "learning_rate": 1e-3, "mixed_precision": "no",
            "cache_latents": True, "cache_text_embeddings": True, "seed": 5}


def test_an_aspect_that_keeps_no_image_is_left_out_and_the_gate_mixes_the_rest(tmp_path):
    model = build_tiny_sd15(tmp_path / "tiny")
    out = tmp_path / "run"
    config = LoopConfig(
        name="empty-aspect", output_dir=str(out), device="cpu", dtype="float32",
        model=ModelSection(base_model=str(model.folder)),
        prompts=PromptsSection(train=("a red circle", "a blue square"), held_out=("a green triangle",),
                               candidates_per_prompt=2, seed=3),
        generation=GenerationConfig(steps=2, guidance_scale=1.0, batch_size=2),
        # analytic:exposure scores in 0..1: no candidate reaches 1000
        aspects={"aesthetics": "analytic:contrast", "geometry": "analytic:exposure", "lowlevel": "analytic:sharpness"},
        thresholds={"geometry": 1000.0},
        lora=dict(TRAINING),
        gate={"max_train_steps": 2, "learning_rate": 1e-2},
        training=TrainingSection(cpu=True),
        evaluation=EvaluationSection(seeds_per_prompt=2, resamples=100, variants=("base", "lora", "merge", "gated")),
    )
    result = run_loop(config, show_progress=False)
    round_1 = out / "round-1"

    training_set = read_training_set(round_1 / "training_set")
    assert set(empty_aspects(round_1 / "training_set")) == {"geometry"}
    assert {entry.aspect for entry in training_set.entries} == {"aesthetics", "lowlevel"}
    assert not list((round_1 / "training_set").glob("*_geometry"))

    loras = round_1 / "loras"
    assert (loras / "aesthetics.safetensors").is_file() and (loras / "lowlevel.safetensors").is_file()
    assert not (loras / "geometry.safetensors").exists()
    assert list(read_mol(loras / "mixture.mol.safetensors").aspects) == ["aesthetics", "lowlevel"]

    variants = json.loads((round_1 / "eval" / "variants.json").read_text())
    names = [v["name"] for v in variants["variants"]]
    assert names == ["base", "lora:aesthetics", "lora:lowlevel", "merge", "gated"]
    assert set(variants["config"]["not_trained"]) == {"geometry"}
    report = read_report(round_1 / "report")
    assert "Not trained" in report["markdown"] and "'geometry' kept no image" in report["markdown"]
    assert "geometry" in (round_1 / "report" / "report.html").read_text() and "Not trained" in result.markdown

    again = run_loop(config, show_progress=False)
    assert all(record.status == "skipped" for record in again.steps)
