"""Evaluation statistics (loop/evaluate.py) against hand-computed values and simulated truth.

Pure numpy, no models. Where a statistic has a known answer it is computed by hand; where it is a
claim about repeated experiments (a 95 % CI covers the truth ~95 % of the time; the seed spread
threshold is exceeded by ~5 % of fresh-seed reruns) the experiments are simulated.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from versat2i.loop.evaluate import (
    Evaluation,
    ScoreGrid,
    diversity,
    evaluate,
    grid_from_tables,
    mean_pairwise_cosine_distance,
    mean_pairwise_rms,
    percentile_interval,
    resample_indices,
    seed_spread,
    win_rate,
)
from versat2i.rewards.score_table import ScoreTable

SCORER = {"id": "analytic:sharpness", "weights_hash": "none"}


def grid(scores: dict[str, np.ndarray], aspect: str = "quality") -> ScoreGrid:
    prompts, seeds = next(iter(scores.values())).shape
    return ScoreGrid(prompts=[f"prompt {p}" for p in range(prompts)], seeds=[list(range(seeds))] * prompts,
                     scores={v: {aspect: np.asarray(s, dtype=float)} for v, s in scores.items()})


def simulated_world(rng, prompts=24, seeds=8, sd=0.3):
    """Per-prompt effects plus per-(prompt, seed) noise, like a reward on generated images."""
    return rng.normal(0.5, 0.2, (prompts, 1)) + rng.normal(0.0, sd, (prompts, seeds))


# -- win rate ---------------------------------------------------------------------------------------

def test_win_rate_counts_ties_as_half():
    assert win_rate(np.array([2.0, 2, 2, 2]), np.array([1.0, 2, 3, 1])) == 0.625  # win, tie, loss, win
    assert win_rate(np.array([1.0, 2.0]), np.array([1.05, 1.0]), tie_tolerance=0.1) == 0.75  # tie, win
    assert win_rate(np.zeros(5), np.zeros(5)) == 0.5


# -- bootstrap ----------------------------------------------------------------------------------------

def test_percentile_interval_of_known_samples():
    assert percentile_interval(np.arange(101) / 100, 0.9) == pytest.approx((0.05, 0.95))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.arange(5), 1.5)


def test_constant_difference_has_a_zero_width_interval():
    base = np.arange(12.0).reshape(3, 4)
    result = evaluate(grid({"base": base, "v": base + 0.2}), resamples=200).results["v"]["quality"]
    assert result["diff"] == pytest.approx(0.2)
    assert result["diff_ci"] == pytest.approx([0.2, 0.2])
    assert result["win_rate"] == 1.0 and result["significant"]


def test_prompt_resampling_draws_whole_prompts():
    indices = resample_indices((5, 3), resamples=50, seed=1, unit="prompts")
    blocks = indices.reshape(50, 5, 3)
    assert np.all(blocks % 3 == np.arange(3))  # each block is one prompt's 3 seeds in order
    assert np.all(blocks // 3 == blocks[:, :, :1] // 3)
    pairs = resample_indices((5, 3), resamples=50, seed=1, unit="pairs")
    assert pairs.shape == (50, 15) and pairs.min() >= 0 and pairs.max() <= 14
    with pytest.raises(ValueError, match="unit"):
        resample_indices((5, 3), resamples=5, seed=1, unit="images")


@pytest.mark.parametrize(("unit", "per_prompt_gain_sd"), [("pairs", 0.0), ("prompts", 0.05)])
def test_bootstrap_ci_covers_the_true_difference_about_95_percent_of_the_time(unit, per_prompt_gain_sd):
    """Pairs: valid when the gain varies only from image to image. Prompts (cluster bootstrap): also
    when the gain differs from prompt to prompt."""
    rng = np.random.default_rng(123)
    true_difference = 0.05
    covered = 0
    experiments = 80
    for experiment in range(experiments):
        base = simulated_world(rng)
        gain = true_difference + rng.normal(0, per_prompt_gain_sd, (24, 1)) + rng.normal(0, 0.1, base.shape)
        result = evaluate(grid({"base": base, "v": base + gain}), resamples=500, seed=experiment,
                          unit=unit).results["v"]["quality"]
        low, high = result["diff_ci"]
        covered += low <= true_difference <= high
    assert 0.87 <= covered / experiments <= 1.0, covered


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    base = simulated_world(rng)
    scores = {"base": base, "v": base + rng.normal(0.02, 0.1, base.shape)}
    first = evaluate(grid(scores), seed=5).to_dict()
    assert evaluate(grid(scores), seed=5).to_dict() == first
    reseeded = evaluate(grid(scores), seed=6).results["v"]["quality"]["diff_ci"]
    assert reseeded != first["results"]["v"]["quality"]["diff_ci"]


# -- seed-to-seed spread ------------------------------------------------------------------------------

def test_seed_spread_by_hand_on_a_two_by_two_grid():
    # Prompt rows [1, 3] and [2, 6]: within-prompt deviations -1, 1, -2, 2 -> pooled variance 10 / 2.
    spread = seed_spread(np.array([[1.0, 3.0], [2.0, 6.0]]), splits=4000, seed=0)
    assert spread.per_image_sd == pytest.approx(math.sqrt(5))
    # Each split: half-difference +-2 and +-4, averaged over prompts -> {+-3, +-1}, times sqrt(1/2).
    assert spread.threshold == pytest.approx(3 * math.sqrt(0.5))
    assert spread.mean_sd == pytest.approx(math.sqrt(2.5), rel=0.05)  # = sqrt(2 * 5 / (2 * 2))


def test_seed_spread_matches_its_formula_and_fresh_seed_reruns():
    rng = np.random.default_rng(7)
    prompts, seeds, sd = 24, 8, 0.3
    prompt_effect = rng.normal(0.5, 0.2, (prompts, 1))
    run = prompt_effect + rng.normal(0, sd, (prompts, seeds))
    spread = seed_spread(run, seed=1)
    assert spread.mean_sd == pytest.approx(spread.per_image_sd * math.sqrt(2 / (prompts * seeds)), rel=0.1)
    # What the threshold claims: re-running the whole evaluation with fresh seeds moves the mean by
    # more than it only ~5 % of the time.
    changes = [abs((prompt_effect + rng.normal(0, sd, (prompts, seeds))).mean()
                   - (prompt_effect + rng.normal(0, sd, (prompts, seeds))).mean()) for _ in range(400)]
    share = np.mean(np.array(changes) > spread.threshold)
    assert 0.01 <= share <= 0.12, share


def test_seed_spread_with_an_odd_number_of_seeds_is_still_calibrated():
    rng = np.random.default_rng(3)
    run = simulated_world(rng, seeds=5, sd=1.0)
    spread = seed_spread(run, seed=2)
    assert spread.mean_sd == pytest.approx(spread.per_image_sd * math.sqrt(2 / run.size), rel=0.12)


def test_effect_beyond_the_seed_spread_and_one_within_it():
    rng = np.random.default_rng(11)
    base = simulated_world(rng)
    scores = {"base": base, "big": base + 0.2 + rng.normal(0, 0.05, base.shape), "tiny": base + 0.01}
    evaluation = evaluate(grid(scores))
    threshold = evaluation.seed_spread["quality"].threshold
    assert 0.01 < threshold < 0.2
    assert evaluation.beyond_seed_spread("big", "quality")
    # A constant +0.01 is "significant" for the paired CI yet smaller than re-rolling seeds moves the mean.
    tiny = evaluation.result("tiny", "quality")
    assert tiny["significant"] and not tiny["beyond_seed_spread"]


def test_seed_spread_needs_two_seeds():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_spread(np.ones((3, 1)))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        evaluate(grid({"base": np.ones((3, 1))}))


# -- diversity ----------------------------------------------------------------------------------------

def test_pixel_diversity_by_hand():
    shades = np.stack([np.full((2, 2, 3), value) for value in (0.0, 0.5, 1.0)])
    assert mean_pairwise_rms(shades) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    checker = np.zeros((2, 4, 4, 3))
    checker[1, ::2] = 1.0  # half the pixels differ by 1 -> RMS sqrt(1/2)
    assert mean_pairwise_rms(checker) == pytest.approx(math.sqrt(0.5))


def test_embedding_diversity_by_hand():
    features = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    expected = (1.0 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert mean_pairwise_cosine_distance(features) == pytest.approx(expected)


def test_diversity_averages_prompts_and_collapse_lowers_it():
    rng = np.random.default_rng(0)
    varied = [rng.random((4, 8, 8, 3)) for _ in range(3)]
    collapsed = [np.repeat(group[:1], 4, axis=0) + rng.normal(0, 0.01, group.shape) for group in varied]
    figure = diversity(varied, embed=lambda images: np.asarray(images).reshape(len(images), -1))
    assert figure["pixel"] == pytest.approx(np.mean([mean_pairwise_rms(g) for g in varied]))
    assert figure["embedding"] is not None
    assert diversity(collapsed)["pixel"] < 0.1 * figure["pixel"] and diversity(collapsed)["embedding"] is None


# -- grids from score tables, the whole evaluation --------------------------------------------------

def table(prompts, seeds, values, scorer=SCORER):
    return ScoreTable.from_scores({"quality": values}, {"quality": scorer}, prompts, seeds=seeds)


def test_grid_pairs_images_by_prompt_and_seed_in_any_row_order():
    base = table(["a", "a", "b", "b"], [1, 2, 1, 2], [1.0, 2.0, 3.0, 4.0])
    shuffled = table(["b", "a", "b", "a"], [2, 2, 1, 1], [40.0, 20.0, 30.0, 10.0])
    paired = grid_from_tables({"base": base, "v": shuffled})
    assert paired.prompts == ["a", "b"] and paired.seeds == [[1, 2], [1, 2]]
    assert paired.scores["v"]["quality"].tolist() == [[10.0, 20.0], [30.0, 40.0]]
    assert paired.scorers == {"quality": SCORER}


@pytest.mark.parametrize(("other", "message"), [
    (table(["a", "a", "b", "b"], [1, 3, 1, 2], [0.0] * 4), "same \\(prompt, seed\\) pairs"),
    (table(["a", "a", "b", "b"], [1, 2, 1, 2], [0.0] * 4, {"id": "other", "weights_hash": "x"}), "different scorers"),
    (table(["a", "a", "b", "b"], [1, 2, None, 2], [0.0] * 4), "has no seed"),
])
def test_grid_refuses_tables_that_do_not_pair(other, message):
    base = table(["a", "a", "b", "b"], [1, 2, 1, 2], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=message):
        grid_from_tables({"base": base, "v": other})


def test_grid_needs_the_same_number_of_seeds_per_prompt():
    with pytest.raises(ValueError, match="same number of seeds"):
        grid_from_tables({"base": table(["a", "a", "b"], [1, 2, 1], [1.0, 2.0, 3.0])})


def test_evaluation_numbers_and_json_round_trip():
    base = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 4.0]])
    variant = np.array([[1.0, 1.0, 1.0], [2.0, 3.0, 4.0]])  # diffs 1, 0, -1, 1, 2, 0
    images = {"base": [np.zeros((3, 2, 2, 3)), np.ones((3, 2, 2, 3))]}
    evaluation = evaluate(grid({"base": base, "v": variant}), images=images, resamples=300)
    v, b = evaluation.result("v", "quality"), evaluation.result("base", "quality")
    assert v["mean"] == pytest.approx(2.0) and b["mean"] == pytest.approx(1.5)
    assert v["sd"] == pytest.approx(np.std(variant, ddof=1))
    assert v["diff"] == pytest.approx(0.5)
    assert v["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 1 + 0.5) / 6)
    assert v["diff_ci"][0] <= 0.5 <= v["diff_ci"][1] and v["mean_ci"][0] <= 2.0 <= v["mean_ci"][1]
    assert b["diff"] is None and b["win_rate"] is None and b["beyond_seed_spread"] is None
    assert evaluation.diversity == {"base": {"pixel": 0.0, "embedding": None}}
    data = json.loads(json.dumps(evaluation.to_dict(), allow_nan=False))
    assert Evaluation.from_dict(data).to_dict() == data
    assert data["pairs"] == 6 and data["settings"]["resamples"] == 300


def test_evaluate_rejects_an_unknown_base():
    with pytest.raises(ValueError, match="base='nope'"):
        evaluate(grid({"base": np.ones((2, 2))}), base="nope")


def test_head_to_head_equals_evaluating_against_that_reference():
    """'gated vs merge' is the same paired statistic as the gated variant against a base of merge."""
    rng = np.random.default_rng(3)
    base, merge = simulated_world(rng), simulated_world(rng)
    gated = merge + 0.05 + rng.normal(0, 0.01, merge.shape)
    scores = {"base": base, "merge": merge, "gated": gated}
    evaluation = evaluate(grid(scores), resamples=400, head_to_head=[("gated", "merge")])
    against_merge = evaluate(grid(scores), base="merge", resamples=400).result("gated", "quality")
    result = evaluation.comparisons["gated vs merge"]["results"]["quality"]
    assert result["diff"] == pytest.approx(0.05, abs=0.005) and result["significant"]
    for key in ("diff", "diff_ci", "win_rate", "win_rate_ci", "significant"):
        assert result[key] == pytest.approx(against_merge[key])
    data = json.loads(json.dumps(evaluation.to_dict(), allow_nan=False))
    assert Evaluation.from_dict(data).comparisons == evaluation.comparisons
    with pytest.raises(ValueError, match="head_to_head: 'nope'"):
        evaluate(grid(scores), head_to_head=[("gated", "nope")])


# -- validation split, normalised score, share of own gain --------------------------------------------

def two_aspect_grid(scores: dict[str, dict[str, np.ndarray]]) -> ScoreGrid:
    prompts, seeds = next(iter(next(iter(scores.values())).values())).shape
    return ScoreGrid(prompts=[f"prompt {p}" for p in range(prompts)], seeds=[list(range(seeds))] * prompts,
                     scores={v: {a: np.asarray(s, dtype=float) for a, s in by.items()} for v, by in scores.items()})


def test_validation_prompts_are_a_stable_hashed_subset():
    from versat2i.loop.evaluate import validation_prompts

    prompts = [f"a prompt {i}" for i in range(40)]
    chosen = validation_prompts(prompts, 0.25)
    assert len(chosen) == 10 and chosen == [p for p in prompts if p in chosen]  # in the given order
    # the same prompts whatever the order or the other prompts around them (a hash of the text)
    assert validation_prompts(list(reversed(prompts)), 0.25) == list(reversed(chosen))
    assert set(validation_prompts(prompts[:20], 0.25)) <= set(prompts[:20])
    assert validation_prompts(prompts, 0.0) == [] and len(validation_prompts(prompts[:2], 0.1)) == 1
    assert validation_prompts(prompts[:1], 0.5) == []  # one prompt stays for testing
    with pytest.raises(ValueError, match="must be in"):
        validation_prompts(prompts, 1.0)


def test_aspect_scales_are_the_pooled_within_prompt_sd():
    from versat2i.loop.evaluate import aspect_scales

    base = {"a": np.array([[0.0, 2.0], [1.0, 1.0]]), "flat": np.ones((2, 2))}
    scales = aspect_scales(base)
    assert scales["a"] == pytest.approx(math.sqrt((1 + 1 + 0 + 0) / (2 * 1)))  # deviations from prompt means
    assert scales["flat"] == 1.0  # a constant reward counts in its own units


def test_normalised_score_and_shares_by_hand():
    """Two aspects with different scales: a change of one scale unit on either counts the same."""
    rng = np.random.default_rng(5)
    base_a, base_b = rng.normal(0, 1.0, (30, 4)), rng.normal(0, 0.01, (30, 4))
    scores = {
        "base": {"a": base_a, "b": base_b},
        "lora:a": {"a": base_a + 0.4, "b": base_b},
        "lora:b": {"a": base_a, "b": base_b + 0.004},
        "merge": {"a": base_a + 0.2, "b": base_b + 0.002},
    }
    evaluation = evaluate(two_aspect_grid(scores), resamples=500, own_lora={"a": "lora:a", "b": "lora:b"},
                          mixtures=["merge"], baselines=["merge"])
    scale_a, scale_b = evaluation.scales["a"], evaluation.scales["b"]
    merge = evaluation.normalised["merge"]["test"]
    assert merge["diff"] == pytest.approx((0.2 / scale_a + 0.002 / scale_b) / 2)
    assert evaluation.normalised["lora:a"]["test"]["diff"] == pytest.approx(0.4 / scale_a / 2)
    assert evaluation.normalised["merge"]["validation"] is None  # no validation split
    share = evaluation.share_of_own_gain["a"]["merge"]
    assert share["share"] == pytest.approx(0.5) and share["share_ci"] == pytest.approx([0.5, 0.5])
    assert share["own"] == "lora:a" and share["own_gain"] == pytest.approx(0.4)
    assert evaluation.share_of_own_gain["b"]["merge"]["share"] == pytest.approx(0.5)
    assert evaluation.best_baseline == "merge"
    data = json.loads(json.dumps(evaluation.to_dict(), allow_nan=False))
    assert Evaluation.from_dict(data).to_dict() == data


def test_share_ci_covers_the_true_share_about_95_percent_of_the_time():
    from versat2i.loop.evaluate import resample_indices, share_of_gain

    rng = np.random.default_rng(8)
    covered = 0
    for trial in range(60):
        noise = rng.normal(0, 0.3, (2, 24, 8))
        own, mixed = 0.2 + noise[0], 0.16 + noise[1]  # true share 0.8
        indices = resample_indices((24, 8), resamples=400, seed=trial)
        low, high = share_of_gain(mixed, own, indices)["share_ci"]
        covered += low <= 0.8 <= high
    assert 0.85 <= covered / 60 <= 1.0


def test_every_figure_comes_from_the_test_prompts_and_validation_picks_the_best_baseline():
    """The validation prompts are left out of every figure but the validation scores, which pick the
    best baseline: here 'a' wins on validation and 'b' on test, so 'a' is the best baseline."""
    rng = np.random.default_rng(6)
    base = rng.normal(0, 1, (20, 4))
    val_rows = list(range(5))
    a, b = base.copy(), base.copy()
    a[val_rows] += 1.0  # a: better on the validation prompts only
    b[5:] += 1.0  # b: better on the test prompts only
    grid_ = two_aspect_grid({"base": {"q": base}, "a": {"q": a}, "b": {"q": b}, "gated": {"q": b + 0.5}})
    validation = grid_.prompts[:5]
    evaluation = evaluate(grid_, resamples=300, validation=validation, baselines=["a", "b"],
                          head_to_head=[("gated", "a"), ("gated", "b")])
    assert evaluation.grid.prompts == grid_.prompts[5:] and evaluation.validation.prompts == validation
    assert evaluation.result("a", "q")["diff"] == pytest.approx(0.0)  # a's gain is not in the test figures
    assert evaluation.result("b", "q")["diff"] == pytest.approx(1.0)
    assert evaluation.normalised["a"]["validation"] > evaluation.normalised["b"]["validation"]
    assert evaluation.best_baseline == "a"
    normalised = evaluation.comparisons["gated vs b"]["normalised"]
    assert normalised["diff"] == pytest.approx(0.5 / evaluation.scales["q"]) and normalised["significant"]
    assert evaluation.settings["validation_prompts"] == 5
    data = json.loads(json.dumps(evaluation.to_dict(), allow_nan=False))
    assert Evaluation.from_dict(data).validation.prompts == validation
    with pytest.raises(ValueError, match="not on the evaluation grid"):
        evaluate(grid_, validation=["nope"])
    with pytest.raises(ValueError, match="keep some for testing"):
        evaluate(grid_, validation=grid_.prompts)


def test_a_version_1_evaluation_still_reads():
    evaluation = evaluate(grid({"base": np.ones((2, 2)), "v": np.full((2, 2), 2.0)}), resamples=100)
    data = evaluation.to_dict()
    old = {k: v for k, v in data.items() if k not in ("scales", "normalised", "share_of_own_gain", "best_baseline",
                                                      "validation")}
    old["version"] = 1
    again = Evaluation.from_dict(old)
    assert again.normalised == {} and again.validation is None and again.result("v", "quality")["diff"] == 1.0
