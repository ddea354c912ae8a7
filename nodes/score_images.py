"""Score Images: score every image of a batch for every loaded aspect, with its prompt and seed.

Which prompt belongs to which image (the ``prompts`` text box, one prompt per line, blank lines
skipped):

* as many lines as images: line i is the prompt of image i;
* fewer lines, N, where the batch is N equal groups of K consecutive candidates (K = images / N):
  line j is the prompt of images j*K .. j*K+K-1 -- the layout of "N prompts, K images each"
  (e.g. a batch of 8 made of 2 prompts x 4 seeds);
* anything else is an error naming both counts.

Identical prompt texts are one prompt (their images compete in the filter). Seeds are optional
(``seeds``: numbers separated by commas, spaces or new lines): one number for the whole batch, one
per prompt line, or one per image. A ``candidates`` input (from the candidate generation node)
replaces both text boxes: it carries each image's prompt, seed and indices through to the manifest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..aspects import ASPECTS
from ..rewards.base import Scorer, check_images, score_aspects
from ..rewards.score_table import UNJUDGED_CELL, ScoreTable, image_fingerprints
from .common import Candidates, Scorers, Scores, category, node_id, progress_callback


@dataclass(frozen=True)
class ImageInfo:
    """Per-image prompt, seed and (optional) indices, one entry per image of the batch."""

    prompts: list[str]
    seeds: list[int | None]
    prompt_indices: list[int] | None = None
    candidate_indices: list[int] | None = None
    image_ids: list[str | None] | None = None


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def prompts_per_image(lines: Sequence[str], batch: int) -> list[str]:
    """One prompt per image from N prompt lines (rules in the module docstring)."""
    if not lines:
        raise ValueError(
            "prompts: no prompt given; type the prompt of each image, one per line (or one line per prompt "
            "when the batch holds K candidates of each prompt in a row)"
        )
    if len(lines) == batch:
        return list(lines)
    if len(lines) < batch and batch % len(lines) == 0:
        per_prompt = batch // len(lines)
        return [line for line in lines for _ in range(per_prompt)]
    raise ValueError(
        f"prompts: {len(lines)} prompt line(s) for {batch} image(s); give one line per image, or one line per "
        f"prompt when the batch is made of equal groups of consecutive candidates ({batch} images can't be "
        f"split into {len(lines)} equal groups)"
    )


def seeds_per_image(text: str, batch: int, prompt_count: int) -> list[int | None]:
    """Seeds from text: none, one for the batch, one per prompt line, or one per image."""
    tokens = [t for t in re.split(r"[\s,;]+", text or "") if t]
    seeds = []
    for token in tokens:
        try:
            seeds.append(int(token))
        except ValueError:
            raise ValueError(f"seeds: {token!r} is not a whole number; separate seeds with commas or spaces") from None
    if not seeds:
        return [None] * batch
    if len(seeds) == 1:
        return seeds * batch
    if len(seeds) == batch:
        return seeds
    if len(seeds) == prompt_count and batch % prompt_count == 0:
        per_prompt = batch // prompt_count
        return [seed for seed in seeds for _ in range(per_prompt)]
    raise ValueError(
        f"seeds: {len(seeds)} seeds for {batch} image(s) and {prompt_count} prompt line(s); give one seed for "
        "the whole batch, one per prompt line or one per image (or leave it empty)"
    )


def info_from_candidates(candidates: Any, batch: int) -> ImageInfo:
    """Read the candidate generation node's per-image info (a mapping or an object); every list
    must have one entry per image of the batch (checked before any scoring)."""
    def field(name: str) -> Any:
        return candidates.get(name) if isinstance(candidates, Mapping) else getattr(candidates, name, None)

    prompts = field("prompts")
    if prompts is None or isinstance(prompts, str):
        raise ValueError("candidates: no per-image 'prompts' list; connect the candidate generation node's output")
    optional = {name: (list(field(name)) if field(name) is not None else None)
                for name in ("seeds", "prompt_indices", "candidate_indices", "image_ids")}
    for name, values in {"prompts": list(prompts), **optional}.items():
        if values is not None and len(values) != batch:
            raise ValueError(
                f"candidates: {len(values)} {name} for {batch} image(s); connect the images generated from these "
                "candidates (same batch, same order)"
            )
    return ImageInfo(prompts=list(prompts), seeds=optional["seeds"] or [None] * len(prompts),
                     prompt_indices=optional["prompt_indices"], candidate_indices=optional["candidate_indices"],
                     image_ids=optional["image_ids"])


def image_info(batch: int, prompts: str, seeds: str, candidates: Any = None) -> ImageInfo:
    if candidates is not None:
        return info_from_candidates(candidates, batch)
    lines = prompt_lines(prompts)
    return ImageInfo(prompts=prompts_per_image(lines, batch), seeds=seeds_per_image(seeds, batch, len(lines)))


def check_scorers(scorers: Any) -> dict[str, Scorer]:
    if not isinstance(scorers, Mapping) or not scorers or not all(isinstance(s, Scorer) for s in scorers.values()):
        raise ValueError("scorers: expected the output of Load Scorers (VersaT2I); connect it to this input")
    return dict(scorers)


def score_images(images: torch.Tensor, scorers: Mapping[str, Scorer], info: ImageInfo, *,
                 offload: bool = True) -> ScoreTable:
    """Score a batch for every aspect (with a ComfyUI progress bar that honours Cancel) and
    return the table, with each image's judged flags and pixel fingerprint (Filter and Save check
    that they get these same images); scorers are moved off the accelerator afterwards when
    ``offload``."""
    try:
        scores = score_aspects(scorers, images, info.prompts, progress=progress_callback(images.shape[0]))
    finally:
        if offload:
            for scorer in scorers.values():
                scorer.offload()
    return ScoreTable.from_scores(scores, scorers, info.prompts, seeds=info.seeds, prompt_indices=info.prompt_indices,
                                  candidate_indices=info.candidate_indices, image_ids=info.image_ids,
                                  fingerprints=image_fingerprints(images))


# -- preview ----------------------------------------------------------------------------------------

PREVIEW_MIN_WIDTH = 256


def label_images(images: torch.Tensor, table: ScoreTable) -> torch.Tensor:
    """Copies of the images (upscaled to >= 256 px wide, nearest neighbour) with each image's
    index, prompt/candidate index and scores written in the top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    batch, height, width, _ = images.shape
    scale = min(32, max(1, math.ceil(PREVIEW_MIN_WIDTH / width)))
    size = max(10, (width * scale) // 24)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    labelled = []
    for i in range(batch):
        image = Image.fromarray(pixels[i])
        if scale > 1:
            image = image.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        lines = [f"#{i}  prompt {table.prompt_indices[i]}  cand {table.candidate_indices[i]}"]
        lines += [f"{aspect} {table.scores[aspect][i]:.4g}" if table.judged[aspect][i] else f"{aspect} {UNJUDGED_CELL}"
                  for aspect in table.aspects]
        text = "\n".join(lines)
        draw = ImageDraw.Draw(image, "RGBA")
        _, _, right, bottom = draw.multiline_textbbox((4, 4), text, font=font, spacing=2)
        draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0, 160))
        draw.multiline_text((4, 4), text, font=font, fill=(255, 255, 255, 255), spacing=2)
        labelled.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0))
    return torch.stack(labelled)


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("ScoreImages"),
            display_name="Score Images (VersaT2I)",
            category=category("score"),
            description=(
                "Scores every image for every aspect loaded by Load Scorers. Scores are absolute (an image "
                "scores the same alone or in any batch), so runs can be compared. Prompts: one line per "
                "image, or one line per prompt when the batch holds K consecutive candidates of each prompt."
            ),
            is_output_node=True,  # its preview makes it useful on its own
            inputs=[
                io.Image.Input("images", tooltip="The candidate images (a batch), e.g. from VAE Decode."),
                Scorers.Input("scorers", tooltip="The scorers from Load Scorers (VersaT2I)."),
                io.String.Input(
                    "prompts", multiline=True, default="",
                    tooltip="One prompt per line: a line per image, or a line per prompt when the batch is N "
                            "groups of K consecutive candidates (images = N x K). Blank lines are skipped; "
                            "identical lines are one prompt. Ignored when 'candidates' is connected.",
                ),
                io.String.Input(
                    "seeds", optional=True, default="",
                    tooltip="Optional seeds recorded in the manifest, separated by commas or spaces: one for "
                            "the whole batch, one per prompt line, or one per image. Ignored when "
                            "'candidates' is connected.",
                ),
                Candidates.Input(
                    "candidates", optional=True,
                    tooltip="Per-image prompts, seeds and indices from the candidate generation node; "
                            "replaces the prompts and seeds boxes.",
                ),
                io.Boolean.Input(
                    "offload_after_scoring", optional=True, default=True,
                    tooltip="Move the scorers' models to the CPU after scoring to free GPU memory for "
                            "sampling (they stay loaded and move back on the next run).",
                ),
            ],
            outputs=[
                Scores.Output("scores", display_name="scores",
                              tooltip="Every image's scores with its prompt, seed and the scorer ids; connect "
                                      "to Filter Best Per Prompt."),
                *[
                    io.Float.Output(f"{aspect}_scores", display_name=aspect, is_output_list=True,
                                    tooltip=f"The {aspect} score of each image, as a list in batch order "
                                            "(empty when the aspect is disabled).")
                    for aspect in ASPECTS
                ],
                io.String.Output("table", display_name="table",
                                 tooltip="A readable table: one line per image with its prompt index, "
                                         "candidate, seed and scores."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The images labelled with their scores (upscaled to at least "
                                        f"{PREVIEW_MIN_WIDTH} px wide)."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, scorers: Any, prompts: str, seeds: str = "", candidates: Any = None,
                offload_after_scoring: bool = True) -> io.NodeOutput:
        scorers = check_scorers(scorers)
        images = check_images(images)
        info = image_info(images.shape[0], prompts, seeds, candidates)
        table = score_images(images, scorers, info, offload=offload_after_scoring)
        text = table.to_text()
        preview = label_images(images, table)
        per_aspect = [table.scores.get(aspect, []) for aspect in ASPECTS]
        preview_ui = ui.PreviewImage(preview, cls=cls).as_dict()
        return io.NodeOutput(table, *per_aspect, text, preview, ui={**preview_ui, "text": (text,)})


NODES = [ScoreImages]
