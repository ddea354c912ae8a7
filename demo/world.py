"""The embedded demo world: coloured shapes on plain backgrounds, with captions from a fixed grammar.

Everything here is deterministic and weight-free: the renderer draws the real training images the
demo base model is trained on (``demo/train_base.py``), and the same shape geometry is what the
demo rewards fit to generated images (``demo/rewards.py``).

A scene is one caption: ``"a {colour} {shape} on a {background} background"`` ("an" before a
vowel). A rendered image of a scene also has a random layout (centre, size, rotation) drawn from
its seed, so the world has the variety a text-to-image model has to learn and a reward can prefer
(composition).

Shapes are drawn from signed distance functions with analytic anti-aliasing (coverage =
clamp(0.5 - distance_in_pixels)), which is exact enough for 1-pixel edges and needs no
supersampling; the geometry reward rasterises its ideal templates the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32  # pixels; the demo base model generates this size (divisible by 8 for diffusers)

# RGB in 0..1. Shape colours are far apart from each other and from every background (the closest
# pair, purple on gray, is 0.53 apart in RGB), so a colour can be told from its pixels alone.
SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.10, 0.85),
    "orange": (1.00, 0.55, 0.10),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
SHAPES = ("circle", "square", "triangle")
# Rotational symmetry of each shape: rotating by this angle gives the same shape.
SHAPE_SYMMETRY = {"circle": 2 * math.pi, "square": math.pi / 2, "triangle": 2 * math.pi / 3}

CAPTION_TEMPLATE = "{article} {colour} {shape} on a {background} background"
_CAPTION_RE = re.compile(r"^\s*an? (?P<colour>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background\s*$")

# Layout of rendered scenes (fractions of the image size): the equal-area radius of the shape and
# where its centre may fall. Shapes stay inside the image, mostly; the rewards still cope with
# generated shapes that touch the border.
RADIUS_RANGE = (0.16, 0.28)
CENTRE_RANGE = (0.30, 0.70)


@dataclass(frozen=True, order=True)
class Scene:
    """What a caption names."""

    shape: str
    colour: str
    background: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not in the demo world; use one of {', '.join(SHAPES)}")
        if self.colour not in SHAPE_COLOURS:
            raise ValueError(
                f"colour {self.colour!r} is not in the demo world; use one of {', '.join(SHAPE_COLOURS)}"
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"background {self.background!r} is not in the demo world; use one of {', '.join(BACKGROUNDS)}"
            )

    @property
    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return CAPTION_TEMPLATE.format(
            article=article, colour=self.colour, shape=self.shape, background=self.background
        )


@dataclass(frozen=True)
class Layout:
    """Where a shape sits: centre and equal-area radius in pixels, rotation in radians."""

    centre_x: float
    centre_y: float
    radius: float
    angle: float


def parse_caption(caption: str) -> Scene:
    """The scene a caption names; ValueError naming the grammar when it is not a demo caption."""
    match = _CAPTION_RE.match(caption.lower())
    if match is None:
        raise ValueError(
            f"prompt {caption!r} is not a demo-world caption; demo prompts read "
            f"'a/an {{colour}} {{shape}} on a {{background}} background' (colours: {', '.join(SHAPE_COLOURS)}; "
            f"shapes: {', '.join(SHAPES)}; "
            f"backgrounds: {', '.join(BACKGROUNDS)})"
        )
    return Scene(shape=match["shape"], colour=match["colour"], background=match["background"])


def all_scenes() -> list[Scene]:
    """Every scene of the world, in a fixed order (shape, colour, background)."""
    return [Scene(s, c, b) for s in SHAPES for c in SHAPE_COLOURS for b in BACKGROUNDS]


def prompt_split() -> tuple[list[str], list[str]]:
    """(loop prompts, held-out prompts): a fixed split of all captions, about 3:1.

    The held-out quarter is a Latin-square-like pick (at most one background per shape x colour
    pair), so every shape, colour and background occurs in both halves, while each held-out caption
    is a combination the loop never generates. The base model is trained on all captions (it is the
    "pretrained" model); the split separates the loop's training prompts from its evaluation.
    """
    loop, held_out = [], []
    for i, shape in enumerate(SHAPES):
        for j, colour in enumerate(SHAPE_COLOURS):
            for k, background in enumerate(BACKGROUNDS):
                caption = Scene(shape, colour, background).caption
                # Three in four shape x colour pairs lose exactly one background to the held-out set.
                (held_out if (i + 2 * j + k) % 4 == 0 else loop).append(caption)
    return loop, held_out


def random_layout(seed: int, size: int = IMAGE_SIZE) -> Layout:
    """The layout of the scene rendered with ``seed`` (same seed, same layout, on any machine)."""
    generator = torch.Generator().manual_seed(int(seed))
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    lo, hi = CENTRE_RANGE
    r_lo, r_hi = RADIUS_RANGE
    return Layout(
        centre_x=(lo + (hi - lo) * u[0]) * size,
        centre_y=(lo + (hi - lo) * u[1]) * size,
        radius=(r_lo + (r_hi - r_lo) * u[2]) * size,
        angle=u[3] * 2 * math.pi,
    )


def pixel_grid(size: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) coordinates of pixel centres, each ``[size, size]``."""
    coords = torch.arange(size, dtype=dtype) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x, y


