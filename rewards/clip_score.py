"""Text-image alignment: CLIP score (``clip-score``) on the shared CLIP ViT-L/14 backbone.

    clip_score(image, prompt) = 100 * max(cos(E_img(image), E_txt(prompt)), 0)

with E_img / E_txt the CLIP image / text embeddings: torchmetrics' ``CLIPScore`` convention (Hessel
et al. 2021 use 2.5 * max(cos, 0); the ranking is the same). Range 0..100; for OpenAI ViT-L/14 a
well-matched image typically scores in the high 20s to 30s. Prompts longer than CLIP's 77 tokens
are truncated. The image embedding is shared with ``laion-aesthetic-v2`` and ``clip-iqa``; the
prompt's embedding is cached per prompt string.

File: ``clip/open_clip_model.safetensors`` (see ``weights.py``). Options: ``clip_architecture``,
``clip_weights``.
"""

from __future__ import annotations

import torch

from .base import ScoringBatch
from .clip_backbone import OpenClipScorer, backbone_from_options
from .registry import ScorerOptions


class ClipScoreScorer(OpenClipScorer):
    scorer_id = "clip-score"
    aspect = "alignment"
    needs_prompts = True

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        images = self.backbone.image_embeddings(batch)
        texts = self.backbone.text_embeddings(batch.prompts)
        return 100.0 * (images * texts).sum(dim=-1).clamp(min=0.0)


def make_scorer(options: ScorerOptions) -> ClipScoreScorer:
    options.check_extra(("clip_architecture", "clip_weights"), ClipScoreScorer.scorer_id)
    return ClipScoreScorer(backbone_from_options(options), device=options.device)
