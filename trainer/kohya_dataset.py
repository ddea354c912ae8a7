"""The kohya-style training set as a torch dataset: repeats, aspect-ratio buckets, caches.

Layout (written by Save Training Set / ``versat2i build-dataset``)::

    <dataset_dir>/<repeats>_<aspect>/<id>.png + <id>.txt      (caption)
                                    [<id>.latents.safetensors]  (optional, from generation)
    <dataset_dir>/manifest.jsonl                                (scores, seeds; captions as fallback)

The files on disk are the truth: users curate kohya folders by deleting images and editing
captions, so an image missing from the manifest is still trained and a manifest row whose image
was deleted is skipped.

Batches come from ``BucketBatchSampler``: every batch holds images of one bucket (one size), and the
order is a pure function of ``(seed, epoch)``, so a run resumed mid-epoch sees exactly the batches the
uninterrupted run would have seen. Random flips are decided there too, for the same reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_files import load_image_file
from ..training_set.folders import TrainingImage

logger = logging.getLogger(__name__)

# -- buckets ---------------------------------------------------------------------------------------

def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of area <= resolution^2 with sides multiple of ``step`` (kohya style).

    Not diffusers' ``generate_aspect_ratio_buckets``: that one rounds a fixed aspect-ratio ladder to
    the nearest multiple, so a bucket can exceed the pixel budget (and memory) the user chose, and it
    is missing from older diffusers releases the pack supports; kohya users expect this ladder.

    The square ``resolution x resolution`` bucket is always present, even when ``resolution`` is not
    a multiple of ``step``.
    """
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect + 1e-9:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (larger area on ties)."""
    log_ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - log_ratio), 9), -b[0] * b[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover ``bucket`` and center-crop; returns the image and (top, left) of the crop."""
    width, height = bucket
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height)), (top, left)


# -- dataset -----------------------------------------------------------------------------------------

class KohyaDataset(torch.utils.data.Dataset):
    """One example per unique image; ``BucketBatchSampler`` applies the repeats.

    Items are requested as ``(index, flip)`` pairs. An example is a dict with ``pixel_values``
    ([3,H,W] in -1..1) or, once cached, ``latents`` ([C,H/s,W/s], scaled; ``s = latent_scale``, the
    VAE's downsampling factor: 8 for Stable Diffusion, 1 for the demo world's), plus ``caption``,
    ``original_size`` (h, w), ``crop_top_left`` (top, left), ``target_size`` (h, w) for SDXL's
    micro-conditioning, and the cached text embeddings when present.
    """

    def __init__(self, images: Sequence[TrainingImage], *, resolution: int, bucketing: bool = True,
                 bucket_step: int = 64, bucket_max_aspect: float = 2.0, latent_scale: int = 8):
        if not images:
            raise ValueError("the training set is empty")
        self.images = list(images)
        self.latent_scale = latent_scale
        if bucketing:
            buckets = make_buckets(resolution, bucket_step, bucket_max_aspect)
            self.bucket_of = [assign_bucket(im.size, buckets) for im in self.images]
        else:
            self.bucket_of = [(resolution, resolution)] * len(self.images)
        self.latents: dict[int, torch.Tensor] = {}  # index -> cached latents (unflipped)
        self.text_embeddings: dict[str, dict[str, torch.Tensor]] = {}  # caption -> cached embeddings

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_examples(self) -> int:
        """Examples per epoch, repeats included."""
        return sum(im.repeats for im in self.images)

    def load_pixels(self, index: int, flip: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
        item = self.images[index]
        image = Image.fromarray(load_image_file(item.image_path, what="training image"))
        image, crop_top_left = fit_to_bucket(image, self.bucket_of[index])
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), crop_top_left

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        item = self.images[index]
        width, height = self.bucket_of[index]
        example: dict[str, Any] = {
            "index": index,
            "caption": item.caption,
            "original_size": (item.size[1], item.size[0]),
            "target_size": (height, width),
        }
        if index in self.latents and not flip:
            example["latents"] = self.latents[index]
            example["crop_top_left"] = _crop_top_left(item.size, (width, height))
        else:
            example["pixel_values"], example["crop_top_left"] = self.load_pixels(index, flip)
        if item.caption in self.text_embeddings:
            example.update(self.text_embeddings[item.caption])
        return example

    # -- caches ----------------------------------------------------------------------------------
    def reusable_generation_latents(self, index: int, vae_sha256: str | None) -> torch.Tensor | None:
        """Latents saved at generation time, when they came from this VAE and fit this bucket unchanged."""
        item = self.images[index]
        if item.latents_path is None or not vae_sha256 or item.size != self.bucket_of[index]:
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(item.latents_path), framework="pt") as f:
                if (f.metadata() or {}).get("vae_sha256") != vae_sha256:
                    return None
                latents = f.get_tensor("latents")
        except Exception as exc:  # a broken cache file is not fatal: encode the image instead
            logger.warning("ignoring %s: %s", item.latents_path, exc)
            return None
        width, height = self.bucket_of[index]
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (height // self.latent_scale, width // self.latent_scale):
            return None
        return latents.float()

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], *, vae_sha256: str | None = None,
                      batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> int:
        """Fill ``self.latents`` for every image; ``encode`` maps pixels [B,3,H,W] to scaled latents.

        Reuses generation-time latents where ``reusable_generation_latents`` allows. Returns how many
        images were reused.
        """
        reused = 0
        pending: dict[tuple[int, int], list[int]] = {}
        for index in range(len(self)):
            latents = self.reusable_generation_latents(index, vae_sha256)
            if latents is not None:
                self.latents[index] = latents
                reused += 1
            else:
                pending.setdefault(self.bucket_of[index], []).append(index)
        done, total = 0, sum(len(v) for v in pending.values())
        for indices in pending.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                pixels = torch.stack([self.load_pixels(i)[0] for i in chunk])
                with torch.no_grad():
                    latents = encode(pixels).float().cpu()
                for i, lat in zip(chunk, latents, strict=True):
                    self.latents[i] = lat.clone()
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return reused

    def cache_text_embeddings(self, encode: Callable[[list[str]], dict[str, torch.Tensor]],
                              batch_size: int = 16) -> None:
        """Fill ``self.text_embeddings``; ``encode`` maps captions to a dict of batched tensors."""
        captions = sorted({im.caption for im in self.images})
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            with torch.no_grad():
                encoded = encode(chunk)
            for row, caption in enumerate(chunk):
                self.text_embeddings[caption] = {k: v[row].detach().cpu().clone() for k, v in encoded.items()}


