"""One open_clip model shared by the CLIP-based scorers, and tensor preprocessing for CLIP models.

Aesthetics (``laion-aesthetic-v2``), alignment (``clip-score``) and low-level quality
(``clip-iqa``) all read the L2-normalised image embedding of OpenAI CLIP ViT-L/14. They get one
``OpenClipBackbone`` (the model cache keys it by architecture + weight file), and within a chunk the
image embedding is computed once: ``OpenClipBackbone.image_embeddings(batch)`` memoises it on the
chunk's ``ScoringBatch``, which ``score_aspects`` hands to every scorer of the chunk.

Preprocessing runs on tensors on the scoring device (no PIL round trip, no uint8 rounding): resize
(bicubic, antialiased, like PIL) so the image covers the model's input, centre crop, normalise
with the model's mean/std. Every step is per image, so a score never depends on the rest of the
batch. This matches open_clip's PIL pipeline to within uint8 rounding (tested).

Text embeddings are cached per prompt string (one entry per distinct prompt, least recently used
dropped beyond ``TEXT_CACHE_SIZE``) and each prompt is encoded on its own, so a prompt's
embedding is the same whatever other prompts came with it.
"""

from __future__ import annotations

import itertools
import logging
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..safe_io import sha256_file
from . import weights
from .base import Scorer, ScoringBatch
from .cache import MODELS, stamp_files
from .weights import WeightFile, combine_hashes, describe_load_failure, find_weights

logger = logging.getLogger(__name__)

TEXT_CACHE_SIZE = 4096
RESIZE_MODES = ("shortest", "longest", "squash")


