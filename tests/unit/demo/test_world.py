"""The demo world's renderer, caption grammar and prompt split (pure torch, no models)."""

from __future__ import annotations

import pytest
import torch

from versat2i.demo import world


def test_render_is_deterministic_and_depends_on_the_seed():
    caption = "a red circle on a white background"
    first, again = world.render(caption, 7), world.render(caption, 7)
    assert torch.equal(first, again)
    assert not torch.equal(first, world.render(caption, 8))
    assert first.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and first.dtype == torch.float32
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_render_draws_the_named_colours():
    image = world.render("a green square on a black background", 3)
    corner = image[0, 0]
    centre_colour = torch.tensor(world.SHAPE_COLOURS["green"])
    assert torch.allclose(corner, torch.tensor(world.BACKGROUNDS["black"]), atol=1e-6)
    # Some pixels are fully covered by the shape: exactly the named colour.
    assert (image - centre_colour).norm(dim=-1).min() < 1e-6


def test_vectorised_renderer_matches_the_reference_renderer():
    scenes = world.all_scenes()[:6]
    layouts = torch.stack([
        torch.tensor([lay.centre_x, lay.centre_y, lay.radius, lay.angle], dtype=torch.float64)
        for lay in (world.random_layout(seed) for seed in range(6))
    ])
    batch = world.render_scenes(scenes, layouts)
    single = torch.stack([world.render(scene, seed) for seed, scene in enumerate(scenes)])
    assert torch.equal(batch, single)
    assert torch.allclose(world.render_scenes(scenes, layouts.float()), single, atol=1e-5)


def test_render_batch_needs_one_seed_per_caption():
    with pytest.raises(ValueError, match="one seed per caption"):
        world.render_batch(["a red circle on a white background"] * 2, [1])


def test_every_caption_parses_back_to_its_scene():
    scenes = world.all_scenes()
    assert len(scenes) == len(world.SHAPES) * len(world.SHAPE_COLOURS) * len(world.BACKGROUNDS)
    for scene in scenes:
        assert world.parse_caption(scene.caption) == scene
    assert world.Scene("triangle", "orange", "gray").caption == "an orange triangle on a gray background"
    assert world.Scene("circle", "red", "gray").caption == "a red circle on a gray background"


@pytest.mark.parametrize("caption", [
    "a red cat on a white background",
    "a pink circle on a white background",
    "a red circle on a green background",
    "a photo of a dog",
    "",
])
def test_captions_outside_the_grammar_are_rejected_with_the_grammar(caption):
    with pytest.raises(ValueError, match="demo-world caption|not in the demo world"):
        world.parse_caption(caption)


def test_prompt_split_is_disjoint_complete_and_covers_every_word():
    loop, held_out = world.prompt_split()
    assert set(loop).isdisjoint(held_out)
    assert sorted(loop + held_out) == sorted(s.caption for s in world.all_scenes())
    assert 0.2 <= len(held_out) / (len(loop) + len(held_out)) <= 0.35
    for half in (loop, held_out):
        scenes = [world.parse_caption(c) for c in half]
        assert {s.shape for s in scenes} == set(world.SHAPES)
        assert {s.colour for s in scenes} == set(world.SHAPE_COLOURS)
        assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert world.prompt_split() == (loop, held_out)


def test_random_layouts_follow_the_layout_ranges():
    layouts = world.random_layouts(500, torch.Generator().manual_seed(0))
    size = world.IMAGE_SIZE
    lo, hi = world.CENTRE_RANGE
    r_lo, r_hi = world.RADIUS_RANGE
    assert layouts[:, :2].min() >= lo * size and layouts[:, :2].max() <= hi * size
    assert layouts[:, 2].min() >= r_lo * size and layouts[:, 2].max() <= r_hi * size


@pytest.mark.parametrize("shape", world.SHAPES)
def test_shapes_have_the_area_of_their_equal_area_circle(shape):
    # Anti-aliased coverage integrates to the shape's area: pi * r^2 for every shape.
    size, radius = 64, 12.0
    x, y = world.pixel_grid(size, torch.float64)
    area = world.coverage(world.signed_distance(shape, x, y, 32.0, 32.0, radius, 0.4)).sum()
    assert abs(float(area) / (torch.pi * radius ** 2) - 1) < 0.02


def test_replay_images_cycle_through_the_captions_deterministically():
    loop, _ = world.prompt_split()
    images, captions = world.replay_images(loop[:3], 7)
    assert images.shape == (7, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert captions == [loop[i % 3] for i in range(7)]
    again, _ = world.replay_images(loop[:3], 7)
    assert torch.equal(images, again)
    assert torch.equal(images[0], world.render(loop[0], 10_000_000))
    empty, none = world.replay_images(loop, 0)
    assert empty.shape[0] == 0 and none == []
    with pytest.raises(ValueError, match="captions"):
        world.replay_images([], 3)
