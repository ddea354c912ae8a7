"""Names of the training-set format, defined once: file names, suffixes, the kohya folder rule, ids."""

from __future__ import annotations

import re

FORMAT_NAME = "versat2i-training-set"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "dataset.json"
LATENTS_SUFFIX = ".latents.safetensors"
CAPTION_SUFFIX = ".txt"
DEFAULT_REPEATS = 10
# kohya's folder convention: "<repeats>_<name>", e.g. "10_aesthetics".
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


def repeats_folder(repeats: int, aspect: str) -> str:
    return f"{repeats}_{aspect}"


def entry_id(prompt_index: int, candidate_index: int) -> str:
    return f"p{prompt_index:05d}_c{candidate_index:03d}"


# Control characters (C0, DEL, C1): a NUL or an escape code in a caption file breaks the tools that
# read it (kohya's scripts, captioning editors) and is never meant as text.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def caption_for(prompt: str) -> str:
    """The caption written to ``<id>.txt``: the prompt on one line (kohya reads the first line only),
    control characters (NUL, escape codes...) as spaces, runs of spaces as one. The manifest keeps
    the prompt as it was."""
    return " ".join(_CONTROL_CHARACTERS.sub(" ", prompt).split())