def _crop_top_left(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return (resized[1] - height) // 2, (resized[0] - width) // 2


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's examples; tuples become [B,2] long tensors, captions stay a list."""
    batch: dict[str, Any] = {"caption": [e["caption"] for e in examples],
                             "index": torch.tensor([e["index"] for e in examples])}
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
    tensor_keys = [k for k, v in examples[0].items() if isinstance(v, torch.Tensor)]
    for key in tensor_keys:
        if all(key in e for e in examples):
            values = [e[key] for e in examples]
            # Z-Image's cached text embeddings hold each caption's real tokens only: a list then
            same_shape = all(v.shape == values[0].shape for v in values)
            batch[key] = torch.stack(values) if same_shape else values
    if "latents" not in batch and "pixel_values" not in batch:
        # Cached and uncached examples in one batch (config.validate forbids flips with caching).
        raise ValueError("a batch mixes cached latents and images; cache every image or none")
    return batch


# -- batching ----------------------------------------------------------------------------------------

class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, flip)`` from one bucket each, repeats applied, order fixed by (seed, epoch).

    The last batch of a bucket may be smaller (kohya keeps it). ``len()`` does not depend on the
    shuffle, so the number of optimiser steps per epoch is known in advance.

    ``batch_size`` is None on purpose: it is what accelerate's ``BatchSamplerShard`` (several
    processes) reads to tell batches of varying size (deal them out as they are) from fixed-size
    ones, which it tops up with indices from the epoch's first batches, i.e. from other buckets
    (images of another size in one batch), and drops when short. ``images_per_batch`` is the size.
    """

    batch_size = None

    def __init__(self, bucket_of: Sequence[tuple[int, int]], repeats: Sequence[int], batch_size: int,
                 *, seed: int = 0, random_flip: bool = False):
        self.bucket_of, self.repeats = list(bucket_of), list(repeats)
        self.images_per_batch, self.seed, self.random_flip = batch_size, seed, random_flip
        self.epoch = 0
        self._members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            self._members.setdefault(bucket, []).extend([index] * self.repeats[index])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(m) / self.images_per_batch) for m in self._members.values())

    def batches(self, epoch: int) -> list[list[tuple[int, bool]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self._members):
            members = self._members[bucket]
            order = torch.randperm(len(members), generator=generator).tolist()
            flips = (torch.rand(len(members), generator=generator) < 0.5).tolist() if self.random_flip else None
            pairs = [(members[i], bool(flips[i]) if flips else False) for i in order]
            size = self.images_per_batch
            batches += [pairs[s:s + size] for s in range(0, len(pairs), size)]
        batch_order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in batch_order]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        return iter(self.batches(self.epoch))
