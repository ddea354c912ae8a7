"""Weight-free scorers: classic image statistics, for tests, the embedded demo and quick checks.

``analytic:<stat>`` (weights hash ``"none"``), higher is better for every one:

============== ======================================================= =====================
stat           definition (on the image as stored: sRGB-encoded, no    range / units
               linearisation; luma = Rec. 601 Y' = .299 R + .587 G
               + .114 B, the luma OpenCV's ``COLOR_RGB2GRAY`` uses)
============== ======================================================= =====================
sharpness      variance of the 3x3 Laplacian ([[0,1,0],[1,-4,1],        >= 0, luma in 0..255
               [0,1,0]]) of luma, reflect-101 borders, population      (so it reads like
               variance: equals ``cv2.Laplacian(gray, cv2.CV_64F)      OpenCV's "blur
               .var()`` on a float gray image in 0..255                detection" numbers)
contrast       RMS contrast: population standard deviation of luma     0..0.5, luma in 0..1
colourfulness  Hasler & Süsstrunk (2003) M = sigma_rgyb + 0.3 mu_rgyb   >= 0, RGB in 0..255
               with rg = R - G, yb = (R + G) / 2 - B                   (their scale: 33 is
                                                                       "moderately", 59
                                                                       "quite", 82 "highly
                                                                       colourful")
brightness     mean luma (brighter is better: a plain statistic; use    0..1
               ``exposure`` to reward neither too dark nor too bright)
exposure       closeness of mean luma to mid-grey: 1 - 2 |mean - 0.5|   0..1
noise          minus the noise standard deviation estimated with        <= 0, luma in 0..255
               Immerkaer's fast estimator (1996): sigma = sqrt(pi/2) /
               (6 (W-2)(H-2)) * sum |luma * N|, N = [[1,-2,1],[-2,4,
               -2],[1,-2,1]] (valid region). Fine texture and edges
               also count as "noise", so it over-estimates sigma on
               highly detailed images.
============== ======================================================= =====================

Sharpness and noise depend on resolution (a downscaled image looks sharper and less noisy): only
compare images of the same size. Every statistic is computed per image, vectorised over the batch
with element-wise float32 tensor ops and per-image sums in float64 (float32 on MPS, which has no
float64), so an image's score does not depend on its batch.

Written by hand rather than with OpenCV / scikit-image because those work one numpy image at a
time on the CPU (and are not dependencies of the pack); these are a few tensor ops that run on
the scoring device over the whole chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import Scorer, ScoringBatch
from .registry import ScorerOptions

# Rec. 601 luma weights (as OpenCV's RGB2GRAY), for images in ComfyUI's [B,H,W,3] layout.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _reduce_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _var(values: torch.Tensor) -> torch.Tensor:
    """Per-image population variance of [B, ...] in float64 (float32 on MPS)."""
    return values.flatten(1).to(_reduce_dtype(values.device)).var(dim=1, correction=0)


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).sum(dim=1, dtype=_reduce_dtype(values.device)) / values[0].numel()


def luma(images: torch.Tensor) -> torch.Tensor:
    """[B,H,W,3] in 0..1 -> [B,H,W] float32 luma in 0..1 (Rec. 601)."""
    rgb = images.float()
    return rgb[..., 0] * LUMA_WEIGHTS[0] + rgb[..., 1] * LUMA_WEIGHTS[1] + rgb[..., 2] * LUMA_WEIGHTS[2]


# Pixel-wise work runs in float32 (element-wise ops give bit-identical results whatever the batch,
# and float32 rounding is ~1e-7 against the 1/255 quantisation of real images); the per-image sums
# run in float64, where float32 would lose digits over millions of pixels.

def sharpness(gray: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of ``gray`` [B,H,W] (0..1), reported on the 0..255 scale."""
    # Slices instead of conv2d: element-wise ops, so no batch-size-dependent conv algorithm.
    padded = F.pad(gray[:, None], (1, 1, 1, 1), mode="reflect")[:, 0]
    laplacian = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1]
    laplacian += padded[:, 1:-1, :-2]
    laplacian += padded[:, 1:-1, 2:]
    laplacian -= 4.0 * gray
    return _var(laplacian) * 255.0**2


