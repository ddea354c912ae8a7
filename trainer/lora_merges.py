"""Merge baselines for the Mixture of LoRA: the aspect LoRAs folded into one set of weights by
peft's model-merging methods, applied to a diffusers base model for the duration of a ``with``
block (what the loop's evaluation compares the learned gate with).

* ``ties`` (TIES-merging, arXiv 2306.01708): trim each LoRA's delta to its largest ``density``
  share of entries, elect a sign per entry, average the entries that agree with it;
* ``dare_linear`` / ``dare_ties`` (DARE, arXiv 2311.03099): drop a random ``1 - density`` share of
  each delta's entries and rescale the rest by ``1 / density``, then add (linear) or TIES-merge.

Each LoRA's delta ``w_i * s_i * B_i A_i`` per adapted weight goes through
``peft.utils.merge_utils`` (the functions behind peft's ``add_weighted_adapter``). Why not
``add_weighted_adapter`` itself: it needs a ``PeftModel`` (diffusers loads LoRAs into the UNet
without one), and for these combination types it merges the A and the B factors separately, which
prunes and sign-elects factors rather than the weight changes the methods are defined on. The
plain weighted sums (1/N, full weight, a uniform weight) need no delta: they are diffusers'
``set_adapters`` weights (``models.pipelines.LoraAdapters``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.lora_files import load_kohya_lora
from .mix_diffusers import MixtureLayer, mixture_layers

MERGE_METHODS = ("ties", "dare_linear", "dare_ties")


def merged_delta(layer: MixtureLayer, method: str, weights: Sequence[float], density: float) -> torch.Tensor:
    """The merged weight change of one layer (shaped like its weight), float32."""
    from peft.utils import merge_utils

    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r}: unknown; choose one of {', '.join(MERGE_METHODS)}")
    shape = layer.module.weight.shape
    deltas = [torch.zeros(shape) if expert is None else
              (expert.scale * expert.up.reshape(expert.up.shape[0], -1).float()
               @ expert.down.reshape(expert.down.shape[0], -1).float()).reshape(shape)
              for expert in layer.experts]
    weights = torch.tensor([float(w) for w in weights])
    if method == "ties":
        return merge_utils.ties(deltas, weights, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, weights, density)
    return merge_utils.dare_ties(deltas, weights, density)


class MergedLoRAs:
    """``prepare(pipe) -> context manager`` for ``generate_candidates``: the LoRA files merged by
    ``method`` into ``base``'s weights (the pipeline shares its modules) inside the ``with`` block,
    the original weights restored on exit. ``seed`` fixes DARE's random drops (the same merge on
    every run)."""

    def __init__(self, paths: Sequence[str | os.PathLike], base, *, method: str, weights: Sequence[float] | None = None,
                 density: float = 0.5, seed: int = 0, label: str | None = None):
        self.paths = [Path(p) for p in paths]
        if len(self.paths) < 2:
            raise ValueError(f"merge {method!r}: give at least 2 LoRA files, got {len(self.paths)}")
        if method not in MERGE_METHODS:
            raise ValueError(f"merge method {method!r}: unknown; choose one of {', '.join(MERGE_METHODS)}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"merge density {density}: must be in (0, 1] (the share of each delta's entries kept)")
        self.weights = [1.0] * len(self.paths) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.paths):
            raise ValueError(f"merge weights: {len(self.weights)} weights for {len(self.paths)} LoRA files")
        self.base, self.method, self.density, self.seed = base, method, float(density), int(seed)
        self.label = label or method

    def describe(self) -> dict[str, Any]:
        return {"kind": "merge", "method": self.method, "density": self.density, "seed": self.seed,
                "label": self.label, "loras": [{"path": str(p), "weight": w} for p, w in zip(self.paths, self.weights)]}

    @contextlib.contextmanager
    def __call__(self, pipe) -> Iterator[Any]:
        loaded = [load_kohya_lora(path) for path in self.paths]
        layers = mixture_layers(self.base, [state for state, _ in loaded], [meta for _, meta in loaded])
        originals: list[tuple[torch.nn.Module, torch.Tensor]] = []
        try:
            # merge_utils draws DARE's masks from torch's global generator: seeded here, restored after
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for layer in layers:
                    weight = layer.module.weight
                    delta = merged_delta(layer, self.method, self.weights, self.density)
                    originals.append((layer.module, weight.detach().clone()))
                    weight.add_(delta.to(weight.device, weight.dtype))
            yield pipe
        finally:
            with torch.no_grad():
                for module, original in originals:
                    module.weight.copy_(original)
