"""Text-image alignment / human preference: HPS v2.1 (``hps-v2.1``), optional.

Human Preference Score v2.1 (Wu et al. 2023) is open_clip ViT-H-14 fine-tuned on human choices
between generated images (HPD v2). Its score is the cosine similarity of the L2-normalised image
and prompt embeddings, as ``hpsv2.score`` returns it (typically 0.2-0.35; higher is preferred).
Images are preprocessed like HPS's evaluation transform: longer side resized to 224 and padded
with black to a square (open_clip's ``resize_mode="longest"``).

Loaded with open_clip directly (the ``hpsv2`` package pins protobuf < 4 and pytest 7.2):
``open_clip.create_model("ViT-H-14", pretrained=<file>)``, which unwraps the checkpoint's
``{"state_dict": ...}`` and reads ``.pt`` with ``weights_only=True``.

File: ``hps/HPS_v2.1_compressed.pt`` (huggingface.co/xswu/HPSv2). Options: ``hps_architecture``,
``hps_weights``.
"""

from __future__ import annotations

import torch

from . import weights
from .base import ScoringBatch
from .clip_backbone import OpenClipScorer, OpenClipSpec, backbone_from_options
from .registry import ScorerOptions

HPS_V2_1_SPEC = OpenClipSpec("ViT-H-14", weights.HPS_V2_1, resize_mode="longest")


class HpsScorer(OpenClipScorer):
    scorer_id = "hps-v2.1"
    aspect = "alignment"
    needs_prompts = True
    accelerator_chunk_size = 8  # ViT-H-14: 2.5x the activations of ViT-L-14

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        images = self.backbone.image_embeddings(batch)
        texts = self.backbone.text_embeddings(batch.prompts)
        return (images * texts).sum(dim=-1)


def make_scorer(options: ScorerOptions) -> HpsScorer:
    options.check_extra(("hps_architecture", "hps_weights"), HpsScorer.scorer_id)
    return HpsScorer(backbone_from_options(options, HPS_V2_1_SPEC, prefix="hps"), device=options.device)
