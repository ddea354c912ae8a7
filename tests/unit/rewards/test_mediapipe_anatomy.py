"""rewards/mediapipe_anatomy.py: landmark plausibility maths on synthetic skeletons, and the real
MediaPipe scorer on blank, noise and drawn-figure images (offline: mediapipe 0.10.14 bundles its
models)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models.figures import draw_figure, no_person_images

from versat2i.rewards import mediapipe_anatomy as anatomy
from versat2i.rewards.mediapipe_anatomy import (
    BODY_CHECKS,
    HAND_CHECKS,
    MIN_BODY_CHECKS,
    Band,
    anatomy_report,
    body_check_values,
    combine,
    hand_check_values,
)
from versat2i.rewards.registry import get_scorer
from versat2i.rewards.weights import combine_hashes
from versat2i.safe_io import sha256_file

# -- synthetic skeletons (metres, MediaPipe world-landmark indices) ------------------------------

BODY_JOINTS = {  # a standing adult, arms slightly out: human proportions
    11: (0.17, -0.50, 0.0), 12: (-0.17, -0.50, 0.0),  # shoulders (34 cm apart)
    13: (0.22, -0.22, 0.02), 14: (-0.22, -0.22, 0.02),  # elbows (upper arm ~28 cm)
    15: (0.25, 0.02, 0.0), 16: (-0.25, 0.02, 0.0),  # wrists (forearm ~24 cm)
    23: (0.10, 0.0, 0.0), 24: (-0.10, 0.0, 0.0),  # hips (20 cm apart, torso 50 cm)
    25: (0.11, 0.42, 0.0), 26: (-0.11, 0.42, 0.0),  # knees (thigh 42 cm)
    27: (0.11, 0.82, -0.02), 28: (-0.11, 0.82, -0.02),  # ankles (shin 40 cm)
}


def body(**moves) -> np.ndarray:
    """[33, 3] world landmarks; ``moves`` maps a landmark index (as ``j<index>``) to a new position."""
    world = np.zeros((33, 3))
    world[0] = (0.0, -0.7, 0.0)
    for index, position in BODY_JOINTS.items():
        world[index] = position
    for name, position in moves.items():
        world[int(name[1:])] = position
    return world


def stretch(world: np.ndarray, start: int, end: int, factor: float) -> np.ndarray:
    """Move ``end`` so the segment start->end is ``factor`` times as long."""
    world = world.copy()
    world[end] = world[start] + factor * (world[end] - world[start])
    return world


ALL_USABLE_BODY = np.ones(33, dtype=bool)

# An open right hand, palm towards the camera: wrist, then (MCP, PIP, DIP, tip) per finger.
HAND_POINTS = [
    (0.0, 0.0, 0.0),
    (-0.025, -0.025, 0.0), (-0.05, -0.045, 0.0), (-0.065, -0.07, 0.0), (-0.075, -0.09, 0.0),  # thumb
    (-0.025, -0.085, 0.0), (-0.027, -0.125, 0.0), (-0.028, -0.150, 0.0), (-0.029, -0.172, 0.0),  # index
    (0.0, -0.090, 0.0), (0.0, -0.135, 0.0), (0.0, -0.163, 0.0), (0.0, -0.187, 0.0),  # middle
    (0.020, -0.085, 0.0), (0.022, -0.127, 0.0), (0.023, -0.153, 0.0), (0.024, -0.176, 0.0),  # ring
    (0.038, -0.075, 0.0), (0.042, -0.107, 0.0), (0.044, -0.127, 0.0), (0.046, -0.147, 0.0),  # pinky
]
ALL_USABLE_HAND = np.ones(21, dtype=bool)


def hand() -> np.ndarray:
    return np.array(HAND_POINTS, dtype=np.float64)


def body_score(world, usable=ALL_USABLE_BODY) -> float:
    return anatomy_report(body_check_values(world, usable), [], no_person_score=0.0).score


def hand_score(world, usable=ALL_USABLE_HAND, confidence=0.97) -> float:
    return anatomy_report(None, [hand_check_values(world, usable, confidence)], no_person_score=0.0).score


# -- the maths -----------------------------------------------------------------------------------

def test_band_is_one_inside_and_falls_off_outside():
    band = Band(1.0, 2.0, 0.5)
    assert band(1.0) == band(1.5) == band(2.0) == 1.0
    assert band(2.5) == pytest.approx(np.exp(-1.0))
    assert band(0.5) == pytest.approx(np.exp(-1.0))
    assert 1.0 > band(2.2) > band(2.6) > band(3.5) > 0.0
    assert band(float("nan")) == 0.0


def test_combine_is_half_mean_half_worst():
    assert combine([1.0, 1.0, 0.0]) == pytest.approx(0.5 * (2 / 3) + 0.0)
    assert combine([0.8]) == pytest.approx(0.8)
    assert combine([]) is None


def test_plausible_body_scores_one_on_every_check():
    values = body_check_values(body(), ALL_USABLE_BODY)
    assert set(values) == {check.name for check in BODY_CHECKS}
    assert all(value == pytest.approx(1.0) for value in values.values()), values
    assert body_score(body()) == pytest.approx(1.0)


def test_broken_limbs_order_below_plausible_ones():
    plausible = body_score(body())
    mildly_long_forearm = body_score(stretch(body(), 13, 15, 1.5))
    very_long_forearm = body_score(stretch(body(), 13, 15, 2.5))
    assert plausible > mildly_long_forearm > very_long_forearm
    assert very_long_forearm < 0.6  # one broken limb costs at least half the body's score

    short_shin = body_score(stretch(body(), 25, 27, 0.4))
    long_thigh = body_score(stretch(body(), 23, 25, 1.8))
    assert short_shin < plausible and long_thigh < plausible


def test_broken_limb_is_named_by_its_checks():
    values = body_check_values(stretch(body(), 13, 15, 2.5), ALL_USABLE_BODY)
    worst = sorted(values, key=values.get)[:2]
    assert set(worst) == {"left.forearm_to_upper_arm", "symmetry.forearm"}


def test_joint_folded_past_its_limit_is_implausible():
    # Left wrist folded back onto the shoulder: an elbow angle of ~10 degrees.
    folded = body(j15=(0.17 + 0.01, -0.47, 0.01))
    values = body_check_values(folded, ALL_USABLE_BODY)
    assert values["left.elbow_angle"] < 0.2
    assert body_score(folded) < body_score(body())
    # A strongly (but humanly) bent elbow at ~60 degrees is fine.
    bent = body(j15=(0.05, -0.30, 0.08))
    assert body_check_values(bent, ALL_USABLE_BODY)["left.elbow_angle"] == pytest.approx(1.0)


def test_only_checks_with_usable_landmarks_run():
    usable = ALL_USABLE_BODY.copy()
    usable[[27, 28]] = False  # ankles out of frame: no shin checks, no knee angles
    values = body_check_values(stretch(body(), 25, 27, 3.0), usable)
    assert not any("shin" in name or "knee" in name for name in values)
    assert body_score(stretch(body(), 25, 27, 3.0), usable) == pytest.approx(1.0)


def test_too_little_evidence_is_no_person():
    usable = np.zeros(33, dtype=bool)
    usable[[11, 12, 13]] = True  # a shoulder line and one elbow: one check
    values = body_check_values(body(), usable)
    assert 0 < len(values) < MIN_BODY_CHECKS
    report = anatomy_report(values, [], no_person_score=0.25)
    assert not report.person_found and report.score == 0.25


def test_plausible_hand_scores_one_on_every_check():
    values = hand_check_values(hand(), ALL_USABLE_HAND, 0.97)
    assert set(values) == {check.name for check in HAND_CHECKS} | {"handedness_confidence"}
    assert all(value == pytest.approx(1.0) for value in values.values()), values


def test_broken_fingers_order_below_plausible_ones():
    plausible = hand_score(hand())
    long_tip = hand_score(stretch(hand(), 7, 8, 2.0))
    very_long_tip = hand_score(stretch(hand(), 7, 8, 3.5))
    assert plausible > long_tip > very_long_tip
    assert very_long_tip < 0.6

    folded = hand()
    folded[8] = folded[7] + 0.9 * (folded[6] - folded[7]) + np.array([0.004, 0.0, 0.0])  # tip folded back
    values = hand_check_values(folded, ALL_USABLE_HAND, 0.97)
    assert values["index.dip_angle"] < 0.1
    assert hand_score(folded) < plausible

    squeezed = hand()
    squeezed[13] = squeezed[9] + np.array([0.002, 0.0, 0.0])  # ring knuckle on top of the middle one
    assert hand_check_values(squeezed, ALL_USABLE_HAND, 0.97)["knuckle_spacing"] < 0.1


def test_unsure_hand_scores_lower():
    assert hand_score(hand(), confidence=0.5) < hand_score(hand(), confidence=0.97)


def test_image_score_combines_parts():
    good_body = body_check_values(body(), ALL_USABLE_BODY)
    bad_hand = hand_check_values(stretch(hand(), 7, 8, 3.5), ALL_USABLE_HAND, 0.97)
    good_hand = hand_check_values(hand(), ALL_USABLE_HAND, 0.97)
    with_bad_hand = anatomy_report(good_body, [good_hand, bad_hand], no_person_score=0.0)
    with_good_hands = anatomy_report(good_body, [good_hand, good_hand], no_person_score=0.0)
    assert with_bad_hand.person_found and len(with_bad_hand.part_scores) == 3
    assert with_good_hands.score == pytest.approx(1.0)
    bad = with_bad_hand.part_scores[2]
    assert bad < 0.6
    assert with_bad_hand.score == pytest.approx(0.5 * (2 + bad) / 3 + 0.5 * bad)


def test_degenerate_landmarks_give_zero_not_nan():
    world = body()
    world[13] = world[11]  # zero-length upper arm
    values = body_check_values(world, ALL_USABLE_BODY)
    assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in values.values())
    assert values["left.elbow_angle"] == 0.0


# -- the real scorer -------------------------------------------------------------------------------

needs_mediapipe = pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None,
                                     reason="mediapipe (extra [geometry]) is not installed")


@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("mediapipe", reason="mediapipe (extra [geometry]) is not installed")
    return get_scorer("mediapipe-anatomy", cache=False)


@needs_mediapipe
def test_images_without_people_score_no_person_score(scorer):
    images = no_person_images()
    assert scorer.score(images, [""] * 4).tolist() == [0.0] * 4
    lenient = get_scorer("mediapipe-anatomy", no_person_score=0.5, cache=False)
    assert lenient.score(images, [""] * 4).tolist() == [0.5] * 4


@needs_mediapipe
def test_drawn_figure_is_found_and_scored(scorer):
    figure = draw_figure()
    pixels = (figure[0] * 255).round().to(torch.uint8).numpy()
    report = scorer.report(pixels)
    assert report.person_found and len(report.body) >= MIN_BODY_CHECKS
    score = float(scorer.score(figure, [""])[0])
    assert 0.0 < score <= 1.0
    assert score == pytest.approx(report.score)


@needs_mediapipe
def test_batch_independence_and_determinism(scorer):
    images = torch.cat([draw_figure(), no_person_images()[[0, 3]], draw_figure(320)[:, 32:288, 32:288]])
    prompts = [""] * len(images)
    together = scorer.score(images, prompts)
    alone = torch.cat([scorer.score(images[i:i + 1], [""]) for i in range(len(images))])
    reversed_order = scorer.score(images.flip(0), prompts).flip(0)
    chunked = scorer.score(images, prompts, chunk_size=3)
    for other in (alone, reversed_order, chunked):
        torch.testing.assert_close(together, other, rtol=0, atol=1e-6)
    assert together[0] > 0 and together[1] == together[2] == 0.0


@needs_mediapipe
def test_weights_hash_covers_the_bundled_models(scorer):
    import mediapipe

    root = Path(mediapipe.__file__).parent
    paths = scorer.weight_files()
    assert list(paths) == [root / rel for rel in anatomy.MODEL_FILES]
    assert all(p.is_file() for p in paths) and mediapipe.__version__ == "0.10.14"
    assert scorer.weights_hash == combine_hashes({p.name: sha256_file(p) for p in paths})
    assert scorer.describe() == {"id": "mediapipe-anatomy", "aspect": "geometry", "weights_hash": scorer.weights_hash,
                                 "no_person_score": 0.0, "min_visibility": 0.5, "min_detection_confidence": 0.5,
                                 "max_num_hands": 4}


@pytest.mark.parametrize("options, fragment", [
    ({"no_person_score": 1.5}, "no_person_score"),
    ({"no_person_score": "high"}, "no_person_score"),
    ({"min_visibility": -0.1}, "min_visibility"),
    ({"max_num_hands": 0}, "max_num_hands"),
    ({"max_num_hands": 2.5}, "max_num_hands"),
    ({"no_person_scor": 0.5}, "unknown option"),
])
@needs_mediapipe
def test_bad_options_are_refused(options, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_scorer("mediapipe-anatomy", cache=False, **options)


@needs_mediapipe
def test_variants_are_refused():
    with pytest.raises(ValueError, match="no variants"):
        get_scorer("mediapipe-anatomy:hands", cache=False)


def test_missing_mediapipe_raises_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # what `import mediapipe` sees when absent
    with pytest.raises(ImportError, match=r"pip install 'comfyui-versat2i\[geometry\]'"):
        get_scorer("mediapipe-anatomy", cache=False)


@needs_mediapipe
def test_default_selection_never_keeps_an_image_without_a_person(scorer):
    # Prompt 0: a drawn person and a blank image; prompt 1: nobody in either image. Scores go
    # through the scorer record (as Score Images / `versat2i score` store them) to the filter.
    from versat2i.rewards.base import score_aspects
    from versat2i.rewards.score_table import ScoreTable
    from versat2i.rewards.selection import select_best_per_prompt

    nobody = no_person_images()
    images = torch.cat([draw_figure(), nobody[[0, 1, 3]]])
    prompts = ["a person", "a person", "a landscape", "a landscape"]
    scores = score_aspects({"geometry": scorer}, images, prompts)
    assert scores["geometry"][0] > 0 and scores["geometry"][1:].tolist() == [scorer.no_person_score] * 3
    assert scores.judged["geometry"].tolist() == [True, False, False, False]
    table = ScoreTable.from_scores(scores, {"geometry": scorer}, prompts)
    assert table.judged["geometry"] == [True, False, False, False]
    for threshold in ("none", "p0", "p50", 0.0):  # the Filter default is "none"; >= is inclusive
        chosen = select_best_per_prompt(table, threshold).aspects["geometry"]
        assert chosen.kept == (0,), threshold
    lenient = get_scorer("mediapipe-anatomy", no_person_score=0.5, cache=False)
    lenient_scores = score_aspects({"geometry": lenient}, images, prompts)
    table = ScoreTable.from_scores(lenient_scores, {"geometry": lenient}, prompts)
    assert select_best_per_prompt(table).aspects["geometry"].kept == (0,)


@needs_mediapipe
def test_a_person_scoring_exactly_the_no_person_score_is_still_judged(scorer):
    # Set the placeholder to the drawn person's own score: person and empty images then score the
    # same, and only the judged flag tells them apart. The person is kept, the empty ones never.
    from versat2i.rewards.base import score_aspects
    from versat2i.rewards.score_table import ScoreTable
    from versat2i.rewards.selection import select_best_per_prompt

    images = torch.cat([draw_figure(), no_person_images()[[0, 1]]])
    person_score = float(scorer.score(images[:1], [""])[0])
    assert 0.0 < person_score <= 1.0
    same = get_scorer("mediapipe-anatomy", no_person_score=person_score, cache=False)
    prompts = ["a person", "a person", "a room"]
    scores = score_aspects({"geometry": same}, images, prompts)
    assert len(set(scores["geometry"].tolist())) == 1  # every image scores the same number
    assert scores.judged["geometry"].tolist() == [True, False, False]
    table = ScoreTable.from_scores(scores, {"geometry": same}, prompts)
    for threshold in ("none", "p0", "p100", person_score):
        chosen = select_best_per_prompt(table, threshold).aspects["geometry"]
        assert chosen.kept == (0,) and chosen.unjudged == (1, 2), threshold
