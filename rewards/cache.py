"""Loaded models and scorers, kept for the life of the process.

Loading CLIP ViT-L/14 takes seconds and 1.7 GB, so every model is loaded once and shared:

- ``MODELS`` holds models keyed by what they are built from (``("open_clip", architecture,
  weight file)``...), so aesthetics, CLIP score and CLIP-IQA, which all name the same CLIP file,
  get the same instance. Each entry also stores the weight files' identity (``safe_io.file_identity``:
  size, mtime, inode, ctime): a file replaced on disk is loaded again on the next request instead of
  serving stale weights.
- ``SCORERS`` holds the scorer objects ``registry.get_scorer`` built, keyed by name, search dirs,
  device and options, so asking again (every ComfyUI queue run) costs a dict lookup and a few
  ``stat`` calls.

``offload()`` moves everything to the CPU (a scorer's next call moves its models back);
``clear()`` forgets everything (memory is freed once no scorer object is referenced any more).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..safe_io import file_identity

logger = logging.getLogger(__name__)


def stamp_files(paths: Sequence[str | Path]) -> tuple | None:
    """The ``safe_io.file_identity`` of each file; None when one is gone (the entry is then stale)."""
    try:
        return tuple(file_identity(path) for path in paths)
    except OSError:
        return None


@dataclass
class _Entry:
    stamp: Any
    value: Any


class ModelCache:
    """A thread-safe ``key -> object`` cache whose entries are rebuilt when their stamp changes."""

    def __init__(self, name: str):
        self.name = name
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.RLock()
        self.loads = 0  # how many times a loader ran (tests and benchmarks read it)

    def get_or_load(self, key: Hashable, load: Callable[[], Any], *, stamp: Any = None) -> Any:
        """The cached value of ``key`` if its stamp is ``stamp``; else ``load()`` (stored)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.stamp == stamp:
                return entry.value
            if entry is not None:
                logger.info("%s cache: %s changed on disk, loading it again", self.name, key)
                del self._entries[key]  # let the old model go before the new one is loaded
                entry = None
            value = load()
            self.loads += 1
            self._entries[key] = _Entry(stamp, value)
            return value

    def get_entry(self, key: Hashable) -> tuple[Any, Any] | None:
        """``(stamp, value)`` of ``key``, or None."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else (entry.stamp, entry.value)

    def put(self, key: Hashable, value: Any, *, stamp: Any = None) -> None:
        with self._lock:
            self._entries[key] = _Entry(stamp, value)

    def entries(self) -> list[tuple[Hashable, Any]]:
        with self._lock:
            return [(key, entry.value) for key, entry in self._entries.items()]

    def offload(self) -> None:
        """Move every cached object that has ``offload()`` or ``to()`` to the CPU."""
        for _, value in self.entries():
            if hasattr(value, "offload"):
                value.offload()
            elif hasattr(value, "to"):
                value.to("cpu")

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


MODELS = ModelCache("model")
SCORERS = ModelCache("scorer")


def get_scorer_cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """The scorer cached under ``key``, rebuilt when one of its ``weight_files()`` changed."""
    entry = SCORERS.get_entry(key)
    if entry is not None:
        stamp, scorer = entry
        if stamp_files(scorer.weight_files()) == stamp:
            return scorer
        logger.info("scorer %r: its weight files changed on disk, building it again", key)
    scorer = build()
    SCORERS.put(key, scorer, stamp=stamp_files(scorer.weight_files()))
    return scorer


def offload() -> None:
    """Move every cached scorer and model to the CPU and release cached accelerator memory. The
    scorers keep their device: their next call moves the models back."""
    SCORERS.offload()
    MODELS.offload()
    _empty_accelerator_cache()


def clear() -> None:
    """Forget every cached scorer and model (and free them once nothing else references them)."""
    SCORERS.clear()
    MODELS.clear()
    gc.collect()
    _empty_accelerator_cache()


def _empty_accelerator_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()
