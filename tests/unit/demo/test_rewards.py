"""The demo world's analytic aspect rewards: each orders constructed good/bad images correctly,
scores one image the same alone or in any batch, and follows the scorer contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from versat2i.demo import rewards, world
from versat2i.demo.world import Scene
from versat2i.rewards import registry
from versat2i.rewards.base import ImageBatchError, score_aspects
from versat2i.rewards.registry import get_scorer

ASPECTS = ("alignment", "geometry", "aesthetics", "lowlevel")


@pytest.fixture(scope="module", autouse=True)
def demo_scorers_registered():
    """The demo world's scorers join the registry only when asked: here for this module's tests, and
    taken out after them (registered when the module was imported, they showed in the scorer lists of
    the ComfyUI tiers' in-process tests, which ComfyUI never does, whenever pytest collected this file)."""
    before = dict(registry.SCORERS)
    rewards.register_scorers()
    try:
        yield
    finally:
        registry.SCORERS.clear()
        registry.SCORERS.update(before)


@pytest.fixture(scope="module")
def scorers():
    return {aspect: get_scorer(f"demo:{aspect}") for aspect in ASPECTS}


@pytest.fixture(scope="module")
def real():
    captions = [scene.caption for scene in world.all_scenes()]
    return world.render_batch(captions, range(len(captions))), captions


def draw(scene: Scene, centre_x=16.0, centre_y=16.0, radius=7.0, angle=0.3) -> torch.Tensor:
    layout = torch.tensor([[centre_x, centre_y, radius, angle]], dtype=torch.float64)
    return world.render_scenes([scene], layout)[0]


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    kernel = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = images.permute(0, 3, 1, 2).reshape(-1, 1, *images.shape[1:3])
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(images.shape[0], 3, *images.shape[1:3]).permute(0, 2, 3, 1)


def test_real_images_score_high_on_the_aspects_they_get_right(scorers, real):
    images, captions = real
    scores = score_aspects(scorers, images, captions)
    assert float(scores["alignment"].min()) > 0.9
    assert float(scores["geometry"].min()) > 0.8
    assert float(scores["lowlevel"].min()) > 0.95 and float(scores["lowlevel"].mean()) > 0.99
    for values in scores.values():
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0


def test_alignment_prefers_the_named_colour(scorers, real):
    images, captions = real
    scenes = [world.parse_caption(c) for c in captions]
    colours = list(world.SHAPE_COLOURS)
    wrong = [Scene(s.shape, colours[(colours.index(s.colour) + 1) % len(colours)], s.background).caption
             for s in scenes]
    right_scores = scorers["alignment"].score(images, captions)
    wrong_scores = scorers["alignment"].score(images, wrong)
    assert bool((right_scores > wrong_scores + 0.3).all())


def test_alignment_prefers_the_named_shape(scorers, real):
    images, captions = real
    scenes = [world.parse_caption(c) for c in captions]
    wrong = [Scene(world.SHAPES[(world.SHAPES.index(s.shape) + 1) % 3], s.colour, s.background).caption
             for s in scenes]
    right_scores = scorers["alignment"].score(images, captions)
    wrong_scores = scorers["alignment"].score(images, wrong)
    assert bool((right_scores > wrong_scores + 0.2).all())


def test_colour_and_shape_evidence_are_separate():
    image = draw(Scene("square", "blue", "white"))[None]
    parts = rewards.components(image, ["a red square on a white background"])
    assert float(parts["colour_match"]) < 0.1 and float(parts["shape_match"]) > 0.8
    parts = rewards.components(image, ["a blue circle on a white background"])
    assert float(parts["colour_match"]) > 0.9 and float(parts["shape_match"]) < 0.2


def test_an_empty_image_shows_nothing(scorers):
    image = torch.full((1, 32, 32, 3), 0.5)
    prompt = ["a red circle on a gray background"]
    assert float(scorers["alignment"].score(image, prompt)) == 0.0
    assert float(scorers["geometry"].score(image, prompt)) == 0.0


def test_geometry_prefers_regular_shapes_to_blobs_and_fragments(scorers):
    scene = Scene("square", "orange", "black")
    regular = draw(scene)
    # A lumpy blob: the square's outline pushed in and out by a smooth random field.
    x, y = world.pixel_grid(32, torch.float64)
    wobble = 2.5 * torch.sin(x / 2.1) * torch.cos(y / 1.7)
    distance = world.signed_distance("square", x, y, 16.0, 16.0, 7.0, 0.3) + wobble
    mask = world.coverage(distance)[..., None].float()
    colour, background = torch.tensor(world.SHAPE_COLOURS["orange"]), torch.tensor(world.BACKGROUNDS["black"])
    lumpy = mask * colour + (1 - mask) * background
    # Two fragments of the same total area.
    fragments = torch.maximum(draw(scene, 9.0, 9.0, 5.0), draw(scene, 23.0, 23.0, 5.0))
    images = torch.stack([regular, lumpy, fragments])
    scores = scorers["geometry"].score(images, [scene.caption] * 3)
    assert float(scores[0]) > float(scores[1]) + 0.1
    assert float(scores[0]) > float(scores[2]) + 0.1


def test_geometry_copes_with_shapes_cut_by_the_border(scorers):
    scene = Scene("circle", "purple", "gray")
    images = torch.stack([draw(scene, 16.0), draw(scene, 3.0)])
    scores = scorers["geometry"].score(images, [scene.caption] * 2)
    assert float(scores[1]) > 0.85


def test_lowlevel_penalises_blotchy_fills(scorers):
    scene = Scene("square", "green", "white")
    clean = draw(scene, radius=9.0)
    x, y = world.pixel_grid(32, torch.float32)
    blotches = 0.08 * torch.sin(x / 2.5)[..., None] * torch.cos(y / 3.0)[..., None]
    inside = (clean - torch.tensor(world.BACKGROUNDS["white"])).norm(dim=-1, keepdim=True) > 0.3
    blotchy = torch.where(inside, (clean + blotches).clamp(0, 1), clean)
    scores = scorers["lowlevel"].score(torch.stack([clean, blotchy]), [scene.caption] * 2)
    assert float(scores[0]) > float(scores[1]) + 0.05


def test_lowlevel_penalises_blur_and_noise(scorers, real):
    images, captions = real
    sharp = scorers["lowlevel"].score(images, captions)
    blurred = scorers["lowlevel"].score(blur(images, 1.0), captions)
    more_blurred = scorers["lowlevel"].score(blur(images, 2.0), captions)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = scorers["lowlevel"].score((images + 0.03 * noise).clamp(0, 1), captions)
    assert bool((blurred < sharp - 0.02).all())
    assert bool((more_blurred < blurred).all())
    assert bool((noisy < sharp - 0.1).all())


def test_aesthetics_prefers_centred_contrasting_compositions(scorers):
    scene = Scene("circle", "yellow", "black")
    centred, corner = draw(scene, 16.0, 16.0), draw(scene, 8.0, 8.0)
    faded = 0.3 * centred + 0.7 * torch.tensor(world.BACKGROUNDS["black"])
    tiny = draw(scene, 16.0, 16.0, 3.0)
    scores = scorers["aesthetics"].score(torch.stack([centred, corner, faded, tiny]), [scene.caption] * 4)
    assert float(scores[0]) > float(scores[1]) + 0.1
    assert float(scores[0]) > float(scores[2]) + 0.1
    assert float(scores[0]) > float(scores[3]) + 0.1


def test_scores_do_not_depend_on_the_batch(scorers, real):
    images, captions = real
    images = images[:12].clone()
    images[::3] = blur(images[::3], 1.5)  # a mixed batch
    together = score_aspects(scorers, images, captions[:12])
    chunked = score_aspects(scorers, images, captions[:12], chunk_size=5)
    for index in (0, 4, 11):
        alone = score_aspects(scorers, images[index:index + 1], captions[index:index + 1])
        for aspect in ASPECTS:
            assert abs(float(alone[aspect][0]) - float(together[aspect][index])) < 1e-5
    for aspect in ASPECTS:
        assert torch.allclose(together[aspect], chunked[aspect], atol=1e-5)


def test_a_prompt_outside_the_grammar_is_a_clear_error(scorers, real):
    images, _ = real
    with pytest.raises(ImageBatchError, match="prompts: .*demo-world caption"):
        scorers["alignment"].score(images[:1], ["a photo of a cat"])


def test_registry_builds_each_aspect_and_rejects_unknown_variants():
    for aspect in ASPECTS:
        scorer = get_scorer(f"demo:{aspect}")
        assert scorer.aspect == aspect and scorer.scorer_id == f"demo:{aspect}"
        assert scorer.describe()["weights_hash"] == "none"
    with pytest.raises(ValueError, match="demo:alignment"):
        get_scorer("demo:beauty")
    with pytest.raises(ValueError, match="needs an aspect"):
        get_scorer("demo")
