"""Aesthetics: the LAION "improved aesthetic predictor" (``laion-aesthetic-v2``).

An MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts between the first layers) on the
L2-normalised OpenAI CLIP ViT-L/14 image embedding, trained on SAC + LAION-Logos + AVA ratings;
the score reads like a 1-10 rating (LAION-Aesthetics "6+" images score >= 6). The published state
dict ``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}.{weight,bias}``) loads as is.
The CLIP embedding comes from the backbone shared with ``clip-score`` and ``clip-iqa``.

Files: ``aesthetic/sac+logos+ava1-l14-linearMSE.pth`` + ``clip/open_clip_model.safetensors``
(see ``weights.py``). Options: ``clip_architecture``, ``clip_weights``, ``aesthetic_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..safe_io import sha256_file
from .base import ScoringBatch
from .cache import MODELS, stamp_files
from .clip_backbone import OpenClipBackbone, OpenClipScorer, backbone_from_options
from .registry import ScorerOptions
from .weights import LAION_AESTHETIC_MLP, WeightsFormatError, describe_load_failure, find_weights, load_state_dict


class AestheticMLP(nn.Module):
    """The predictor's MLP, with the layer indices of the published state dict. Written here
    because the package that ships it (simple-aesthetics-predictor) pins transformers < 5."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_mlp(path: Path) -> AestheticMLP:
    """Read the published state dict (strict: every key and shape must match)."""
    state = load_state_dict(path, source_hint=LAION_AESTHETIC_MLP.source_hint)
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise WeightsFormatError(
            f"weight file {path} is not the LAION aesthetic MLP (no 'layers.0.weight'; keys: "
            f"{', '.join(list(state)[:6])}...); get it from {LAION_AESTHETIC_MLP.source_hint}"
        )
    mlp = AestheticMLP(input_size=int(first.shape[1]))
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise describe_load_failure(path, "the LAION aesthetic MLP (768-1024-128-64-16-1)", exc,
                                    LAION_AESTHETIC_MLP.source_hint) from exc
    mlp.weights_sha256 = sha256_file(path)  # of the file as loaded
    return mlp.eval().requires_grad_(False)


class LaionAestheticScorer(OpenClipScorer):
    scorer_id = "laion-aesthetic-v2"
    aspect = "aesthetics"

    def __init__(self, backbone: OpenClipBackbone, mlp: AestheticMLP, mlp_path: Path, *,
                 device: torch.device | str = "cpu"):
        if mlp.input_size != backbone.embed_dim:
            raise ValueError(
                f"the aesthetic MLP {mlp_path.name} reads {mlp.input_size}-d CLIP embeddings but the CLIP "
                f"backbone {backbone.architecture} ({backbone.weights_path.name}) gives {backbone.embed_dim}-d; "
                "use OpenAI CLIP ViT-L/14 (the default)"
            )
        super().__init__(backbone, device=device, extra_weights={mlp_path: mlp.weights_sha256})
        self.mlp = mlp

    def modules(self) -> list[nn.Module]:
        return [self.mlp]

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        embeddings = self.backbone.image_embeddings(batch).to(self.device)
        return self.mlp(embeddings).squeeze(-1)


def make_scorer(options: ScorerOptions) -> LaionAestheticScorer:
    options.check_extra(("clip_architecture", "clip_weights", "aesthetic_weights"), LaionAestheticScorer.scorer_id)
    # Find both files before loading either, so a missing one fails in milliseconds.
    mlp_path = find_weights(LAION_AESTHETIC_MLP, options.search_dirs, override=options.extra.get("aesthetic_weights"))
    backbone = backbone_from_options(options)
    mlp = MODELS.get_or_load(("laion-aesthetic-mlp", str(mlp_path.resolve())), lambda: load_aesthetic_mlp(mlp_path),
                             stamp=stamp_files([mlp_path]))
    return LaionAestheticScorer(backbone, mlp, mlp_path, device=options.device)
