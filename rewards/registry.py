"""Scorer names -> factories, and the default scorer of each aspect.

A scorer is named ``<id>`` or ``<id>:<variant>`` (``pyiqa:musiq``, ``analytic:sharpness``). The
registry maps the id to ``module:function``; modules are imported only when a scorer is built, so
an optional extra that is not installed (pyiqa, mediapipe) only fails when asked for, with an
ImportError naming the extra.

Every factory has the signature ``factory(options: ScorerOptions) -> Scorer``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .base import ASPECTS, Scorer


@dataclass(frozen=True)
class ScorerOptions:
    """What every factory gets. ``search_dirs``: folders searched for weight files (ComfyUI's
    ``models/versat2i`` folders, or ``--models-dir`` in the CLI); ``variant``: the part after ':'."""

    search_dirs: tuple[Path, ...] = ()
    device: str = "cpu"
    variant: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScorerEntry:
    factory: str  # "module:function", relative to this package
    aspect: str  # the aspect this scorer measures by default
    summary: str
    needs: str = ""  # extra / weights it needs, for listings and error messages
    variants: Sequence[str] = ()  # known variants (free-form variants may still be accepted)


SCORERS: dict[str, ScorerEntry] = {
    "laion-aesthetic-v2": ScorerEntry(
        ".aesthetic_laion:make_scorer", "aesthetics",
        "LAION improved aesthetic predictor (MLP on CLIP ViT-L/14 image embeddings)",
        needs="weights: clip ViT-L/14 + sac+logos+ava1-l14-linearMSE.pth",
    ),
    "clip-score": ScorerEntry(
        ".clip_score:make_scorer", "alignment",
        "CLIP score: 100 * cosine(image, prompt) on CLIP ViT-L/14, floored at 0",
        needs="weights: clip ViT-L/14",
    ),
    "hps-v2.1": ScorerEntry(
        ".hps:make_scorer", "alignment", "Human Preference Score v2.1 (open_clip ViT-H-14)",
        needs="weights: HPS_v2.1_compressed.pt",
    ),
    "pickscore-v1": ScorerEntry(
        ".pickscore:make_scorer", "alignment", "PickScore v1 (transformers CLIP ViT-H-14)",
        needs="weights: PickScore_v1 + CLIP-ViT-H-14 processor folders",
    ),
    "clip-iqa": ScorerEntry(
        ".clip_iqa:make_scorer", "lowlevel",
        "CLIP-IQA-style antonym prompts on the shared CLIP backbone (permissive licence)",
        needs="weights: clip ViT-L/14",
    ),
    "pyiqa": ScorerEntry(
        ".pyiqa_metric:make_scorer", "lowlevel",
        "any pyiqa no-reference metric by name, e.g. pyiqa:musiq, pyiqa:topiq_nr (non-commercial licence)",
        needs="extra: pip install 'comfyui-versat2i[iqa]' + the metric's weight file",
        variants=("musiq", "topiq_nr"),
    ),
    "mediapipe-anatomy": ScorerEntry(
        ".mediapipe_anatomy:make_scorer", "geometry",
        "hand and body landmark plausibility from MediaPipe",
        needs="extra: pip install 'comfyui-versat2i[geometry]'",
    ),
    "analytic": ScorerEntry(
        ".analytic:make_scorer", "lowlevel",
        "weight-free image statistics: analytic:sharpness, :contrast, :colourfulness, :brightness, :noise",
        variants=("sharpness", "contrast", "colourfulness", "brightness", "noise"),
    ),
    "demo": ScorerEntry(
        "..demo.rewards:make_scorer", "alignment",
        "the embedded demo world's analytic rewards: demo:alignment, :geometry, :aesthetics, :lowlevel",
        variants=("alignment", "geometry", "aesthetics", "lowlevel"),
    ),
}

# The scorer used for an aspect when none is named. Low-level quality defaults to the permissively
# licensed CLIP-IQA variant: pyiqa (MUSIQ / TOPIQ-NR) is opt-in because of its licence.
DEFAULT_SCORERS: dict[str, str] = {
    "aesthetics": "laion-aesthetic-v2",
    "alignment": "clip-score",
    "geometry": "mediapipe-anatomy",
    "lowlevel": "clip-iqa",
}
assert set(DEFAULT_SCORERS) == set(ASPECTS)


def split_name(name: str) -> tuple[str, str | None]:
    base, _, variant = name.strip().partition(":")
    return base, (variant or None)


def list_scorers() -> list[str]:
    names = []
    for scorer_id, entry in SCORERS.items():
        names.extend([f"{scorer_id}:{v}" for v in entry.variants] if entry.variants else [scorer_id])
    return names


def get_scorer(
    name: str,
    *,
    search_dirs: Sequence[str | Path] = (),
    device: str = "cpu",
    **extra,
) -> Scorer:
    """Build the scorer called ``name`` (see ``list_scorers()``). Weight files are looked up in
    ``search_dirs``; a missing file raises ``MissingWeightsError`` naming the file and folders."""
    scorer_id, variant = split_name(name)
    entry = SCORERS.get(scorer_id)
    if entry is None:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(list_scorers())}")
    module_name, _, function_name = entry.factory.partition(":")
    module = importlib.import_module(module_name, __package__)
    options = ScorerOptions(
        search_dirs=tuple(Path(d) for d in search_dirs), device=device, variant=variant, extra=dict(extra)
    )
    return getattr(module, function_name)(options)
