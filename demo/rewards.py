"""Analytic rewards of the demo world, one per VersaT2I aspect, standing in for the real scorers.

Each measures one thing a viewer of the demo world would judge, from the pixels (alignment and
geometry also read the prompt), with no weights, so the demo loop's claims can be checked against a ground
truth that cannot be gamed by a learned reward model's blind spots:

- ``demo:alignment`` - does the image show the colour and the shape its prompt names? The mean
  of two separate pieces of evidence: colour (the share of foreground pixels explained by the named
  colour rather than another palette colour) and shape (how much better the named shape fits the
  foreground than the other shapes). The background is left out: the base model almost always gets
  it right, and mixing it in only dilutes the colour/shape signal.
- ``demo:geometry`` - how well formed the named shape is: the soft IoU between the foreground and
  the best-fitting ideal shape of the kind the prompt names (any rotation, small shifts and
  scales). Prompt-free regularity (the best of any shape) was tried first: round blobs fit a circle
  best, so selecting on it taught the LoRA to round every shape off (shape match fell).
- ``demo:aesthetics`` - colour contrast between shape and background, and a composed layout
  (shape near the centre, at a moderate size).
- ``demo:lowlevel`` - low-level quality: sharp edges (edge gradient relative to the shape's
  contrast), no noise (robust noise estimates from the median absolute Laplacian, inside the
  shape and in the background, averaged so that the score does not depend on the shape's size),
  and a clean fill (no blotches: the colour spread inside the shape).

All scores lie in 0..1, higher is better, and each image is scored on its own (the contract of
rewards/base.py). Alignment and geometry read the prompt (the named colour / shape); aesthetics
and low-level quality are prompt-free. Rendered real images score near 1 on alignment, geometry and
low-level quality; on aesthetics ~0.7 (their layouts are random, not composed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..aspects import ASPECTS
from ..rewards.base import ImageBatchError, Scorer, ScoringBatch
from ..rewards.registry import ScorerEntry, ScorerOptions, register_scorer
from . import world

# Foreground: pixels whose colour differs from the background estimate by more than this (RGB
# distance, soft ramp between the two values). Every palette colour is >= 0.53 from every background.
MASK_RAMP = (0.12, 0.30)
# Below this many foreground pixels there is no shape to judge (real shapes cover >= 80 px at 32 px).
MIN_AREA_FRACTION = 0.04
# Temperatures of the soft choices between palette colours (squared RGB distance) and shapes (IoU).
COLOUR_TEMPERATURE = 0.02
SHAPE_TEMPERATURE = 0.04
# Aesthetics: preferred centre offset scale and area fraction of the shape.
CENTRE_SCALE = 0.18
TARGET_AREA_FRACTION = 0.16
# Low-level: an image with per-pixel noise of std sigma scores exp(-sigma / NOISE_SCALE) on noise.
NOISE_SCALE = 0.03
# Template search of the shape fit: rotation steps per symmetry period, centre shifts (px), scales.
FIT_ANGLES = 12
FIT_SHIFTS = (-1.0, 0.0, 1.0)
FIT_SCALES = (0.9, 1.0, 1.12)

_PALETTE_NAMES = tuple(world.SHAPE_COLOURS)


def _palette(device: torch.device) -> torch.Tensor:
    return torch.tensor([world.SHAPE_COLOURS[name] for name in _PALETTE_NAMES], device=device)


def background_colour(images: torch.Tensor) -> torch.Tensor:
    """Per-image background estimate ``[B,3]``: the median of the border pixels, which holds as long
    as the shape covers less than half of the border."""
    border = torch.cat([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], dim=1)
    return border.median(dim=1).values


def foreground_mask(images: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask ``[B,H,W]`` in 0..1 from the colour distance to the background:
    a coarse threshold mask first, then per-pixel coverage (distance / shape contrast), so an
    anti-aliased edge pixel counts by how much of it the shape covers."""
    distance = (images - background[:, None, None, :]).norm(dim=-1)
    lo, hi = MASK_RAMP
    coarse = ((distance - lo) / (hi - lo)).clamp(0.0, 1.0)
    core = _erode(coarse) ** 2
    weight = core.sum(dim=(1, 2))
    # Shape contrast: mean distance in the eroded core (or of the coarse mask when nothing survives).
    contrast = torch.where(
        weight > 1.0,
        (core * distance).sum(dim=(1, 2)) / weight.clamp_min(1e-6),
        (coarse * distance).sum(dim=(1, 2)) / coarse.sum(dim=(1, 2)).clamp_min(1e-6),
    ).clamp_min(hi)
    coverage = (distance / contrast[:, None, None]).clamp(0.0, 1.0)
    return coverage * ((distance - lo / 2) / (lo / 2)).clamp(0.0, 1.0)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 minimum filter of a ``[B,H,W]`` mask (borders replicated)."""
    padded = F.pad(mask[:, None], (1, 1, 1, 1), mode="replicate")
    return -F.max_pool2d(-padded, 3, stride=1)[:, 0]


def _template_iou(
    shape: str, mask: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    centre_x: torch.Tensor, centre_y: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor,
) -> torch.Tensor:
    """Soft IoU ``[B, P]`` of each mask with P templates (parameters shaped ``[B or 1, P, 1, 1]``)."""
    template = world.coverage(world.signed_distance(shape, x, y, centre_x, centre_y, radius, angle))
    m = mask[:, None]
    overlap = torch.minimum(m, template).sum(dim=(2, 3))
    return overlap / torch.maximum(m, template).sum(dim=(2, 3)).clamp_min(1e-6)


def shape_fit(mask: torch.Tensor) -> torch.Tensor:
    """Soft IoU ``[B, len(world.SHAPES)]`` of the mask with the best ideal template of each shape.

    Templates have the mask's area and centroid; the rotation is searched first, then small shifts
    and scales around it, so a shape cut by the border (biased centroid and area) or drawn slightly
    off-size still fits. Two coarse stages instead of one joint grid: ~6x fewer templates.
    """
    height = mask.shape[1]
    x, y = world.pixel_grid(height, mask.dtype)
    x, y = x.to(mask.device), y.to(mask.device)
    area = mask.sum(dim=(1, 2)).clamp_min(1e-6)
    centre_x = ((mask * x).sum(dim=(1, 2)) / area).view(-1, 1, 1, 1)
    centre_y = ((mask * y).sum(dim=(1, 2)) / area).view(-1, 1, 1, 1)
    radius = torch.sqrt(area / math.pi).view(-1, 1, 1, 1)
    shifts = torch.tensor(FIT_SHIFTS, dtype=mask.dtype, device=mask.device)
    scales = torch.tensor(FIT_SCALES, dtype=mask.dtype, device=mask.device)
    sx, sy, s = (t.reshape(1, -1, 1, 1) for t in torch.meshgrid(shifts, shifts, scales, indexing="ij"))
    fits = []
    for shape in world.SHAPES:
        steps = 1 if shape == "circle" else FIT_ANGLES
        angles = torch.arange(steps, dtype=mask.dtype, device=mask.device) * (world.SHAPE_SYMMETRY[shape] / steps)
        iou = _template_iou(shape, mask, x, y, centre_x, centre_y, radius, angles.view(1, -1, 1, 1))
        best_angle = angles[iou.argmax(dim=1)].view(-1, 1, 1, 1)
        iou = _template_iou(shape, mask, x, y, centre_x + sx, centre_y + sy, radius * s, best_angle)
        fits.append(iou.max(dim=1).values)
    return torch.stack(fits, dim=1)


def _colour_posterior(images: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Per pixel, the probability ``[B,H,W,C]`` that it is the background blended with each palette
    colour (unmixing: a 1-px anti-aliased edge pixel is still explained by its true colour)."""
    palette = _palette(images.device)  # [C,3]
    offset = images - background[:, None, None, :]  # [B,H,W,3]
    direction = palette[None, :, :] - background[:, None, :]  # [B,C,3]
    norm2 = (direction * direction).sum(-1).clamp_min(1e-6)  # [B,C]
    alpha = (torch.einsum("bhwk,bck->bhwc", offset, direction) / norm2[:, None, None, :]).clamp(0.0, 1.0)
    residual = offset[..., None, :] - alpha[..., None] * direction[:, None, None, :, :]  # [B,H,W,C,3]
    return torch.softmax(-(residual * residual).sum(-1) / COLOUR_TEMPERATURE, dim=-1)


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Image shifted by (dy, dx) with replicated borders; ``[B,H,W,3]``."""
    padded = F.pad(images.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    height, width = images.shape[1:3]
    return padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]


def _masked_median(values: torch.Tensor, where: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per-image median of ``values[where]`` ``[B]``; the median of ``fallback`` where fewer than 8
    pixels are selected. A loop over the batch: per-image masks select different counts."""
    medians = []
    for value, keep, other in zip(values, where, fallback):
        selected = value[keep]
        medians.append(selected.median() if selected.numel() >= 8 else other.flatten().median())
    return torch.stack(medians)


