"""Image files in and out, for every part of the pack that reads or writes them (scoring a folder,
training sets, the loop's candidates): float tensors to PNG and back, with clear errors for files
that cannot be used (unreadable, transparent).

Pixels: float 0..1 -> uint8 by ``round(x * 255)`` (round half to even) after clamping, so the
float -> PNG -> float error is at most 0.5/255. (ComfyUI's SaveImage truncates instead, so a
saved pixel can be one level above SaveImage's.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,3] float 0..1 -> uint8 numpy array, rounding to nearest."""
    return image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu().numpy()


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write an [H,W,3] uint8 array as PNG (compression level 4, like ComfyUI's SaveImage)."""
    from PIL import Image

    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", compress_level=4)


def _open_image(path: str | Path, what: str, *, decode: bool):
    """Open an image file, refuse transparency, and return (image, path); ``decode`` reads the pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        image = Image.open(path)
        if decode:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{what} {str(path)!r} can't be read as an image ({exc}); replace or remove it") from None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image.close()
        raise ValueError(
            f"{what} {str(path)!r} has an alpha channel ({image.mode}); save it as RGB (flatten the "
            "transparency onto a background) before scoring or training on it"
        )
    return image


def check_image_file(path: str | Path, *, what: str = "image") -> tuple[int, int]:
    """Cheap up-front check (header only): the file is an image without transparency. Returns
    (width, height). ``load_image_file`` may still fail later on a truncated file."""
    with _open_image(path, what, decode=False) as image:
        return image.size


def load_image_file(path: str | Path, *, what: str = "image") -> np.ndarray:
    """Read an image file as an [H,W,3] uint8 RGB array. Files with transparency are refused
    (scorers and training take RGB; flatten them first); greyscale / palette files without
    transparency are converted to RGB; 16-bit greyscale is scaled to 8 bits."""
    with _open_image(path, what, decode=True) as image:
        if image.mode.startswith("I"):
            # 16-bit greyscale: PIL's convert("RGB") would clip at 255 instead of scaling.
            gray = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
