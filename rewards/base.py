"""The scorer contract every reward model follows.

Images come in ComfyUI's IMAGE layout: a float tensor ``[B, H, W, C]`` with C == 3 and values in
0..1. A scorer returns one absolute score per image, a float32 CPU tensor ``[B]``, that does not
depend on what else is in the batch (no batch means, no softmax across the batch): the score of an
image scored alone equals its score inside any batch. Higher is better for every scorer.

Scorers that share a backbone (aesthetics and CLIP score on one CLIP ViT-L/14) get the backbone's
image embedding once per chunk through ``ScoringBatch.feature``: ``score_aspects`` hands the same
``ScoringBatch`` to every scorer of the chunk.

Some scorers may find nothing to judge in an image (the geometry scorer on an image without a
person). They set ``may_leave_unjudged`` and implement ``judge_batch``, which returns the scores
and a per-image *judged* mask; the score of an unjudged image is only a placeholder. The mask, not
the score, says which images were judged: ``score_aspects`` returns it as ``.judged``, the score
table stores it per image, and selection never keeps an unjudged image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..aspects import ASPECTS  # noqa: F401  (re-exported: scorers name their aspect)
from ..safe_io import readable_name

ProgressCallback = Callable[[int, int], None]  # (images done, images total)


@readable_name
class ImageBatchError(ValueError):
    """Bad images or prompts handed to a scorer. The message names the input and the fix."""


def check_images(images: Any, prompts: Sequence[str] | None = None, *, name: str = "images") -> torch.Tensor:
    """Validate a ComfyUI IMAGE batch (and its prompts) and return it as a float tensor.

    Raises ImageBatchError naming what is wrong and how to fix it; never rescales silently.
    """
    if not isinstance(images, torch.Tensor):
        raise ImageBatchError(f"{name}: expected a torch.Tensor [B,H,W,C], got {type(images).__name__}")
    if images.ndim == 3:
        raise ImageBatchError(
            f"{name}: got a 3-D tensor {tuple(images.shape)}; ComfyUI IMAGE is 4-D [B,H,W,C] "
            "(add a batch dimension with images[None])"
        )
    if images.ndim != 4:
        raise ImageBatchError(f"{name}: expected 4-D [B,H,W,C], got shape {tuple(images.shape)}")
    batch, height, width, channels = images.shape
    if batch == 0:
        raise ImageBatchError(f"{name}: the batch is empty (0 images); connect a node that outputs images")
    if channels == 4:
        raise ImageBatchError(
            f"{name}: RGBA images (4 channels); scorers take RGB. Drop or composite the alpha channel "
            "first (e.g. 'Split Image with Alpha' / 'Join Image with Alpha' in ComfyUI, or images[..., :3])"
        )
    if channels == 1:
        raise ImageBatchError(
            f"{name}: grayscale images (1 channel); scorers take RGB. Repeat the channel first "
            "(images.repeat(1, 1, 1, 3))"
        )
    if channels != 3:
        raise ImageBatchError(
            f"{name}: expected 3 colour channels last ([B,H,W,3]), got shape {tuple(images.shape)}"
            + (" (channels-first? use images.permute(0, 2, 3, 1))" if images.shape[1] in (1, 3, 4) else "")
        )
    if height < 8 or width < 8:
        raise ImageBatchError(f"{name}: images of {height}x{width} px are too small to score (need >= 8x8)")
    if not images.is_floating_point():
        raise ImageBatchError(
            f"{name}: expected float pixels in 0..1, got dtype {images.dtype} (divide uint8 images by 255)"
        )
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = sorted({int(i) for i in (~finite).flatten(1).any(1).nonzero().flatten()})
        raise ImageBatchError(
            f"{name}: NaN or inf pixels in image(s) {bad[:10]}{'...' if len(bad) > 10 else ''}; "
            "the upstream decode or sampling produced invalid values (try fp32 VAE decoding)"
        )
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ImageBatchError(
            f"{name}: pixel values range over [{low:.3g}, {high:.3g}]; ComfyUI IMAGE is 0..1 "
            "(clamp, or rescale from -1..1 with (x + 1) / 2)"
        )
    if prompts is not None:
        if isinstance(prompts, str):
            raise ImageBatchError("prompts: expected a list of strings, one per image, got a single string")
        if len(prompts) != batch:
            raise ImageBatchError(
                f"prompts: {len(prompts)} prompt(s) for {batch} image(s); give one prompt per image "
                "(or repeat each prompt once per candidate image)"
            )
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ImageBatchError(f"prompts[{i}]: expected a string, got {type(prompt).__name__}")
    return images.float().clamp(0.0, 1.0)


class ScoringBatch:
    """One chunk of images + prompts on the scoring device, with a memo for shared features.

    ``feature(key, compute)`` runs ``compute()`` once per chunk and returns the cached value on
    later calls, so several scorers on one backbone share its forward pass.
    """

    def __init__(self, images: torch.Tensor, prompts: Sequence[str]):
        self.images = images
        self.prompts = list(prompts)
        self._features: dict[Any, Any] = {}

    def __len__(self) -> int:
        return self.images.shape[0]

    def feature(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._features:
            self._features[key] = compute()
        return self._features[key]


class Scorer(ABC):
    """A reward model for one quality aspect. Subclasses set ``scorer_id`` and ``aspect`` and
    implement ``score_batch``; ``score`` adds validation and chunking.

    ``scorer_id`` is stable: stored in every manifest next to ``weights_hash`` (sha256 of the weight
    files, so a score can be traced to the exact model that produced it).

    ``device`` is where the scorer runs. ``offload()`` moves its models to the CPU but keeps
    ``device``: the next ``score`` / ``score_aspects`` call runs ``prepare()``, which moves them back.
    Scorers holding modules override ``to`` (move the modules, then call ``super().to``).
    """

    scorer_id: str = ""
    aspect: str = ""
    chunk_size: int = 16
    # True for scorers that read the prompt (alignment): score_aspects then refuses empty prompts.
    needs_prompts: bool = False
    # True for scorers that may find nothing to judge in an image (the geometry scorer on an image
    # without a person); they implement ``judge_batch``. Selection never keeps an unjudged image for
    # the scorer's aspect, whatever the threshold (rewards/selection.py).
    may_leave_unjudged: bool = False

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    # -- to implement ------------------------------------------------------------------------
    @abstractmethod
    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        """Scores for one validated chunk already on ``self.device``: a ``[len(batch)]`` tensor."""

    @property
    @abstractmethod
    def weights_hash(self) -> str:
        """sha256 (hex) identifying the weights; ``"none"`` for scorers without weights."""

    def judge_batch(self, batch: ScoringBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[len(batch)]`` and a bool mask ``[len(batch)]``: True where the score is a
        judgement, False where the scorer found nothing to judge (the score there is a finite
        placeholder, shown in tables and previews but never selected). Scorers with
        ``may_leave_unjudged`` override this; by default every image is judged."""
        return self.score_batch(batch), torch.ones(len(batch), dtype=torch.bool)

    # -- provided ----------------------------------------------------------------------------
    def weight_files(self) -> tuple[Path, ...]:
        """The weight files this scorer was built from (the registry's cache re-checks their identity:
        size, mtime, inode, ctime, so a replaced file is reloaded). Override in scorers that read files."""
        return ()

    def to(self, device: torch.device | str) -> Scorer:
        """Move the scorer's models to ``device`` (override when the scorer holds modules)."""
        self.device = torch.device(device)
        return self

    def offload(self) -> Scorer:
        """Free accelerator memory by moving the models to the CPU; ``device`` is kept, so the
        next scoring call moves them back (``prepare``)."""
        target = self.device
        self.to("cpu")
        self.device = target
        return self

    def prepare(self) -> Scorer:
        """Put the models on ``self.device`` before scoring (undoes ``offload``); cheap when they
        are there already."""
        return self.to(self.device)

    def describe(self) -> dict[str, Any]:
        """What identifies the scores: id, aspect and weights hash, plus whatever else changes them
        (subclasses add their settings). Everything but ``aspect`` is recorded with every stored
        score; values are JSON scalars."""
        return {"id": self.scorer_id, "aspect": self.aspect, "weights_hash": self.weights_hash}

    @torch.inference_mode()
    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        *,
        chunk_size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> torch.Tensor:
        return score_aspects({self.aspect or self.scorer_id: self}, images, prompts,
                             chunk_size=chunk_size, progress=progress)[self.aspect or self.scorer_id]