def signed_distance(
    shape: str,
    x: torch.Tensor,
    y: torch.Tensor,
    centre_x: torch.Tensor | float,
    centre_y: torch.Tensor | float,
    radius: torch.Tensor | float,
    angle: torch.Tensor | float,
) -> torch.Tensor:
    """Signed distance (pixels, negative inside) to a shape of equal-area radius ``radius``.

    Circle: exact. Regular polygons (square, triangle): max over the edges of the distance to each
    edge's line, exact inside and within a fraction of a pixel near the outline, which is all the
    anti-aliasing needs. Broadcasts: parameters may be tensors shaped to broadcast against x/y.
    """
    dx, dy = x - centre_x, y - centre_y
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        sides = 4
    elif shape == "triangle":
        sides = 3
    else:
        raise ValueError(f"shape {shape!r} is not in the demo world; use one of {', '.join(SHAPES)}")
    # Apothem of the regular polygon with the same area as a circle of this radius:
    # area = sides * apothem^2 * tan(pi / sides) = pi * radius^2.
    apothem = radius * math.sqrt(math.pi / (sides * math.tan(math.pi / sides)))
    distance = None
    for k in range(sides):
        theta = angle + 2 * math.pi * k / sides
        if isinstance(theta, torch.Tensor):
            cos, sin = torch.cos(theta), torch.sin(theta)
        else:
            cos, sin = math.cos(theta), math.sin(theta)
        edge = dx * cos + dy * sin - apothem
        distance = edge if distance is None else torch.maximum(distance, edge)
    return distance


def coverage(distance: torch.Tensor) -> torch.Tensor:
    """Anti-aliased pixel coverage from a signed distance in pixels."""
    return (0.5 - distance).clamp(0.0, 1.0)


def render(scene: Scene | str, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The real image of ``scene`` (a Scene or its caption) with the layout of ``seed``:
    float32 ``[size, size, 3]`` in 0..1 (one ComfyUI IMAGE frame)."""
    if isinstance(scene, str):
        scene = parse_caption(scene)
    layout = random_layout(seed, size)
    params = torch.tensor([[layout.centre_x, layout.centre_y, layout.radius, layout.angle]], dtype=torch.float64)
    return render_scenes([scene], params, size)[0]


def render_scenes(scenes: Sequence[Scene], layouts: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Vectorised renderer: ``layouts`` is ``[B, 4]`` (centre x, centre y, radius in pixels, angle);
    returns float32 ``[B, size, size, 3]`` on the layouts' device. Computed in the layouts' dtype
    (float64 for the reference renderer, float32 is fine for training batches)."""
    if len(scenes) != layouts.shape[0]:
        raise ValueError(f"layouts: {layouts.shape[0]} layout(s) for {len(scenes)} scene(s)")
    dtype, device = layouts.dtype, layouts.device
    x, y = pixel_grid(size, dtype)
    x, y = x.to(device), y.to(device)
    centre_x, centre_y, radius, angle = (layouts[:, i].view(-1, 1, 1) for i in range(4))
    mask = torch.zeros(len(scenes), size, size, dtype=dtype, device=device)
    for shape in SHAPES:
        rows = torch.tensor([s.shape == shape for s in scenes], device=device)
        if bool(rows.any()):
            distance = signed_distance(shape, x, y, centre_x[rows], centre_y[rows], radius[rows], angle[rows])
            mask[rows] = coverage(distance)
    foreground = torch.tensor([SHAPE_COLOURS[s.colour] for s in scenes], dtype=dtype, device=device)
    background = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=dtype, device=device)
    mask = mask[..., None]
    return (mask * foreground[:, None, None, :] + (1 - mask) * background[:, None, None, :]).float()


def random_layouts(count: int, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[count, 4]`` random layouts (float64) from the same distribution as ``random_layout``."""
    u = torch.rand(count, 4, generator=generator, dtype=torch.float64)
    lo, hi = CENTRE_RANGE
    r_lo, r_hi = RADIUS_RANGE
    scale = torch.tensor([(hi - lo) * size, (hi - lo) * size, (r_hi - r_lo) * size, 2 * math.pi], dtype=torch.float64)
    offset = torch.tensor([lo * size, lo * size, r_lo * size, 0.0], dtype=torch.float64)
    return u * scale + offset


def render_batch(captions: Sequence[str], seeds: Iterable[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[B, size, size, 3]`` real images, one per (caption, seed) pair."""
    seeds = list(seeds)
    if len(seeds) != len(captions):
        raise ValueError(f"seeds: {len(seeds)} seed(s) for {len(captions)} caption(s); give one seed per caption")
    return torch.stack([render(caption, seed, size) for caption, seed in zip(captions, seeds)])


def replay_images(captions: Sequence[str], count: int, seed: int = 10_000_000) -> tuple[torch.Tensor, list[str]]:
    """``count`` real rendered images for replay during LoRA training (cycling through
    ``captions``), with their captions: ``([count, H, W, 3], captions)``. Seeds start at ``seed``,
    far from the seeds generation uses, so replay never repeats a candidate's layout."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not captions:
        raise ValueError("captions: no caption to render; give the loop's prompts")
    chosen = [captions[i % len(captions)] for i in range(count)]
    if count == 0:
        return torch.zeros(0, IMAGE_SIZE, IMAGE_SIZE, 3), []
    return render_batch(chosen, range(seed, seed + count)), chosen
