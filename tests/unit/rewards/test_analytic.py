"""Weight-free analytic scorers: correct statistics on constructed images, batch independence,
registry wiring. Offline, no weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from versat2i.rewards import analytic
from versat2i.rewards.base import ImageBatchError, score_aspects
from versat2i.rewards.registry import get_scorer

STATS = ("sharpness", "contrast", "colourfulness", "brightness", "exposure", "noise")


def score(stat: str, images: torch.Tensor) -> torch.Tensor:
    scorer = get_scorer(f"analytic:{stat}")
    return scorer.score(images, ["p"] * images.shape[0])


def box_blur(images: torch.Tensor, size: int = 5) -> torch.Tensor:
    chw = images.permute(0, 3, 1, 2)
    blurred = F.avg_pool2d(F.pad(chw, [size // 2] * 4, mode="replicate"), size, stride=1)
    return blurred.permute(0, 2, 3, 1).contiguous()


def textured(seed: int = 0, size: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, 3, generator=generator)


def gradient(size: int = 64) -> torch.Tensor:
    ramp = torch.linspace(0.2, 0.8, size)
    return (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5).expand(size, size, 3)[None].contiguous()


def test_blurred_image_is_less_sharp():
    sharp = textured()
    values = score("sharpness", torch.cat([sharp, box_blur(sharp, 3), box_blur(sharp, 7)]))
    assert values[0] > values[1] > values[2] > 0


def test_flat_image_has_zero_sharpness_contrast_and_noise():
    flat = torch.full((1, 16, 16, 3), 0.4)
    assert score("sharpness", flat).item() == pytest.approx(0.0, abs=1e-6)
    assert score("contrast", flat).item() == pytest.approx(0.0, abs=1e-6)
    assert score("noise", flat).item() == pytest.approx(0.0, abs=1e-6)


def test_sharpness_matches_opencv_variance_of_laplacian():
    cv2 = pytest.importorskip("cv2")
    image = textured(3, 40)
    gray = image[0].double().numpy() @ np.array(analytic.LUMA_WEIGHTS) * 255.0
    expected = cv2.Laplacian(gray, cv2.CV_64F).var()
    assert score("sharpness", image).item() == pytest.approx(expected, rel=1e-5)


def test_contrast_is_rms_contrast():
    half = torch.zeros(1, 16, 16, 3)
    half[:, :, 8:] = 1.0
    low = half * 0.5 + 0.25  # 0.25 / 0.75 halves
    values = score("contrast", torch.cat([half, low]))
    assert values.tolist() == pytest.approx([0.5, 0.25], abs=1e-6)


def test_colourfulness_follows_hasler_suesstrunk():
    grey = torch.full((1, 16, 16, 3), 0.5)
    red = torch.zeros(1, 16, 16, 3)
    red[..., 0] = 1.0
    colourful = textured(1, 16)
    desaturated = colourful.mean(dim=-1, keepdim=True).expand_as(colourful).contiguous()
    values = score("colourfulness", torch.cat([grey, red, colourful, desaturated]))
    # Pure red: rg = 255, yb = 127.5, no spread -> M = 0.3 * sqrt(255^2 + 127.5^2).
    assert values[0].item() == pytest.approx(0.0, abs=1e-4)
    assert values[1].item() == pytest.approx(0.3 * math.hypot(255.0, 127.5), rel=1e-5)
    assert values[2] > 50 and values[3].item() == pytest.approx(0.0, abs=1e-3)


def test_colourfulness_against_numpy_reference():
    image = textured(5, 24)
    rgb = image[0].double().numpy() * 255
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    expected = math.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    assert score("colourfulness", image).item() == pytest.approx(expected, rel=1e-5)


def test_brightness_and_exposure():
    images = torch.stack([torch.full((16, 16, 3), v) for v in (0.0, 0.3, 0.5, 1.0)])
    assert score("brightness", images).tolist() == pytest.approx([0.0, 0.3, 0.5, 1.0], abs=1e-6)
    assert score("exposure", images).tolist() == pytest.approx([0.0, 0.6, 1.0, 0.0], abs=1e-6)
    # Luma weights: pure green is brighter than pure blue.
    green, blue = torch.zeros(1, 16, 16, 3), torch.zeros(1, 16, 16, 3)
    green[..., 1], blue[..., 2] = 1.0, 1.0
    assert score("brightness", torch.cat([green, blue])).tolist() == pytest.approx([0.587, 0.114], abs=1e-6)


@pytest.mark.parametrize("sigma", [2.0, 5.0, 10.0])
def test_noise_estimates_added_gaussian_noise(sigma):
    generator = torch.Generator().manual_seed(int(sigma))
    base = gradient(128)
    noisy = (base + torch.randn(base.shape[:3], generator=generator)[..., None] * sigma / 255.0).clamp(0, 1)
    estimate = -score("noise", noisy).item()
    assert estimate == pytest.approx(sigma, rel=0.1)


def test_noisier_image_scores_lower():
    generator = torch.Generator().manual_seed(0)
    base = gradient(64)
    grain = torch.randn(base.shape, generator=generator)
    images = torch.cat([base, (base + grain * 0.01).clamp(0, 1), (base + grain * 0.05).clamp(0, 1)])
    values = score("noise", images)
    assert values[0] > values[1] > values[2]
    assert (values <= 0).all()


@pytest.mark.parametrize("stat", STATS)
def test_batch_independence(stat):
    generator = torch.Generator().manual_seed(7)
    batch = torch.cat([
        torch.rand(3, 32, 40, 3, generator=generator),
        box_blur(torch.rand(2, 32, 40, 3, generator=generator)),
        torch.full((1, 32, 40, 3), 0.9),
    ])
    scorer = get_scorer(f"analytic:{stat}")
    together = scorer.score(batch, ["p"] * len(batch))
    alone = torch.cat([scorer.score(batch[i:i + 1], ["p"]) for i in range(len(batch))])
    reversed_order = scorer.score(batch.flip(0), ["p"] * len(batch)).flip(0)
    chunked = scorer.score(batch, ["p"] * len(batch), chunk_size=4)
    for other in (alone, reversed_order, chunked):
        torch.testing.assert_close(together, other, rtol=1e-5, atol=1e-5)
    assert together.dtype == torch.float32 and together.shape == (len(batch),)


def test_scorers_share_one_luma_per_chunk(monkeypatch):
    calls = []
    real_luma = analytic.luma
    monkeypatch.setattr(analytic, "luma", lambda images: calls.append(1) or real_luma(images))
    scorers = {stat: get_scorer(f"analytic:{stat}") for stat in ("sharpness", "contrast", "noise")}
    score_aspects(scorers, torch.rand(4, 16, 16, 3), ["p"] * 4, chunk_size=2)
    assert len(calls) == 2  # once per chunk, not once per scorer


def test_registry_ids_and_errors():
    scorer = get_scorer("analytic:colorfulness")
    assert scorer.scorer_id == "analytic:colourfulness"
    assert scorer.describe() == {"id": "analytic:colourfulness", "aspect": "lowlevel", "weights_hash": "none"}
    with pytest.raises(ValueError, match="analytic:sharpness"):
        get_scorer("analytic")
    assert get_scorer("analytic:noise", aspect="geometry").aspect == "geometry"
    with pytest.raises(ValueError, match="unknown option"):
        get_scorer("analytic:noise", weights="x.pth")
    with pytest.raises(ValueError, match="unknown scorer 'analytic:blurriness'.*analytic:noise"):
        get_scorer("analytic:blurriness")


@pytest.mark.parametrize("images, fragment", [
    (torch.rand(2, 16, 16, 4), "RGBA"),
    (torch.rand(2, 16, 16, 1), "grayscale"),
    (torch.full((1, 16, 16, 3), float("nan")), "NaN"),
    (torch.rand(0, 16, 16, 3), "empty"),
])
def test_bad_images_are_refused(images, fragment):
    with pytest.raises(ImageBatchError, match=fragment):
        get_scorer("analytic:contrast").score(images, ["p"] * images.shape[0])
