"""Low-level quality from a pyiqa no-reference metric: ``pyiqa:<metric>`` (``pyiqa:musiq``,
``pyiqa:topiq_nr``, ...). Optional extra ``comfyui-versat2i[iqa]``: pyiqa is licensed
PolyForm-Noncommercial-1.0.0 (non-commercial use only); ``clip-iqa`` is the permissive default.

Weights are read from the model folders only, never fetched. Each metric's published checkpoint
keeps its published file name under the ``pyiqa/`` sub-folder of a search dir (ComfyUI:
``models/versat2i/pyiqa/``; CLI: ``<--models-dir>/pyiqa/``):

================ ===================================== ===================== ================
metric           file (in ``pyiqa/``)                  trained on            higher is better
================ ===================================== ===================== ================
musiq            musiq_koniq_ckpt-e95806b9.pth          KonIQ-10k (0-100)     yes
musiq-spaq       musiq_spaq_ckpt-358bb6af.pth           SPAQ (0-100)          yes
musiq-paq2piq    musiq_paq2piq_ckpt-364c0c84.pth        PaQ-2-PiQ (0-100)     yes
musiq-ava        musiq_ava_ckpt-e8d3f067.pth            AVA (1-10)            yes
topiq_nr         cfanet_nr_koniq_res50-9a73138b.pth     KonIQ-10k (0-1)       yes
topiq_nr-flive   cfanet_nr_flive_res50-ded1c74e.pth     FLIVE (0-1)           yes
topiq_nr-spaq    cfanet_nr_spaq_res50-a7f799ac.pth      SPAQ (0-1)            yes
cnniqa           CNNIQA_koniq10k-e6f14c91.pth           KonIQ-10k (0-1)       yes
wadiqam_nr       WaDIQaM-NR-koniq-aaffea29.pth          KonIQ-10k             yes
niqe             niqe_modelparameters.mat               pristine-image model  no: negated
brisque          brisque_svm_weights.pth                LIVE                  no: negated
piqe             (none: hand-crafted)                                         no: negated
entropy          (none: hand-crafted)                                         yes
================ ===================================== ===================== ================

Each file comes from https://huggingface.co/chaofengc/IQA-PyTorch-Weights (the URL pyiqa itself
would download from; mirrored on the GitHub release ``v0.1-weights`` of chaofengc/IQA-PyTorch).
pyiqa's other no-reference metrics need more than one file (CLIP, timm or HF backbones that pyiqa
fetches on its own) and are refused with a list of the supported ones.

Lower-is-better metrics (pyiqa's ``lower_better``) are negated, so higher is better for every
scorer: ``pyiqa:niqe`` scores ``-NIQE``. The scorer's ``score_transform`` (``"negate"`` /
``"identity"``) and ``describe()`` say which.

How weights load: the network is built by pyiqa with every download switched off
(``pretrained=False``, and ``backbone_pretrain=False`` for TOPIQ's ResNet-50, whose ImageNet
weights are inside the published checkpoint anyway), then the checkpoint is read with
``torch.load(weights_only=True)`` and loaded strictly (every key and shape must match). pyiqa's own
loader would unpickle with ``weights_only=False``. NIQE's ``.mat`` and BRISQUE's tuple of tensors
are not state dicts, and pyiqa's architectures only take them as a file path (BRISQUE unpickles it
with ``weights_only=False``). So the file is read once: its bytes are hashed, the BRISQUE bytes are
checked with ``weights_only=True`` to hold nothing but tensors, and pyiqa is handed a private copy
of exactly those bytes: a file replaced in the meantime can neither run code nor be recorded in
place of the one used. The weights hash is taken when the weights are read, never later.

Batch independence: every supported network works per image in eval mode (MUSIQ builds its
multi-scale patches and masks per image, TOPIQ's ResNet-50 batch norms are frozen, NIQE / BRISQUE
/ PIQE compute per-image statistics) and none resizes using batch-wide information, so an image's
score alone equals its score in any batch up to float rounding (~1e-7 relative).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..safe_io import sha256_file
from .base import ImageBatchError, Scorer, ScoringBatch
from .cache import MODELS, stamp_files
from .registry import ScorerOptions
from .weights import (
    WeightFile,
    WeightsFormatError,
    describe_load_failure,
    find_weights,
    load_state_dict,
    torch_load_weights_only,
)

logger = logging.getLogger(__name__)

LICENCE = "PolyForm-Noncommercial-1.0.0"
EXTRA_HINT = (
    "pyiqa scorers need the optional extra: pip install 'comfyui-versat2i[iqa]'. Note that pyiqa is "
    f"licensed {LICENCE} (non-commercial use only); the 'clip-iqa' scorer is a permissively "
    "licensed low-level quality scorer that needs no extra"
)
WEIGHTS_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/blob/main/{name}"
WEIGHTS_MIRROR = "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/{name}"
SUBFOLDER = "pyiqa"
DEFAULT_METRIC = "musiq"


@dataclass(frozen=True)
class MetricRecipe:
    """How to build one pyiqa metric offline.

    ``build``: pyiqa options that stop it from downloading anything; ``weight_key``: the state
    dict sits under this key of the checkpoint (None: the checkpoint is the state dict);
    ``loader``: ``"state_dict"`` (we read the file safely and load it strictly) or ``"arch"`` (the
    file is not a state dict: pyiqa's architecture reads ``pretrained_model_path`` itself);
    ``min_side``: the smallest image side the network accepts.
    """

    file: str | None
    build: Mapping[str, Any] = field(default_factory=dict)
    weight_key: str | None = None
    loader: str = "state_dict"
    min_side: int = 8


_MUSIQ = {"pretrained": False}
_TOPIQ = {"pretrained": False, "backbone_pretrain": False}

RECIPES: dict[str, MetricRecipe] = {
    "musiq": MetricRecipe("musiq_koniq_ckpt-e95806b9.pth", _MUSIQ),
    "musiq-spaq": MetricRecipe("musiq_spaq_ckpt-358bb6af.pth", _MUSIQ),
    "musiq-paq2piq": MetricRecipe("musiq_paq2piq_ckpt-364c0c84.pth", _MUSIQ),
    # pyiqa switches MUSIQ to a 10-bin rating head only when it downloads the AVA weights itself.
    "musiq-ava": MetricRecipe("musiq_ava_ckpt-e8d3f067.pth", {**_MUSIQ, "num_class": 10}),
    "topiq_nr": MetricRecipe("cfanet_nr_koniq_res50-9a73138b.pth", _TOPIQ, "params"),
    "topiq_nr-flive": MetricRecipe("cfanet_nr_flive_res50-ded1c74e.pth", _TOPIQ, "params"),
    "topiq_nr-spaq": MetricRecipe("cfanet_nr_spaq_res50-a7f799ac.pth", _TOPIQ, "params"),
    # CNNIQA treats pretrained=False as a dataset name; None means "no checkpoint".
    "cnniqa": MetricRecipe("CNNIQA_koniq10k-e6f14c91.pth", {"pretrained": None}, "params"),
    # Tests 32 px patches on a non-overlapping grid: needs one full patch plus a pixel.
    "wadiqam_nr": MetricRecipe("WaDIQaM-NR-koniq-aaffea29.pth", {"pretrained": False}, "params", min_side=33),
    # 96 px blocks.
    "niqe": MetricRecipe("niqe_modelparameters.mat", loader="arch", min_side=96),
    "brisque": MetricRecipe("brisque_svm_weights.pth", loader="arch"),
    "piqe": MetricRecipe(None),
    "entropy": MetricRecipe(None),
}


def supported_metrics() -> list[str]:
    return list(RECIPES)


def weight_file(metric: str) -> WeightFile | None:
    """Where ``metric``'s checkpoint lives under a search dir and where it comes from."""
    name = RECIPES[metric].file
    if name is None:
        return None
    return WeightFile(f"{SUBFOLDER}/{name}", f"{WEIGHTS_URL.format(name=name)} (or {WEIGHTS_MIRROR.format(name=name)})")


def import_pyiqa():
    """``import pyiqa``, or an ImportError naming the extra (and the licence)."""
    try:
        import pyiqa
    except ImportError as exc:
        if exc.name is None or exc.name.split(".")[0] == "pyiqa":
            raise ImportError(EXTRA_HINT) from exc
        hint = " (pkg_resources comes from setuptools: pip install 'setuptools<81')" \
            if exc.name == "pkg_resources" else ""
        raise ImportError(
            f"pyiqa is installed but failed to import: {exc}{hint}; reinstall the extra with "
            "pip install 'comfyui-versat2i[iqa]'"
        ) from exc
    return pyiqa


def _check_metric(metric: str, configs: Mapping[str, Mapping]) -> None:
    if metric in RECIPES:
        return
    supported = ", ".join(f"pyiqa:{name}" for name in RECIPES)
    if metric not in configs:
        raise ValueError(f"unknown pyiqa metric {metric!r}; supported: {supported}")
    if configs[metric].get("metric_mode") != "NR":
        raise ValueError(
            f"pyiqa metric {metric!r} is a full-reference metric (it compares against a reference image, "
            f"which generated images don't have); pick a no-reference one: {supported}"
        )
    raise ValueError(
        f"pyiqa metric {metric!r} is not supported offline: building it makes pyiqa fetch extra "
        f"backbone or text-model files from the internet; supported: {supported}"
    )


def build_metric(metric: str, path: Path | None) -> torch.nn.Module:
    """pyiqa's inference model for ``metric`` on the CPU, in eval mode, with the weights of
    ``path`` (None for the weight-free metrics). Nothing is downloaded. The model's
    ``weights_sha256`` is the sha256 of the bytes its weights were read from ("none" without a
    file)."""
    pyiqa = import_pyiqa()
    recipe = RECIPES[metric]
    spec = weight_file(metric)
    options = dict(recipe.build)
    logger.info("building pyiqa metric %s%s", metric, f" from {path}" if path else "")
    if recipe.loader == "arch":
        # pyiqa's architecture reads the file itself, and only from a path: read it once here, check
        # and hash those bytes, and give pyiqa a private copy of them (module docstring).
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise describe_load_failure(path, f"pyiqa's {metric} parameters", exc, spec.source_hint) from exc
        weights_sha256 = hashlib.sha256(data).hexdigest()
        if metric == "brisque":
            # pyiqa unpickles this file with weights_only=False: refuse pickled code first.
            torch_load_weights_only(path, source_hint=spec.source_hint, data=data)
        with tempfile.TemporaryDirectory(prefix="versat2i-pyiqa-") as private:
            copy = Path(private) / path.name
            copy.write_bytes(data)
            options["pretrained_model_path"] = str(copy)
            model = _create_metric(pyiqa, metric, options, path, spec)
    else:
        model = _create_metric(pyiqa, metric, options, path, spec)
        weights_sha256 = "none"
        if path is not None:
            state = load_state_dict(path, key=recipe.weight_key, source_hint=spec.source_hint)
            load_strictly(model.net, state, path, metric, spec.source_hint)
            weights_sha256 = sha256_file(path)  # now, not when a manifest asks: the file may be replaced later
    model.weights_sha256 = weights_sha256
    return model.eval().requires_grad_(False)


def _create_metric(pyiqa, metric: str, options: Mapping[str, Any], path: Path | None,
                   spec: WeightFile | None) -> torch.nn.Module:
    try:
        return pyiqa.create_metric(metric, device=torch.device("cpu"), **options)
    except KeyError as exc:
        if "registry" in str(exc):
            # pyiqa drops architectures whose module fails to import (TOPIQ needs facexlib).
            raise ImportError(
                f"pyiqa could not build {metric!r} ({exc}); its architecture module failed to import, usually "
                "a missing dependency of pyiqa (TOPIQ needs facexlib): pip install 'comfyui-versat2i[iqa]'"
            ) from exc
        raise
    except Exception as exc:
        if RECIPES[metric].loader == "arch":
            raise describe_load_failure(path, f"pyiqa's {metric} parameters", exc, spec.source_hint) from exc
        raise


def load_strictly(net: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, metric: str,
                  source_hint: str) -> None:
    """Load every key and shape of ``state`` into ``net``, or say which keys differ."""
    what = f"pyiqa's {metric} network ({type(net).__name__})"
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches; the first line only says "Error(s) in loading"
        details = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
        raise WeightsFormatError(
            f"weight file {path} does not match {what}: {details or exc}; use the published file from {source_hint}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        def some(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        differences = [f"missing keys {some(result.missing_keys)}" if result.missing_keys else "",
                       f"unexpected keys {some(result.unexpected_keys)}" if result.unexpected_keys else ""]
        raise WeightsFormatError(
            f"weight file {path} does not match {what}: {'; '.join(d for d in differences if d)}; "
            f"use the published file from {source_hint}"
        )


class PyiqaScorer(Scorer):
    """One pyiqa no-reference metric; higher is better (lower-is-better metrics are negated)."""

    aspect = "lowlevel"
    chunk_size = 8

    def __init__(self, metric: str, model: torch.nn.Module, weights_path: Path | None, *,
                 lower_better: bool, device: torch.device | str = "cpu"):
        super().__init__(device)
        self.metric = metric
        self.scorer_id = f"pyiqa:{metric}"
        self.model = model
        self.weights_path = weights_path
        # Of the weights as read (build_metric), not of whatever the file holds when a manifest asks.
        self._weights_hash = "none" if weights_path is None else model.weights_sha256
        self.lower_better = bool(lower_better)
        self.score_transform = "negate" if self.lower_better else "identity"
        self.min_side = RECIPES[metric].min_side

    @property
    def weights_hash(self) -> str:
        return self._weights_hash

    def weight_files(self) -> tuple[Path, ...]:
        return () if self.weights_path is None else (self.weights_path,)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "score_transform": self.score_transform}

    def to(self, device: torch.device | str) -> PyiqaScorer:
        self.model.to(device)
        return super().to(device)

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        height, width = batch.images.shape[1:3]
        if min(height, width) < self.min_side:
            raise ImageBatchError(
                f"images: {self.scorer_id} needs images of at least {self.min_side}x{self.min_side} px, got "
                f"{height}x{width}; upscale them or pick another metric"
            )
        pixels = batch.images.to(self.device).permute(0, 3, 1, 2).float().contiguous()
        values = self.model(pixels)
        if isinstance(values, (tuple, list)):
            values = values[0]
        values = values.reshape(pixels.shape[0], -1)[:, 0].float()
        return -values if self.lower_better else values


