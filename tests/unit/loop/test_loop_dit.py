"""``versat2i loop`` on a DiT family from ComfyUI's split files (issue 13): a tiny random-weight
FLUX.2-klein (``tiny_models/dit.py``: diffusion model, Qwen3 text encoder and VAE as separate files),
two analytic aspects, real training processes of a few steps, CPU, offline. The loop generates,
scores, trains one LoRA per aspect and a gate from the three files, and evaluates the base, the
LoRAs, the equal-weight merge and the gated mixture."""

from __future__ import annotations

import pytest
from tiny_models.dit import write_tiny_dit

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

pytestmark = pytest.mark.family

LORA = {"resolution": 64, "bucket_step": 64, "rank": 2, "alpha": 2.0, "train_batch_size": 2, "max_train_steps": 2,
        "checkpointing_steps": 100, "learning_rate": 1e-3, "mixed_precision": "no", "cache_latents": True,
        "cache_text_embeddings": True, "train_feed_forward": True, "seed": 5}


@pytest.mark.slow
def test_the_loop_runs_a_dit_family_from_its_split_files(tmp_path):
    model = write_tiny_dit("flux2-klein", tmp_path / "tiny")
    out = tmp_path / "run"
    config = LoopConfig(
        name="klein", output_dir=str(out), device="cpu", dtype="float32",
        model=ModelSection(base_model=str(model.diffusion_model), text_encoders=tuple(map(str, model.text_encoders)),
                           vae=str(model.vae)),
        prompts=PromptsSection(train=("a red circle", "a blue square"), held_out=("a green triangle", "a red square"),
                               candidates_per_prompt=2, seed=3),
        generation=GenerationConfig(steps=2, guidance_scale=1.0, width=64, height=64, batch_size=4),
        aspects={"aesthetics": "analytic:contrast", "lowlevel": "analytic:sharpness"},
        lora=dict(LORA),
        gate={"max_train_steps": 2, "learning_rate": 1e-2, "granularity": "token", "gate_kind": "softmax_n",
              "mixed_precision": "no", "cache_latents": True, "cache_text_embeddings": True},
        training=TrainingSection(cpu=True, parallel_jobs=1),
        evaluation=EvaluationSection(seeds_per_prompt=2, resamples=100, validation_fraction=0.0,
                                     variants=("base", "lora", "merge", "gated")),
    )
    assert config.problems() == []
    run_loop(config, show_progress=False)
    round_ = out / "round-1"
    mol = read_mol(round_ / "loras" / "mixture.mol.safetensors")
    assert mol.base_model["arch"] == "flux2_klein" and mol.gate.granularity == "token"
    assert any(layer.startswith("transformer.single_transformer_blocks.") for layer in mol.gate.layers)
    assert {path.name for path in (round_ / "loras").glob("*.safetensors")} >= {"aesthetics.safetensors",
                                                                                 "lowlevel.safetensors"}
    evaluation = read_report(round_ / "report")["evaluation"]
    assert {"base", "merge", "gated"} <= set(evaluation["variants"])
