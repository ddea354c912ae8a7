"""Read kohya-style folders as users have them: a training set (``<repeats>_<aspect>/`` folders of
images with ``.txt`` captions) and a replay folder (real captioned images).

The files on disk are the truth: users curate kohya folders by deleting images and editing
captions, so an image missing from the manifest is still trained and a manifest row whose image
was deleted is skipped. Every image is decoded once here, so a damaged file fails before any work
starts, not hours into training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..image_files import IMAGE_FILE_EXTENSIONS, load_image_file
from .layout import CAPTION_SUFFIX, LATENTS_SUFFIX, MANIFEST_NAME, REPEATS_FOLDER
from .manifest import read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingImage:
    id: str
    image_path: Path
    caption: str
    aspect: str
    repeats: int
    size: tuple[int, int]  # (width, height) of the file
    latents_path: Path | None = None  # generation-time latents next to the image, if any


# -- reading the folder ----------------------------------------------------------------------------

def scan_training_set(dataset_dir: str | os.PathLike, aspect: str = "") -> list[TrainingImage]:
    """Every image of ``aspect`` (all aspects when empty) with its caption and repeat count.

    Raises ValueError naming the folder or file for: a missing folder, no ``<repeats>_<aspect>``
    folder, no images, an unreadable image, or an image with neither a ``.txt`` caption nor a
    manifest caption.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ValueError(f"dataset {root}: no such folder; give the folder Save Training Set wrote")
    folders = []
    for child in sorted(root.iterdir()):
        match = REPEATS_FOLDER.match(child.name)
        if child.is_dir() and match:
            folders.append((child, int(match.group(1)), match.group(2)))
    if not folders:
        raise ValueError(f"dataset {root}: no '<repeats>_<aspect>' folders (e.g. '10_aesthetics'); "
                         "is this a training-set folder?")
    known_aspects = sorted({name for _, _, name in folders})
    if aspect:
        folders = [f for f in folders if f[2] == aspect]
        if not folders:
            raise ValueError(f"dataset {root}: no folder for aspect {aspect!r}; it has {', '.join(known_aspects)}")
    manifest_captions = _manifest_captions(root)
    images: list[TrainingImage] = []
    for folder, repeats, folder_aspect in folders:
        if repeats < 1:
            logger.warning("skipping %s: 0 repeats", folder)
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_FILE_EXTENSIONS or not path.is_file():
                continue
            caption = _read_caption(path, manifest_captions)
            images.append(TrainingImage(
                id=path.stem, image_path=path, caption=caption, aspect=folder_aspect, repeats=repeats,
                size=_checked_image_size(path),
                latents_path=_existing(path.with_name(path.stem + LATENTS_SUFFIX)),
            ))
    if not images:
        where = ", ".join(str(f[0].name) for f in folders)
        raise ValueError(f"dataset {root}: no images ({'/'.join(IMAGE_FILE_EXTENSIONS)}) in {where}; the training set "
                         "is empty (did every candidate fall below the threshold?)")
    return images


def _manifest_captions(root: Path) -> dict[str, str]:
    """image path (relative, '/'-separated) -> caption from manifest.jsonl (empty if there is none)."""
    if not (root / MANIFEST_NAME).is_file():
        return {}
    return {Path(entry.file).as_posix(): entry.caption for entry in read_manifest(root)}


def _read_caption(image_path: Path, manifest_captions: dict[str, str]) -> str:
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if caption_path.is_file():
        return caption_path.read_text(encoding="utf-8").strip()
    relative = f"{image_path.parent.name}/{image_path.name}"  # as the manifest's "file" field
    if relative in manifest_captions:
        return manifest_captions[relative].strip()
    raise ValueError(f"image {image_path}: no caption; add {caption_path.name} next to it (kohya layout)")


def _checked_image_size(path: Path) -> tuple[int, int]:
    """(width, height), after decoding the whole file once: a damaged image fails here, before
    anything is written, not hours into training."""
    height, width = load_image_file(path, what="training image").shape[:2]
    return width, height


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def scan_replay_dir(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a replay folder: every image with a ``.txt`` caption beside it, in
    name order. Images without a caption are an error (kohya's regularisation folders work the same)."""
    folder = Path(folder)
    pairs, uncaptioned = [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_FILE_EXTENSIONS or path.name.startswith("."):
            continue
        caption_file = path.with_suffix(CAPTION_SUFFIX)
        if not caption_file.is_file():
            uncaptioned.append(path.name)
            continue
        caption = " ".join(caption_file.read_text(encoding="utf-8").split())
        if not caption:
            uncaptioned.append(path.name)
            continue
        pairs.append((path, caption))
    if uncaptioned:
        raise ValueError(f"replay_dir {str(folder)!r}: {len(uncaptioned)} image(s) without a caption "
                         f"(e.g. {uncaptioned[0]}); put <name>.txt with its caption beside each image")
    if not pairs:
        raise ValueError(f"replay_dir {str(folder)!r}: no captioned image (<name>.png + <name>.txt)")
    return pairs