def contrast(gray: torch.Tensor) -> torch.Tensor:
    """RMS contrast: population standard deviation of ``gray`` (0..1)."""
    return _var(gray).sqrt()


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Süsstrunk colourfulness of [B,H,W,3] images (0..1), on their 0..255 scale."""
    rgb = images.float()
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    sigma = torch.sqrt(_var(rg) + _var(yb))
    mu = torch.sqrt(_mean(rg) ** 2 + _mean(yb) ** 2)
    return (sigma + 0.3 * mu) * 255.0


def brightness(gray: torch.Tensor) -> torch.Tensor:
    """Mean luma (0..1)."""
    return _mean(gray)


def exposure(gray: torch.Tensor) -> torch.Tensor:
    """1 at mean luma 0.5, falling linearly to 0 at all-black or all-white."""
    return 1.0 - 2.0 * (_mean(gray) - 0.5).abs()


def noise_sigma(gray: torch.Tensor) -> torch.Tensor:
    """Immerkaer's noise standard deviation estimate of ``gray`` [B,H,W] (0..1), on the 0..255 scale."""
    # N = [[1,-2,1],[-2,4,-2],[1,-2,1]] is the outer product of [1,-2,1] with itself: apply it
    # separably (rows, then columns) on the valid region.
    rows = gray[:, :, :-2] + gray[:, :, 2:]
    rows -= 2.0 * gray[:, :, 1:-1]
    response = rows[:, :-2] + rows[:, 2:]
    response -= 2.0 * rows[:, 1:-1]
    height, width = gray.shape[1], gray.shape[2]
    total = response.abs_().flatten(1).sum(dim=1, dtype=_reduce_dtype(gray.device))
    return total * (255.0 * math.sqrt(math.pi / 2.0) / (6.0 * (width - 2) * (height - 2)))


# stat name -> (function of the batch, input: "luma" or "rgb")
STATISTICS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "sharpness": (sharpness, "luma"),
    "contrast": (contrast, "luma"),
    "colourfulness": (colourfulness, "rgb"),
    "brightness": (brightness, "luma"),
    "exposure": (exposure, "luma"),
    "noise": (lambda gray: -noise_sigma(gray), "luma"),
}
# American spelling accepted as an alias; the recorded id is always the canonical one.
ALIASES = {"colorfulness": "colourfulness"}


class AnalyticScorer(Scorer):
    """One image statistic as a scorer (see the module docstring for the definitions)."""

    chunk_size = 64  # cheap element-wise work: memory, not compute, bounds the chunk

    def __init__(self, stat: str, aspect: str = "lowlevel", device: torch.device | str = "cpu"):
        super().__init__(device)
        stat = ALIASES.get(stat, stat)
        if stat not in STATISTICS:
            raise ValueError(
                f"unknown scorer 'analytic:{stat}'; the analytic statistics are "
                + ", ".join(f"analytic:{name}" for name in STATISTICS)
            )
        self.stat = stat
        self.scorer_id = f"analytic:{stat}"
        self.aspect = aspect

    @property
    def weights_hash(self) -> str:
        return "none"

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        function, source = STATISTICS[self.stat]
        if source == "luma":
            # Shared by every analytic scorer of the chunk (score_aspects hands them one ScoringBatch).
            values = function(batch.feature(("analytic", "luma"), lambda: luma(batch.images)))
        else:
            values = function(batch.images)
        return values.float()


def make_scorer(options: ScorerOptions) -> AnalyticScorer:
    """Registry factory: ``analytic:<stat>``; ``options.extra["aspect"]`` overrides the aspect
    label (default "lowlevel")."""
    options.check_extra(("aspect",), "analytic")
    if not options.variant:
        raise ValueError(
            "scorer 'analytic' needs a statistic: use one of "
            + ", ".join(f"analytic:{name}" for name in STATISTICS)
        )
    return AnalyticScorer(options.variant, aspect=options.extra.get("aspect", "lowlevel"), device=options.device)