def check_prompts_for(scorers: Mapping[str, Scorer], prompts: Sequence[str]) -> None:
    """Scorers that read the prompt get no empty prompt (a CLIP score of "" means nothing)."""
    readers = [f"{aspect} ({scorer.scorer_id})" for aspect, scorer in scorers.items() if scorer.needs_prompts]
    if not readers:
        return
    empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
    if empty:
        raise ImageBatchError(
            f"prompts: prompt(s) {empty[:10]}{'...' if len(empty) > 10 else ''} are empty, but "
            f"{', '.join(readers)} score(s) how well an image matches its prompt; give every image the prompt "
            "it was generated from"
        )


class AspectScores(dict):
    """What ``score_aspects`` returns: ``{aspect: float32 CPU tensor [B]}`` (an ordinary dict to a
    caller that only wants the scores), plus ``judged``: ``{aspect: bool CPU tensor [B]}``, False
    where the aspect's scorer found nothing to judge (``Scorer.judge_batch``). Pass it to
    ``ScoreTable.from_scores`` as is: the table takes the mask along."""

    def __init__(self, scores: Mapping[str, torch.Tensor], judged: Mapping[str, torch.Tensor]):
        super().__init__(scores)
        self.judged = dict(judged)


@torch.inference_mode()
def score_aspects(
    scorers: Mapping[str, Scorer],
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    chunk_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> AspectScores:
    """Score every image for every aspect; returns ``{aspect: float32 CPU tensor [B]}`` with the
    judged masks as ``.judged`` (``AspectScores``).

    Images are validated once, then scored in chunks; within a chunk every scorer sees the same
    ``ScoringBatch`` so shared backbone features are computed once. Chunking never changes a
    score (scorers are batch-independent), it only bounds memory.
    """
    if not scorers:
        raise ValueError("scorers: no scorer given; load at least one aspect's scorer")
    images = check_images(images, prompts)
    check_prompts_for(scorers, prompts)
    total = images.shape[0]
    size = chunk_size or min(s.chunk_size for s in scorers.values())
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    # Chunks go to the first scorer's device; scorers on another device move what they need.
    device = next(iter(scorers.values())).device
    for scorer in scorers.values():
        scorer.prepare()
    results: dict[str, list[torch.Tensor]] = {aspect: [] for aspect in scorers}
    judged: dict[str, list[torch.Tensor]] = {aspect: [] for aspect in scorers}
    for start in range(0, total, size):
        chunk = ScoringBatch(images[start:start + size].to(device), prompts[start:start + size])
        for aspect, scorer in scorers.items():
            values, mask = scorer.judge_batch(chunk)
            values = values.detach().float().flatten().cpu()
            mask = torch.as_tensor(mask).detach().flatten().cpu()
            if values.shape[0] != len(chunk):
                raise RuntimeError(
                    f"scorer {scorer.scorer_id!r} returned {values.shape[0]} scores for {len(chunk)} images"
                )
            if mask.shape[0] != len(chunk) or mask.dtype != torch.bool:
                raise RuntimeError(
                    f"scorer {scorer.scorer_id!r} returned {mask.shape[0]} judged flags ({mask.dtype}) for "
                    f"{len(chunk)} images; judge_batch must return one bool per image"
                )
            if not bool(torch.isfinite(values).all()):
                raise RuntimeError(
                    f"scorer {scorer.scorer_id!r} returned non-finite scores for images "
                    f"{start}..{start + len(chunk) - 1}; its weights may be corrupt (weights_hash "
                    f"{scorer.weights_hash[:12]})"
                )
            results[aspect].append(values)
            judged[aspect].append(mask)
        if progress is not None:
            progress(min(start + size, total), total)
    return AspectScores({aspect: torch.cat(parts) for aspect, parts in results.items()},
                        {aspect: torch.cat(parts) for aspect, parts in judged.items()})
