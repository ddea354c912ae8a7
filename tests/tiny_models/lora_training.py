"""Tiny kohya training sets and LoRA training configs for the trainer tests (offline, seconds).

Images are smooth coloured shapes (not noise) so a LoRA can measurably overfit them in a few dozen
steps on a tiny random-weight model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from versat2i.training_set.layout import CAPTION_SUFFIX, MANIFEST_NAME, entry_id, repeats_folder

TINY_SIZE = 64


def shape_image(index: int, size: tuple[int, int] = (TINY_SIZE, TINY_SIZE)) -> Image.Image:
    """A smooth, distinct RGB image per ``index``: a coloured disc on a gradient."""
    width, height = size
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0.1, 0.9, size=3)
    gradient = (xx / max(width - 1, 1))[..., None] * rng.uniform(-0.3, 0.3, size=3)
    cx, cy, radius = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, rng.uniform(0.15, 0.3) * min(size)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2)[..., None] * (rng.uniform(0, 1, size=3) - base)
    pixels = np.clip(base + gradient + disc, 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def make_kohya_dataset(root: Path, *, aspects: dict[str, int] | None = None, images_per_aspect: int = 4,
                       sizes: list[tuple[int, int]] | None = None, manifest: bool = True) -> Path:
    """``root/<repeats>_<aspect>/img<i>.png + .txt`` (+ a manifest.jsonl in the versat2i format)."""
    aspects = aspects or {"aesthetics": 5}
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for aspect, repeats in aspects.items():
        folder = root / repeats_folder(repeats, aspect)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_aspect):
            size = sizes[i % len(sizes)] if sizes else (TINY_SIZE, TINY_SIZE)
            image_id = entry_id(i, 0)
            shape_image(i, size).save(folder / f"{image_id}.png")
            caption = f"a picture of shape number {i}"
            (folder / f"{image_id}{CAPTION_SUFFIX}").write_text(caption, encoding="utf-8")
            rows.append({
                "id": image_id, "aspect": aspect, "file": f"{folder.name}/{image_id}.png", "caption": caption,
                "prompt": caption, "seed": i, "prompt_index": i, "candidate_index": 0, "score": 1.0,
                "scorer": {"id": "analytic:test", "weights_hash": ""}, "scores": {aspect: 1.0},
                "scorers": {aspect: {"id": "analytic:test", "weights_hash": ""}},
                "threshold": {"kind": "none", "value": None, "resolved": None},
                "width": size[0], "height": size[1],
            })
    if manifest:
        (root / MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def tiny_lora_config(tmp: Path, base_model: Path, dataset: Path, **overrides):
    """A LoraTrainConfig for the tiny model: 64 px, rank 4, batch 2, fp32 on CPU."""
    from versat2i.trainer.config import LoraTrainConfig

    settings = dict(
        base_model=str(base_model), dataset_dir=str(dataset), aspect="aesthetics",
        output_dir=str(tmp / "loras"), output_name="versat2i/tiny", work_dir=str(tmp / "run"),
        resolution=TINY_SIZE, bucket_step=TINY_SIZE, rank=4, alpha=4.0, train_batch_size=2,
        learning_rate=2e-3, max_train_steps=12, checkpointing_steps=4, mixed_precision="no", seed=7,
    )
    settings.update(overrides)
    return LoraTrainConfig(**settings)
