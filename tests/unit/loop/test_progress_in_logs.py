"""With its output going to a pipe (a log file, CI), ``versat2i loop`` still tells how far each long
stage is: tqdm turns itself off there, and ``progress.Progress`` logs plain lines instead. And the
libraries print nothing that means nothing on this machine (no warning line at all: the float32
cast, "No LoRA keys associated to CLIPTextModel", bitsandbytes' Hub kernel look-up).

A whole loop on a tiny SD1.5 model (random weights), run as a user runs it: a ``versat2i loop``
process whose stdout and stderr are a pipe. ``VERSAT2I_PROGRESS_SECONDS=0`` logs every update, so
every stage shows up however fast this machine is (the 10 s default is tested in test_progress.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from tiny_models.sd import build_tiny_sd15

from versat2i.loop.config import (
    EvaluationSection,
    GenerationConfig,
    LoopConfig,
    ModelSection,
    PromptsSection,
    TrainingSection,
)

pytestmark = pytest.mark.slow

TRAINING = {"resolution": 64, "bucket_step": 64, "rank": 2, "alpha": 2.0, "train_batch_size": 2,
            "max_train_steps": 4, "checkpointing_steps": 100, "mixed_precision": "no", "cache_latents": True,
            "cache_text_embeddings": True}


def test_every_long_stage_prints_progress_lines_into_a_pipe(tmp_path):
    tiny = build_tiny_sd15(tmp_path / "tiny")
    config = LoopConfig(
        name="progress", output_dir=str(tmp_path / "run"), device="cpu", dtype="float32",
        model=ModelSection(base_model=str(tiny.folder)),
        prompts=PromptsSection(train=("a red circle", "a blue square"), held_out=("a green triangle",),
                               candidates_per_prompt=2, seed=3),
        generation=GenerationConfig(steps=2, guidance_scale=1.0, batch_size=1),
        # one aspect: one training process (the gate's progress goes through the same trainer events)
        aspects={"aesthetics": "analytic:contrast"},
        lora=dict(TRAINING),
        training=TrainingSection(cpu=True),
        evaluation=EvaluationSection(seeds_per_prompt=2, resamples=100, variants=("base", "lora")),
    )
    config.save(tmp_path / "loop.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VERSAT2I_PROGRESS_SECONDS": "0"}
    result = subprocess.run([sys.executable, "-m", "versat2i.cli", "loop", "--config", str(tmp_path / "loop.toml")],
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.removeprefix("INFO versat2i.progress: ") for line in result.stderr.splitlines()
             if line.startswith("INFO versat2i.progress: ")]
    labels = {re.match(r"(.+?): \d+", line).group(1) for line in lines}
    assert labels == {"generate", "score", "write training set", "train LoRA aesthetics", "evaluate base: generate",
                      "evaluate base: score", "evaluate lora:aesthetics: generate",
                      "evaluate lora:aesthetics: score"}, lines
    # counts, a share and the time; the last line of each stage says it is complete
    assert "generate: 1/4 img (25%), " in lines[0]
    assert "generate: 4/4 img (100%)" in "\n".join(lines)
    assert any(re.fullmatch(r"train LoRA aesthetics: 4/4 step \(100%\), \d+ s in all, loss [\d.]+",
                            line) for line in lines)
    assert not re.search(r"\r|\x1b\[", result.stderr), "a progress bar was drawn into a pipe"
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if re.search(r"warn", line, re.I)]
    assert warnings == [], warnings
