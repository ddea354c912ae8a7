"""A small evaluation folder for report tests: one sub-folder per variant with 16 px PNGs,
candidates.jsonl and scores.jsonl on a 3 prompts x 4 seeds grid, plus variants.json. No models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS = [100, 101, 102, 103]
SCORERS = {"alignment": {"id": "demo:alignment", "weights_hash": "analytic"},
           "lowlevel": {"id": "demo:lowlevel", "weights_hash": "analytic"}}


def write_variant(folder: Path, scores: dict[str, np.ndarray], *, seed: int, brightness: float = 0.5) -> None:
    """One variant: PNGs, candidates.jsonl and scores.jsonl on the PROMPTS x SEEDS grid."""
    from PIL import Image

    from versat2i.loop.generate import INDEX_NAME, CandidateRecord
    from versat2i.rewards.score_table import ScoreTable
    from versat2i.training_set.layout import entry_id

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    records = []
    for p, prompt in enumerate(PROMPTS):
        for c, image_seed in enumerate(SEEDS):
            image_id = entry_id(p, c)
            pixels = np.clip(brightness + rng.normal(0, 0.2, (16, 16, 3)), 0, 1)
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{image_id}.png")
            records.append(CandidateRecord(prompt=prompt, seed=image_seed, prompt_index=p, candidate_index=c,
                                           image_id=image_id, file=f"{image_id}.png"))
    (folder / INDEX_NAME).write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    ScoreTable.from_scores({a: np.asarray(v).reshape(-1).tolist() for a, v in scores.items()}, SCORERS,
                           [r.prompt for r in records], seeds=[r.seed for r in records],
                           image_ids=[r.file for r in records]).save(folder / "scores.jsonl")


def write_eval_dir(root: Path) -> Path:
    """base, lora:alignment (+0.3 alignment on every pair, slightly lower lowlevel), merge (noise)."""
    rng = np.random.default_rng(0)
    base = {a: rng.normal(0.5, 0.1, (3, 4)) for a in SCORERS}
    lora = {"alignment": base["alignment"] + 0.3, "lowlevel": base["lowlevel"] - rng.uniform(0, 0.01, (3, 4))}
    merge = {a: v + rng.normal(0, 0.05, (3, 4)) for a, v in base.items()}
    write_variant(root / "base", base, seed=1)
    write_variant(root / "lora_alignment", lora, seed=2, brightness=0.6)
    write_variant(root / "merge", merge, seed=3)
    variants = {"base": "base", "config": {"round": 1, "k": 4},
                "variants": [{"name": "base", "dir": "base"},
                             {"name": "lora:alignment", "dir": "lora_alignment", "label": "LoRA alignment"},
                             {"name": "merge", "dir": "merge", "kind": "merge"}]}
    (root / "variants.json").write_text(json.dumps(variants))
    return root
