"""Reward scorers: score generated images per quality aspect (see ``base`` for the contract).

Public API (imported lazily, so ``import versat2i.rewards`` costs nothing: the models' libraries,
open_clip and transformers, load only when a scorer is built)::

    from versat2i.rewards import get_scorer, score_aspects
    scorers = {"aesthetics": get_scorer("laion-aesthetic-v2", search_dirs=[models_dir]),
               "alignment": get_scorer("clip-score", search_dirs=[models_dir])}
    scores = score_aspects(scorers, images, prompts)   # {aspect: float32 tensor [B]}
    scores.judged                                      # {aspect: bool tensor [B]}: False = nothing to judge
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # the contract
    "ASPECTS": ".base",
    "AspectScores": ".base",
    "ImageBatchError": ".base",
    "Scorer": ".base",
    "ScoringBatch": ".base",
    "check_images": ".base",
    "score_aspects": ".base",
    # names -> scorers
    "DEFAULT_SCORERS": ".registry",
    "SCORERS": ".registry",
    "ScorerOptions": ".registry",
    "get_scorer": ".registry",
    "list_scorers": ".registry",
    # weight files
    "MissingWeightsError": ".weights",
    "WeightsFormatError": ".weights",
    "find_weight_file": ".weights",
    "sha256_file": ".weights",
    # loaded models
    "offload": ".cache",
    "clear": ".cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