def make_scorer(options: ScorerOptions) -> PyiqaScorer:
    """Factory for ``pyiqa:<metric>`` (``pyiqa`` alone = ``pyiqa:musiq``). Option ``weights``: the
    checkpoint's path (absolute, or relative to a search dir) instead of ``pyiqa/<published name>``."""
    options.check_extra(("weights",), "pyiqa")
    metric = options.variant or DEFAULT_METRIC
    import_pyiqa()
    from pyiqa.default_model_configs import DEFAULT_CONFIGS as configs
    _check_metric(metric, configs)
    spec = weight_file(metric)
    if spec is None:
        if options.extra.get("weights"):
            raise ValueError(f"pyiqa:{metric} has no weight file; drop the 'weights' option")
        path = None
        stamp = None
    else:
        # Find the file before building anything, so a missing one fails in milliseconds.
        path = find_weights(spec, options.search_dirs, override=options.extra.get("weights"))
        stamp = stamp_files([path])
    key = ("pyiqa", metric, None if path is None else str(path.resolve()))
    model = MODELS.get_or_load(key, lambda: build_metric(metric, path), stamp=stamp)
    lower_better = bool(configs[metric].get("lower_better", False))
    return PyiqaScorer(metric, model, path, lower_better=lower_better, device=options.device)