# -- preprocessing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorPreprocess:
    """CLIP-style preprocessing of a ComfyUI IMAGE batch ``[B,H,W,3]`` (0..1) into model input
    ``[B,3,h,w]``, on whatever device the images are on.

    ``resize_mode``: ``shortest`` = resize the shorter side to the input size, then centre crop
    (open_clip's and transformers' CLIP default); ``longest`` = resize the longer side, then pad
    with black to a square (HPS v2's evaluation transform); ``squash`` = resize to the size.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        pixels = images.permute(0, 3, 1, 2).float()
        height, width = pixels.shape[-2:]
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            resized = TF.resize(pixels, [target_h, target_w], interpolation=mode, antialias=True)
        elif self.resize_mode == "shortest" and target_h == target_w:
            # torchvision's own shorter-side rule (the one open_clip's PIL transform uses).
            resized = TF.resize(pixels, [target_h], interpolation=mode, antialias=True)
        else:
            # open_clip's ResizeKeepRatio: scale so the image covers (shortest) / fits (longest).
            ratios = (height / target_h, width / target_w)
            ratio = min(ratios) if self.resize_mode == "shortest" else max(ratios)
            new_size = [max(1, round(height / ratio)), max(1, round(width / ratio))]
            resized = TF.resize(pixels, new_size, interpolation=mode, antialias=True)
        # PIL clamps bicubic overshoot to the 0..255 range; do the same.
        resized = resized.clamp(0.0, 1.0)
        if self.resize_mode == "longest":
            pad_h, pad_w = max(0, target_h - resized.shape[-2]), max(0, target_w - resized.shape[-1])
            if pad_h or pad_w:
                resized = TF.pad(resized, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
        if tuple(resized.shape[-2:]) != (target_h, target_w):
            resized = TF.center_crop(resized, [target_h, target_w])
        mean = torch.tensor(self.mean, device=resized.device, dtype=resized.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=resized.device, dtype=resized.dtype).view(1, 3, 1, 1)
        return (resized - mean) / std


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PromptEmbeddingCache:
    """Text embeddings per prompt string, least recently used dropped beyond ``size`` entries.

    ``encode(prompt)`` embeds one prompt (a CPU tensor ``[D]``). Each prompt is encoded on its
    own, never padded with others, so its embedding does not depend on what came with it."""

    def __init__(self, encode: Callable[[str], torch.Tensor], size: int = TEXT_CACHE_SIZE):
        self.encode = encode
        self.size = size
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        """``[len(prompts), D]`` on ``device``."""
        rows = []
        for prompt in prompts:
            embedding = self._entries.get(prompt)
            if embedding is None:
                embedding = self._entries[prompt] = self.encode(prompt)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(prompt)
            rows.append(embedding)
        return torch.stack(rows).to(device)

    def clear(self) -> None:
        self._entries.clear()


# -- the backbone --------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenClipSpec:
    """Which open_clip architecture reads which weight file, with which preprocessing."""

    architecture: str
    weights: WeightFile
    resize_mode: str = "shortest"


# OpenAI's CLIP ViT-L/14 was trained with QuickGELU: its weights need the -quickgelu config.
VIT_L_14_OPENAI = OpenClipSpec("ViT-L-14-quickgelu", weights.CLIP_VIT_L_14_OPENAI)

_backbone_ids = itertools.count()


class OpenClipBackbone:
    """An eval-mode open_clip model with its tokenizer, tensor preprocessing and text cache."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, architecture: str, weights_path: Path,
                 weights_hash: str, preprocess: TensorPreprocess, embed_dim: int):
        self.embed_dim = embed_dim
        self.weights_hash = weights_hash  # of the file as loaded (hashed right after reading it)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.architecture = architecture
        self.weights_path = Path(weights_path)
        self.preprocess = preprocess
        self.feature_key = ("open_clip.image_embedding", next(_backbone_ids))
        self._text_cache = PromptEmbeddingCache(self._encode_prompt)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> OpenClipBackbone:
        device = torch.device(device)
        if self.device != device:
            self.model.to(device)
        return self

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE ``[B,H,W,3]`` -> L2-normalised float32 embeddings ``[B,D]``."""
        pixels = self.preprocess(images.to(self.device))
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def image_embeddings(self, batch: ScoringBatch) -> torch.Tensor:
        """The chunk's normalised image embeddings, computed once per chunk for every scorer."""
        return batch.feature(self.feature_key, lambda: self.encode_images(batch.images))

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 embeddings ``[len(prompts), D]`` on the model's device. Prompts
        longer than the context (77 tokens) are truncated, as CLIP was trained."""
        return self._text_cache(prompts, self.device)

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt]).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)[0].cpu()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


# The first open_clip release whose create_model takes weights_only (2.29-2.32 call it
# load_weights_only; older ones have neither, and pass unknown keywords on to the model's constructor).
OPEN_CLIP_MIN_VERSION = "3.0"


def check_open_clip_version(open_clip) -> None:
    """Refuse an open_clip whose ``create_model`` can't be told to load with ``weights_only=True``
    (an ImportError naming the installed version and the fix, instead of a TypeError from deep
    inside the model's constructor)."""
    import inspect

    if "weights_only" not in inspect.signature(open_clip.create_model).parameters:
        version = getattr(open_clip, "__version__", "unknown")
        raise ImportError(
            f"open_clip_torch {version} is too old for the CLIP scorers: they need >= {OPEN_CLIP_MIN_VERSION} "
            f"(create_model(weights_only=True)); upgrade it: pip install 'open_clip_torch>={OPEN_CLIP_MIN_VERSION}'"
        )


def load_open_clip_backbone(architecture: str, path: Path, *, resize_mode: str = "shortest",
                            source_hint: str = "") -> OpenClipBackbone:
    """Build ``architecture`` with open_clip and load the weight file ``path`` (open_clip state
    dict, ``.safetensors`` or ``.pt``/``.bin`` read with ``weights_only=True``; a
    ``{"state_dict": ...}`` wrapper is accepted). Uncached: use ``get_backbone``."""
    import open_clip
    from safetensors import SafetensorError

    if open_clip.get_model_config(architecture) is None:
        raise ValueError(
            f"unknown open_clip architecture {architecture!r}; known: {', '.join(open_clip.list_models())}"
        )
    check_open_clip_version(open_clip)
    logger.info("loading open_clip %s from %s", architecture, path)
    try:
        model = open_clip.create_model(architecture, pretrained=str(path), device="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, TypeError, pickle.UnpicklingError,
            SafetensorError) as exc:  # TypeError: torch's unpickler on some garbage files
        raise describe_load_failure(path, f"open_clip {architecture} weights", exc, source_hint) from exc
    # Hash now, not when a manifest asks: the file may be replaced later, the loaded weights not.
    weights_hash = sha256_file(path)
    cfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = TensorPreprocess(
        size=_pair(cfg.get("size", 224)),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        resize_mode=resize_mode,
        interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
    )
    return OpenClipBackbone(model, open_clip.get_tokenizer(architecture), architecture=architecture,
                            weights_path=path, weights_hash=weights_hash, preprocess=preprocess,
                            embed_dim=int(open_clip.get_model_config(architecture)["embed_dim"]))


def get_backbone(spec: OpenClipSpec, search_dirs: Sequence[str | Path], *, architecture: str | None = None,
                 weights_file: str | Path | None = None) -> OpenClipBackbone:
    """The shared backbone for ``spec`` (architecture / weight file overridable), loaded once per
    process and reloaded only when the file changes on disk. Raises MissingWeightsError first if
    the file is absent."""
    path = find_weights(spec.weights, search_dirs, override=weights_file)
    architecture = architecture or spec.architecture
    key = ("open_clip", architecture, str(path.resolve()), spec.resize_mode)
    return MODELS.get_or_load(
        key,
        lambda: load_open_clip_backbone(architecture, path, resize_mode=spec.resize_mode,
                                        source_hint=spec.weights.source_hint),
        stamp=stamp_files([path]),
    )


# -- scorers on a backbone -----------------------------------------------------------------------

# Images per forward pass. On the CPU small batches are faster per image (ViT-L/14 at one thread:
# ~2.4 s/image in batches of 1 or 4, ~4.6 s/image in batches of 16: the activations of a large
# batch fall out of the caches); accelerators want large batches.
CPU_CHUNK_SIZE = 4
ACCELERATOR_CHUNK_SIZE = 16


class OpenClipScorer(Scorer):
    """Base of the scorers that read an ``OpenClipBackbone`` (plus optional extra modules)."""

    accelerator_chunk_size = ACCELERATOR_CHUNK_SIZE

    @property
    def chunk_size(self) -> int:
        return CPU_CHUNK_SIZE if self.device.type == "cpu" else self.accelerator_chunk_size

    def __init__(self, backbone: OpenClipBackbone, *, device: torch.device | str = "cpu",
                 extra_weights: Mapping[Path, str] | None = None):
        """``extra_weights``: the other weight files the scorer reads, with their sha256."""
        super().__init__(device)
        self.backbone = backbone
        self.extra_weights = {Path(path): digest for path, digest in (extra_weights or {}).items()}

    def modules(self) -> list[torch.nn.Module]:
        """Modules besides the backbone that must follow the scorer's device."""
        return []

    def to(self, device: torch.device | str) -> OpenClipScorer:
        self.backbone.to(device)
        for module in self.modules():
            module.to(device)
        return super().to(device)

    def weight_files(self) -> tuple[Path, ...]:
        return (self.backbone.weights_path, *self.extra_weights)

    @property
    def weights_hash(self) -> str:
        """sha256 of the weight file; several files: ``combine_hashes`` keyed by file name."""
        named = {self.backbone.weights_path.name: self.backbone.weights_hash}
        named.update({path.name: digest for path, digest in self.extra_weights.items()})
        return combine_hashes(named)


def backbone_from_options(options, spec: OpenClipSpec = VIT_L_14_OPENAI, *, prefix: str = "clip") -> OpenClipBackbone:
    """The backbone named by ``options.extra[f"{prefix}_architecture"]`` /
    ``[f"{prefix}_weights"]`` (file path, absolute or relative to a search dir), else ``spec``."""
    return get_backbone(
        spec,
        options.search_dirs,
        architecture=options.extra.get(f"{prefix}_architecture"),
        weights_file=options.extra.get(f"{prefix}_weights"),
    )
