"""Low-level quality without pyiqa: CLIP-IQA-style antonym prompts (``clip-iqa``).

CLIP-IQA (Wang, Chan & Loy, AAAI 2023) rates an image by how much closer it is to "Good photo."
than to "Bad photo." in CLIP space:

    clip_iqa(image) = mean over pairs (p, n) of softmax(100 * [cos(I, T_p), cos(I, T_n)])[0]

a probability in 0..1 computed per image over its own prompt pair only (never a softmax across the
batch), so a score does not depend on the other images. The factor 100 is CLIP's logit scale, fixed
as in the paper. Unlike the paper (ResNet-50 CLIP without positional embedding, at the image's own
resolution) it runs on the shared ViT-L/14 backbone at 224 px, so it reuses the image embedding the
aesthetics and alignment scorers compute anyway, and it is permissively licensed (open_clip is MIT,
the OpenAI weights MIT), unlike pyiqa (PolyForm-Noncommercial). It measures overall perceived
quality, not pixel-level defects at full resolution: use ``pyiqa:musiq`` / ``pyiqa:topiq_nr``
where their licence is acceptable.

Option ``prompt_pairs``: a list of ``[positive, negative]`` pairs to average, e.g.
``[["Sharp photo.", "Blurry photo."], ["Clean photo.", "Noisy photo."]]`` (the paper's antonyms for
single attributes). Default: ``[["Good photo.", "Bad photo."]]``. Custom pairs change the scorer
id to ``clip-iqa:prompts-<8 hex of their sha256>``, so manifests tell the two apart. Also ``clip_architecture``,
``clip_weights``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from .base import ScoringBatch
from .clip_backbone import OpenClipBackbone, OpenClipScorer, backbone_from_options
from .registry import ScorerOptions

DEFAULT_PROMPT_PAIRS: tuple[tuple[str, str], ...] = (("Good photo.", "Bad photo."),)
LOGIT_SCALE = 100.0


def check_prompt_pairs(pairs) -> tuple[tuple[str, str], ...]:
    try:
        checked = tuple((str(positive), str(negative)) for positive, negative in pairs)
    except (TypeError, ValueError):
        raise ValueError(
            f"clip-iqa prompt_pairs: expected a list of [positive, negative] prompt pairs, got {pairs!r}"
        ) from None
    if not checked or any(not p.strip() or not n.strip() for p, n in checked):
        raise ValueError(f"clip-iqa prompt_pairs: need at least one pair of non-empty prompts, got {pairs!r}")
    return checked


class ClipIqaScorer(OpenClipScorer):
    scorer_id = "clip-iqa"
    aspect = "lowlevel"

    def __init__(self, backbone: OpenClipBackbone, *, prompt_pairs: Sequence[Sequence[str]] = DEFAULT_PROMPT_PAIRS,
                 device: torch.device | str = "cpu"):
        super().__init__(backbone, device=device)
        self.prompt_pairs = check_prompt_pairs(prompt_pairs)
        if self.prompt_pairs != DEFAULT_PROMPT_PAIRS:
            # Other prompts measure something else: an id of its own, stable for the same prompts.
            digest = hashlib.sha256(json.dumps(self.prompt_pairs).encode()).hexdigest()[:8]
            self.scorer_id = f"clip-iqa:prompts-{digest}"

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        images = self.backbone.image_embeddings(batch)  # [B, D]
        positive = self.backbone.text_embeddings([p for p, _ in self.prompt_pairs])  # [P, D]
        negative = self.backbone.text_embeddings([n for _, n in self.prompt_pairs])
        logits = LOGIT_SCALE * torch.stack([images @ positive.T, images @ negative.T], dim=-1)  # [B, P, 2]
        return logits.softmax(dim=-1)[..., 0].mean(dim=-1)


def make_scorer(options: ScorerOptions) -> ClipIqaScorer:
    options.check_extra(("clip_architecture", "clip_weights", "prompt_pairs"), ClipIqaScorer.scorer_id)
    pairs = options.extra.get("prompt_pairs", DEFAULT_PROMPT_PAIRS)
    pairs = check_prompt_pairs(pairs)  # before loading the backbone: a bad option fails fast
    return ClipIqaScorer(backbone_from_options(options), prompt_pairs=pairs, device=options.device)