def analyse(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt-free measurements of each image, shared by the four rewards (one pass per chunk)."""
    images = images.float()
    height, width = images.shape[1:3]
    background = background_colour(images)
    mask = foreground_mask(images, background)
    area = mask.sum(dim=(1, 2))
    presence = (area / (MIN_AREA_FRACTION * height * width)).clamp(0.0, 1.0)
    core = _erode(mask) ** 2  # the shape's inside, away from anti-aliased edges
    core_weight = core.sum(dim=(1, 2)).clamp_min(1e-6)
    foreground = (core[..., None] * images).sum(dim=(1, 2)) / core_weight[:, None]
    spread = torch.sqrt(
        (core[..., None] * (images - foreground[:, None, None, :]) ** 2).sum(dim=(1, 2, 3)) / core_weight
    )
    contrast = (foreground - background).norm(dim=-1)

    x, y = world.pixel_grid(height, images.dtype)
    x, y = x.to(images.device), y.to(images.device)
    safe_area = area.clamp_min(1e-6)
    centre_offset = torch.sqrt(
        ((mask * x).sum(dim=(1, 2)) / safe_area - width / 2) ** 2
        + ((mask * y).sum(dim=(1, 2)) / safe_area - height / 2) ** 2
    ) / max(height, width)

    # Edge sharpness: central differences span 2 px, so an anti-aliased step edge gives ~contrast
    # at any sub-pixel position while a blurred one gives a fraction of it.
    grad_x = (_shift(images, 0, 1) - _shift(images, 0, -1)).norm(dim=-1)
    grad_y = (_shift(images, 1, 0) - _shift(images, -1, 0)).norm(dim=-1)
    gradient = torch.sqrt(grad_x ** 2 + grad_y ** 2).flatten(1)
    perimeter = 2 * torch.sqrt(math.pi * safe_area)  # the shortest outline of this area (a circle)
    edge_pixels = (0.5 * perimeter).round().clamp(4, gradient.shape[1]).long()
    ranked = gradient.sort(dim=1, descending=True).values
    keep = torch.arange(gradient.shape[1], device=images.device)[None, :] < edge_pixels[:, None]
    edge_gradient = (ranked * keep).sum(dim=1) / edge_pixels
    sharpness = (edge_gradient / (0.9 * contrast.clamp_min(0.05))).clamp(0.0, 1.0)

    # Noise: median absolute 4-neighbour Laplacian (for i.i.d. Gaussian noise of std s it is
    # ~3.0 s), taken separately inside the shape and in the background, away from edges, and
    # averaged: a noise estimate over the whole image would fall with the shape's area (a textured
    # fill counts less when the shape is small), and selecting on it would shrink the shapes.
    laplacian = (
        _shift(images, 0, 1) + _shift(images, 0, -1) + _shift(images, 1, 0) + _shift(images, -1, 0) - 4 * images
    ).abs().mean(dim=-1)
    inside = _erode(mask) > 0.95
    outside = _erode(1.0 - mask) > 0.95
    noise_sigma = torch.stack([
        _masked_median(laplacian, inside, fallback=laplacian),
        _masked_median(laplacian, outside, fallback=laplacian),
    ]).mean(dim=0) / 3.0

    return {
        "background": background,
        "mask": mask,
        "area": area,
        "presence": presence,
        "foreground": foreground,
        "spread": spread,
        "contrast": contrast,
        "centre_offset": centre_offset,
        "sharpness": sharpness,
        "noise_sigma": noise_sigma,
        "shape_fit": shape_fit(mask),
    }


def components(images: torch.Tensor, prompts: list[str], analysis: dict | None = None) -> dict[str, torch.Tensor]:
    """Every sub-score of every aspect, ``{name: [B]}``; the four aspect rewards are combinations of
    these (kept separate for reports: e.g. colour vs shape evidence of alignment)."""
    a = analysis if analysis is not None else analyse(images)
    height, width = images.shape[1:3]
    presence = a["presence"]
    scenes = [world.parse_caption(prompt) for prompt in prompts]
    colour_index = torch.tensor([_PALETTE_NAMES.index(s.colour) for s in scenes], device=images.device)
    shape_index = torch.tensor([world.SHAPES.index(s.shape) for s in scenes], device=images.device)

    posterior = _colour_posterior(images.float(), a["background"])  # [B,H,W,C]
    named = posterior.gather(-1, colour_index.view(-1, 1, 1, 1).expand(-1, height, width, 1))[..., 0]
    colour_match = (a["mask"] * named).sum(dim=(1, 2)) / a["area"].clamp_min(1e-6)
    shape_match = torch.softmax(a["shape_fit"] / SHAPE_TEMPERATURE, dim=1).gather(1, shape_index[:, None])[:, 0]

    fraction = a["area"] / (height * width)
    return {
        "colour_match": colour_match * presence,
        "shape_match": shape_match * presence,
        "regularity": a["shape_fit"].gather(1, shape_index[:, None])[:, 0] * presence,
        "contrast": (a["contrast"] / 0.9).clamp(0.0, 1.0) * presence,
        "flat_fill": torch.exp(-a["spread"] / 0.08) * presence,
        "centring": torch.exp(-((a["centre_offset"] / CENTRE_SCALE) ** 2)) * presence,
        "size": torch.exp(-((torch.log(fraction.clamp_min(1e-4) / TARGET_AREA_FRACTION) / 0.6) ** 2)) * presence,
        "sharpness": a["sharpness"] * presence,
        "noise_free": torch.exp(-a["noise_sigma"] / NOISE_SCALE),
    }


# Each aspect's reward: the mean of these components.
ASPECT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "alignment": ("colour_match", "shape_match"),
    "geometry": ("regularity",),
    "aesthetics": ("contrast", "centring", "size"),
    "lowlevel": ("sharpness", "noise_free", "flat_fill"),
}
assert set(ASPECT_COMPONENTS) == set(ASPECTS)


class DemoScorer(Scorer):
    """One demo-world aspect reward (see the module docstring). Weight-free and deterministic."""

    chunk_size = 64

    def __init__(self, aspect: str) -> None:
        super().__init__()
        if aspect not in ASPECT_COMPONENTS:
            raise ValueError(
                f"demo scorer variant {aspect!r} is unknown; use one of "
                + ", ".join(f"demo:{name}" for name in ASPECT_COMPONENTS)
            )
        self.aspect = aspect
        self.scorer_id = f"demo:{aspect}"

    @property
    def weights_hash(self) -> str:
        return "none"

    def score_batch(self, batch: ScoringBatch) -> torch.Tensor:
        analysis = batch.feature(("demo", "analysis"), lambda: analyse(batch.images))
        try:
            parts = batch.feature(
                ("demo", "components"), lambda: components(batch.images, batch.prompts, analysis)
            )
        except ValueError as exc:  # a prompt outside the demo grammar
            raise ImageBatchError(f"prompts: {exc}") from exc
        names = ASPECT_COMPONENTS[self.aspect]
        return torch.stack([parts[name] for name in names]).mean(dim=0)


def make_scorer(options: ScorerOptions) -> DemoScorer:
    """Registry factory: ``demo:<aspect>``."""
    if not options.variant:
        raise ValueError(
            "scorer 'demo' needs an aspect: use one of " + ", ".join(f"demo:{name}" for name in ASPECT_COMPONENTS)
        )
    return DemoScorer(options.variant).to(options.device)


DEMO_SCORER_ID = "demo"


def register_scorers() -> None:
    """Make ``demo:<aspect>`` known to the scorer registry (the loop's demo and ``versat2i`` call this;
    ComfyUI's Load Scorers never does, so the demo's stand-ins stay out of its lists)."""
    register_scorer(DEMO_SCORER_ID, ScorerEntry(
        make_scorer, "alignment",
        "the embedded demo world's analytic rewards: demo:alignment, :geometry, :aesthetics, :lowlevel",
        variants=tuple(ASPECT_COMPONENTS),
    ))
