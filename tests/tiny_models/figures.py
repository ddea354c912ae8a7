"""Small synthetic pictures for the geometry scorer's tests: a flat drawn person MediaPipe Pose
detects, and images with nobody in them. Drawn in code (PIL), nothing downloaded."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def draw_figure(size: int = 256) -> torch.Tensor:
    """A flat drawn person (head, shirt, arms, trousers, shoes) MediaPipe Pose detects."""
    image = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    scale = size / 512

    def at(x, y):
        return (x * scale, y * scale)

    skin, shirt, trousers = (230, 190, 160), (200, 40, 40), (40, 40, 120)
    draw.ellipse([at(226, 40), at(286, 110)], fill=skin)
    draw.rectangle([at(248, 105), at(264, 125)], fill=skin)
    draw.polygon([at(206, 125), at(306, 125), at(296, 260), at(216, 260)], fill=shirt)
    limbs = [((216, 135), (180, 200), shirt), ((296, 135), (332, 200), shirt),
             ((180, 200), (160, 260), skin), ((332, 200), (352, 260), skin),
             ((236, 260), (226, 360), trousers), ((276, 260), (286, 360), trousers),
             ((226, 360), (222, 455), trousers), ((286, 360), (290, 455), trousers)]
    for start, end, colour in limbs:
        draw.line([at(*start), at(*end)], fill=colour, width=int(22 * scale))
        draw.ellipse([at(end[0] - 11, end[1] - 11), at(end[0] + 11, end[1] + 11)], fill=colour)
    for x, y in ((160, 260), (352, 260)):
        draw.ellipse([at(x - 13, y - 8), at(x + 13, y + 18)], fill=skin)
    for x, y in ((222, 455), (290, 455)):
        draw.ellipse([at(x - 18, y - 6), at(x + 22, y + 12)], fill=(30, 30, 30))
    return torch.from_numpy(np.asarray(image).copy()).float().div(255)[None]


def no_person_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.stack([
        torch.zeros(256, 256, 3),
        torch.ones(256, 256, 3),
        torch.full((256, 256, 3), 0.5),
        torch.rand(256, 256, 3, generator=generator),
    ])
