"""Scorer names -> factories, and the default scorer of each aspect.

A scorer is named ``<id>`` or ``<id>:<variant>`` (``pyiqa:musiq``, ``analytic:sharpness``). The
registry maps the id to ``module:function``; modules are imported only when a scorer is built, so
an optional extra that is not installed (pyiqa, mediapipe) only fails when asked for, with an
ImportError naming the extra.

Every factory has the signature ``factory(options: ScorerOptions) -> Scorer``; it reads its own
options from ``options.extra`` (``get_scorer(name, clip_weights=...)``) and refuses unknown ones with
``options.check_extra``. Options that name a weight file or folder are called ``weights`` or end in
``_weights``, ``_model`` or ``_processor`` (``is_path_option``; the CLI resolves those as paths).
``get_scorer`` caches the scorers it builds (see ``cache.py``): asking again for the same scorer
returns the same object, and scorers on one weight file share one model.

Scorers outside this package (the embedded demo world's, a user's own) join with
``register_scorer``; this module names none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..aspects import ASPECTS
from . import cache as scorer_cache
from .base import Scorer
from .weights import CLIP_VIT_L_14_OPENAI, LAION_AESTHETIC_MLP, WeightFile, resolve_search_dirs


@dataclass(frozen=True)
class ScorerOptions:
    """What every factory gets. ``search_dirs``: folders searched for weight files (ComfyUI's
    ``models/versat2i`` folders, or ``--models-dir`` in the CLI); ``variant``: the part after ':'."""

    search_dirs: tuple[Path, ...] = ()
    device: str = "cpu"
    variant: str | None = None
    extra: dict = field(default_factory=dict)

    def check_extra(self, allowed: Sequence[str], scorer: str) -> None:
        """Refuse option names ``scorer`` does not know (a typo must not be silently ignored)."""
        unknown = sorted(set(self.extra) - set(allowed))
        if unknown:
            raise ValueError(
                f"scorer {scorer!r}: unknown option(s) {', '.join(unknown)}; it accepts "
                + (", ".join(sorted(allowed)) if allowed else "no options")
            )


@dataclass(frozen=True)
class ScorerEntry:
    # "module:function" relative to this package (imported when the scorer is built), or the factory
    # itself for scorers registered from outside the package
    factory: str | Callable[[ScorerOptions], Scorer]
    aspect: str  # the aspect this scorer measures by default
    summary: str
    needs: str = ""  # extra / weights it needs, for listings and error messages
    # Every variant the factory accepts, listed (Load Scorers offers exactly these). Kept as literal
    # tuples so importing the registry imports no scorer module; tests check they match the modules'
    # own tables. An entry without variants refuses any.
    variants: Sequence[str] = ()
    # The weight-file options (``WEIGHT_INPUTS``) this scorer reads, which Load Scorers sets from its
    # weight-file inputs. Tests check the factory accepts each.
    weight_inputs: Sequence[str] = ()


SCORERS: dict[str, ScorerEntry] = {
    "laion-aesthetic-v2": ScorerEntry(
        ".aesthetic_laion:make_scorer", "aesthetics",
        "LAION improved aesthetic predictor (MLP on CLIP ViT-L/14 image embeddings)",
        needs="weights: clip ViT-L/14 + sac+logos+ava1-l14-linearMSE.pth",
        weight_inputs=("clip_weights", "aesthetic_weights"),
    ),
    "clip-score": ScorerEntry(
        ".clip_score:make_scorer", "alignment",
        "CLIP score: 100 * cosine(image, prompt) on CLIP ViT-L/14, floored at 0",
        needs="weights: clip ViT-L/14",
        weight_inputs=("clip_weights",),
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
        weight_inputs=("clip_weights",),
    ),
    "pyiqa": ScorerEntry(
        ".pyiqa_metric:make_scorer", "lowlevel",
        "any pyiqa no-reference metric by name, e.g. pyiqa:musiq, pyiqa:topiq_nr (non-commercial licence)",
        needs="extra: pip install 'comfyui-versat2i[iqa]' + the metric's weight file",
        variants=("musiq", "musiq-spaq", "musiq-paq2piq", "musiq-ava", "topiq_nr", "topiq_nr-flive",
                  "topiq_nr-spaq", "cnniqa", "wadiqam_nr", "niqe", "brisque", "piqe", "entropy"),
    ),
    "mediapipe-anatomy": ScorerEntry(
        ".mediapipe_anatomy:make_scorer", "geometry",
        "hand and body landmark plausibility from MediaPipe",
        needs="extra: pip install 'comfyui-versat2i[geometry]'",
    ),
    "analytic": ScorerEntry(
        ".analytic:make_scorer", "lowlevel",
        "weight-free image statistics: analytic:sharpness, :contrast, :colourfulness, :brightness, :exposure, "
        ":noise",
        variants=("sharpness", "contrast", "colourfulness", "brightness", "exposure", "noise"),
    ),
}

# Weight files a front end lets the user choose (Load Scorers' file inputs): option -> the file's
# spec (its default name, sub-folder and source). Every scorer on the CLIP ViT-L/14 backbone reads
# ``clip_weights``, so they keep sharing one model.
WEIGHT_INPUTS: dict[str, WeightFile] = {"clip_weights": CLIP_VIT_L_14_OPENAI, "aesthetic_weights": LAION_AESTHETIC_MLP}

# The scorer used for an aspect when none is named. Low-level quality defaults to the permissively
# licensed CLIP-IQA variant: pyiqa (MUSIQ / TOPIQ-NR) is opt-in because of its licence.
DEFAULT_SCORERS: dict[str, str] = {
    "aesthetics": "laion-aesthetic-v2",
    "alignment": "clip-score",
    "geometry": "mediapipe-anatomy",
    "lowlevel": "clip-iqa",
}
assert set(DEFAULT_SCORERS) == set(ASPECTS)


PATH_OPTION_SUFFIXES = ("weights", "_model", "_processor")


def is_path_option(key: str) -> bool:
    """Whether a scorer option names a weight file or folder (naming convention above)."""
    return key.endswith(PATH_OPTION_SUFFIXES)


def split_name(name: str) -> tuple[str, str | None]:
    base, _, variant = name.strip().partition(":")
    return base, (variant or None)


def register_scorer(scorer_id: str, entry: ScorerEntry) -> None:
    """Add a scorer family under ``scorer_id`` (e.g. the demo world's ``demo:<aspect>``). Registering
    the same entry again is a no-op; another entry under a taken id is an error."""
    if ":" in scorer_id or not scorer_id.strip():
        raise ValueError(f"scorer id {scorer_id!r}: a non-empty name without ':'")
    existing = SCORERS.get(scorer_id)
    if existing is not None and existing != entry:
        raise ValueError(f"scorer id {scorer_id!r} is already registered to another scorer")
    SCORERS[scorer_id] = entry


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
    cache: bool = True,
    **extra,
) -> Scorer:
    """Build the scorer called ``name`` (see ``list_scorers()``). Weight files are looked up in
    ``search_dirs``; a missing file raises ``MissingWeightsError`` naming the file and folders.

    With ``cache`` (the default) the scorer is built once per (name, search dirs, device, options)
    and returned again on later calls, rebuilt only if one of its weight files changed on disk;
    scorers on the same weight file (aesthetics, CLIP score and CLIP-IQA on CLIP ViT-L/14) share
    one loaded model either way. A cached scorer is shared: don't ``.to()`` it to another device,
    ask for one with that ``device`` instead."""
    scorer_id, variant = split_name(name)
    entry = SCORERS.get(scorer_id)
    if entry is None:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(list_scorers())}")
    if variant is not None and not entry.variants:
        # A variant the factory would ignore must not be recorded as if it meant something.
        raise ValueError(f"scorer {scorer_id!r} has no variants (got {name!r}); use {scorer_id!r}")
    options = ScorerOptions(
        search_dirs=resolve_search_dirs(search_dirs), device=str(device), variant=variant, extra=dict(extra)
    )

    def build() -> Scorer:
        factory = entry.factory
        if isinstance(factory, str):
            module_name, _, function_name = factory.partition(":")
            factory = getattr(importlib.import_module(module_name, __package__), function_name)
        return factory(options)

    key = _cache_key(scorer_id, options) if cache else None
    if key is None:
        return build()
    return scorer_cache.get_scorer_cached(key, build)


def _cache_key(scorer_id: str, options: ScorerOptions) -> tuple | None:
    """A hashable key for the scorer cache, or None when an option value is not hashable."""
    key = (scorer_id, options.variant, tuple(str(d) for d in options.search_dirs), options.device,
           tuple(sorted((k, _freeze(v)) for k, v in options.extra.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, Path):
        return str(value)
    return value
