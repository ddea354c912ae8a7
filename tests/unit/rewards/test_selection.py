"""Best-per-prompt filter rules: grouping, absolute and percentile thresholds, ties, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from versat2i.rewards.score_table import ScoreTable
from versat2i.rewards.selection import Threshold, select_aspect, select_best_per_prompt

SCORER = {"id": "analytic:sharpness", "weights_hash": "none"}


def make_table(scores: dict[str, list[float]], prompts: list[str], **columns) -> ScoreTable:
    return ScoreTable.from_scores(scores, {a: SCORER for a in scores}, prompts, **columns)


# -- Threshold ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, kind, value", [
    (None, "none", None), ("none", "none", None), ("", "none", None), ("NONE", "none", None),
    (5, "absolute", 5.0), (-0.25, "absolute", -0.25), ("5.5", "absolute", 5.5), ("-2", "absolute", -2.0),
    ("1e-3", "absolute", 0.001),
    ("p75", "percentile", 75.0), ("P 12.5", "percentile", 12.5), ("75%", "percentile", 75.0),
    ("0%", "percentile", 0.0), ("p100", "percentile", 100.0),
])
def test_threshold_parse(spec, kind, value):
    threshold = Threshold.parse(spec)
    assert (threshold.kind, threshold.value) == (kind, value)
    assert Threshold.parse(str(threshold)) == threshold  # the text form round-trips


@pytest.mark.parametrize("spec, fragment", [
    ("p101", "between 0 and 100"), ("-5%", "between 0 and 100"), ("p-1", "between 0 and 100"),
    ("nan", "finite"), ("inf", "finite"), ("good", "give 'none'"), (True, "give 'none'"),
])
def test_threshold_parse_errors(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        Threshold.parse(spec)


# -- select_aspect -----------------------------------------------------------------------------------

def test_best_per_prompt_without_threshold():
    # prompt 0: rows 0-2, prompt 1: rows 3-5
    chosen = select_aspect([0.1, 0.9, 0.5, 0.7, 0.2, 0.3], [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])
    assert chosen.kept == (1, 3)
    assert chosen.discarded == (0, 2, 4, 5)
    assert chosen.best == {0: 1, 1: 3}
    assert chosen.resolved is None
    assert chosen.threshold_record() == {"kind": "none", "value": None, "resolved": None}


def test_groups_need_not_be_contiguous():
    chosen = select_aspect([3.0, 1.0, 2.0, 5.0], [1, 0, 1, 0], [0, 0, 1, 1])
    assert chosen.kept == (3, 0)  # in prompt order: prompt 0's best (row 3), then prompt 1's (row 0)
    assert chosen.discarded == (1, 2)


def test_absolute_threshold_is_inclusive():
    scores = [0.4, 0.5, 0.49, 0.3]
    chosen = select_aspect(scores, [0, 0, 1, 1], [0, 1, 0, 1], "0.5")
    assert chosen.kept == (1,)  # 0.5 >= 0.5 kept, 0.49 not
    assert chosen.rejected_best == (2,)
    assert chosen.discarded == (0, 2, 3)
    assert chosen.resolved == 0.5


def test_all_fail_keeps_nothing():
    chosen = select_aspect([0.1, 0.2, 0.3], [0, 1, 2], None, 10.0)
    assert chosen.kept == ()
    assert chosen.discarded == (0, 1, 2)
    assert chosen.rejected_best == (0, 1, 2)


def test_single_candidate_per_prompt_is_its_best():
    chosen = select_aspect([0.3, -1.0, 2.0], [0, 1, 2], [0, 0, 0])
    assert chosen.kept == (0, 1, 2) and chosen.discarded == ()


def test_percentile_is_over_the_whole_pool():
    scores = [1.0, 2.0, 3.0, 10.0, 4.0, 5.0, 6.0, 7.0]
    prompts = [0, 0, 0, 0, 1, 1, 1, 1]
    chosen = select_aspect(scores, prompts, None, "p50")
    # The pool median includes the non-best candidates: median of all 8 scores = 4.5.
    assert chosen.resolved == pytest.approx(float(np.percentile(scores, 50)))
    assert chosen.resolved == pytest.approx(4.5)
    assert chosen.kept == (3, 7)
    # Raising the percentile past prompt 1's best (7.0) drops it; 10.0 is the pool max.
    high = select_aspect(scores, prompts, None, "p90")
    assert high.resolved == pytest.approx(float(np.percentile(scores, 90)))
    assert high.kept == (3,)


def test_percentile_bounds_are_inclusive():
    scores = [0.2, 0.8, 0.1, 0.5, 0.8]
    prompts = [0, 0, 1, 1, 2]
    assert select_aspect(scores, prompts, None, "p0").kept == (1, 3, 4)  # >= pool minimum: every best
    top = select_aspect(scores, prompts, None, "p100")
    assert top.resolved == 0.8 and top.kept == (1, 4)  # only bests equal to the pool maximum


def test_ties_go_to_lowest_candidate_index_then_row():
    # Rows are not in candidate order: the tie between rows 0 (candidate 2) and 2 (candidate 0)
    # goes to candidate 0, whatever the row order.
    chosen = select_aspect([0.9, 0.1, 0.9], [0, 0, 0], [2, 1, 0])
    assert chosen.kept == (2,)
    assert select_aspect([0.9, 0.9], [0, 0], [5, 5]).kept == (0,)  # equal candidates: earliest row


def test_selection_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(24) * 4) / 4  # many exact ties
    prompts = np.repeat(np.arange(6), 4)
    candidates = np.tile(np.arange(4), 6)
    reference = select_aspect(scores.tolist(), prompts.tolist(), candidates.tolist(), "p40")
    reference_ids = {(prompts[r], candidates[r]) for r in reference.kept}
    order = rng.permutation(24)
    shuffled = select_aspect(scores[order].tolist(), prompts[order].tolist(), candidates[order].tolist(), "p40")
    assert {(prompts[order][r], candidates[order][r]) for r in shuffled.kept} == reference_ids
    assert shuffled.resolved == reference.resolved


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(scores=[], prompt_indices=[]), "pool is empty"),
    (dict(scores=[0.1, float("nan"), 0.3], prompt_indices=[0, 0, 1]), r"NaN/inf scores for image\(s\) \[1\]"),
    (dict(scores=[0.1, float("inf")], prompt_indices=[0, 1]), "NaN/inf"),
    (dict(scores=[0.1, 0.2], prompt_indices=[0]), "2 scores but 1 prompt indices"),
    (dict(scores=[0.1, 0.2], prompt_indices=[0, 1], candidate_indices=[0]), "candidate indices"),
    (dict(scores=[0.1], prompt_indices=[0], threshold="p120"), "between 0 and 100"),
])
def test_select_aspect_input_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        select_aspect(**kwargs, aspect="aesthetics")


# -- select_best_per_prompt over a ScoreTable -------------------------------------------------------

def test_per_aspect_selection_over_a_table():
    prompts = ["cat", "cat", "cat", "dog", "dog", "dog"]
    table = make_table({
        "aesthetics": [5.0, 6.0, 4.0, 3.0, 3.5, 2.0],
        "alignment": [30.0, 20.0, 25.0, 21.0, 28.0, 22.0],
    }, prompts, seeds=[10, 11, 12, 20, 21, 22])
    selection = select_best_per_prompt(table, {"aesthetics": 4.0, "alignment": "p50"})
    assert selection.aspects["aesthetics"].kept == (1,)  # dog's best 3.5 < 4.0
    assert selection.aspects["alignment"].kept == (0, 4)
    assert selection.aspects["alignment"].resolved == pytest.approx(float(np.percentile(table.scores["alignment"], 50)))
    assert selection.kept_by_aspect() == {"aesthetics": [1], "alignment": [0, 4]}
    for chosen in selection.aspects.values():  # kept and discarded partition the pool
        assert sorted(chosen.kept + chosen.discarded) == list(range(6))
    assert "aesthetics: kept 1 of 2 prompts" in selection.summary()


def test_one_threshold_for_every_aspect_and_aspect_subset():
    table = make_table({"a": [1.0, 2.0], "b": [2.0, 1.0]}, ["x", "x"])
    selection = select_best_per_prompt(table, "none", aspects=["b"])
    assert list(selection.aspects) == ["b"] and selection.aspects["b"].kept == (0,)


def test_table_selection_errors():
    table = make_table({"a": [1.0, 2.0]}, ["x", "y"])
    with pytest.raises(ValueError, match=r"\['missing'\] were not scored"):
        select_best_per_prompt(table, aspects=["missing"])
    with pytest.raises(ValueError, match="thresholds given for aspect"):
        select_best_per_prompt(table, {"b": 1.0})
    with pytest.raises(ValueError, match="none selected"):
        select_best_per_prompt(table, aspects=[])


# -- images the scorer found nothing to judge in -------------------------------------------------------

def test_unjudged_images_are_never_kept_whatever_the_threshold():
    # prompt 0: a judged image (0.4) and two unjudged; prompt 1: unjudged only.
    scores, prompts = [0.0, 0.4, 0.0, 0.9, 0.0], [0, 0, 0, 1, 1]
    judged = [False, True, False, False, False]  # row 3 (0.9, the pool's best) is unjudged: a placeholder
    for threshold in (None, "none", 0.0, "p0", "p50", "p100"):
        chosen = select_aspect(scores, prompts, threshold=threshold, judged=judged)
        assert chosen.kept == (1,), threshold
        assert chosen.unjudged == (0, 2, 3, 4) and chosen.best == {0: 1}
        assert chosen.discarded == (0, 2, 3, 4)
    # Without flags every score is a judgement: the default keeps a best of every prompt.
    assert select_aspect(scores, prompts).kept == (1, 3)


def test_a_judged_image_scoring_the_placeholder_value_is_an_ordinary_candidate():
    # The geometry scorer's placeholder for "no person" is 0.0 by default; a person judged at
    # exactly 0.0 is still judged: kept as its prompt's best, and part of the percentile pool.
    scores, prompts = [0.0, 0.0, 0.0, 0.6], [0, 0, 1, 1]
    judged = [False, True, True, True]
    chosen = select_aspect(scores, prompts, threshold="none", judged=judged)
    assert chosen.kept == (1, 3) and chosen.unjudged == (0,)
    # The pool is the three judged scores (0.0, 0.0, 0.6): its median is 0.0, which row 1 reaches.
    # (Told apart by value, the pool would be [0.6] alone, and prompt 0 would keep nothing.)
    pooled = select_aspect(scores, prompts, threshold="p50", judged=judged)
    assert pooled.resolved == pytest.approx(0.0) and pooled.kept == (1, 3)
    assert select_aspect(scores, prompts, threshold="p75", judged=judged).resolved == pytest.approx(0.3)


def test_percentile_pool_leaves_unjudged_images_out():
    scores = [0.9, 0.9, 0.9, 0.2, 0.6, 0.8]
    prompts = [0, 1, 2, 0, 1, 2]
    judged = [False, False, False, True, True, True]
    marked = select_aspect(scores, prompts, threshold="p50", judged=judged)
    assert marked.resolved == pytest.approx(0.6)  # median of 0.2, 0.6, 0.8, not of all six scores
    assert marked.kept == (4, 5)
    unmarked = select_aspect(scores, prompts, threshold="p50")
    assert unmarked.resolved == pytest.approx(0.85)
    everything_unjudged = select_aspect([0.5, 0.5], [0, 1], threshold="p50", judged=[False, False])
    assert everything_unjudged.kept == () and everything_unjudged.resolved is None


def test_judged_flags_must_match_the_scores():
    with pytest.raises(ValueError, match="2 scores but 1 judged flags"):
        select_aspect([0.1, 0.2], [0, 0], judged=[True])
    with pytest.raises(ValueError, match="True or False"):
        select_aspect([0.1, 0.2], [0, 0], judged=[1, 0])


def test_table_selection_reads_the_judged_flags_of_the_table():
    geometry = {"id": "mediapipe-anatomy", "weights_hash": "f" * 64, "no_person_score": 0.0}
    table = ScoreTable.from_scores({"geometry": [0.0, 0.7, 0.0, 0.0], "lowlevel": [0.0, 0.1, 0.3, 0.0]},
                                   {"geometry": geometry, "lowlevel": SCORER}, ["a", "a", "b", "b"],
                                   judged={"geometry": [False, True, False, False]})
    selection = select_best_per_prompt(table)
    assert selection.aspects["geometry"].kept == (1,)  # prompt "b" has no person: nothing kept
    assert selection.aspects["lowlevel"].kept == (1, 2)  # 0.0 means nothing special there
    assert "geometry: kept 1 of 1 prompts" in selection.summary()
    assert "(3 with nothing to judge)" in selection.summary()


# -- the jointly best image (the gate's training data) --------------------------------------------------

def test_joint_scores_standardise_each_aspect_and_pick_the_best_compromise():
    """Aspect a moves on a scale 100x b's: unstandardised, a would decide alone. Standardised, the
    image that is good on both wins: in prompt 0 candidate 1 (a high, b high), not candidate 0 (a
    highest, b lowest)."""
    from versat2i.rewards.selection import JOINT, with_joint_scores

    prompts = ["p0", "p0", "p0", "p1", "p1", "p1"]
    a = [30.0, 28.0, 10.0, 20.0, 10.0, 12.0]
    b = [0.10, 0.30, 0.20, 0.10, 0.35, 0.30]
    table = make_table({"a": a, "b": b}, prompts)
    joint = with_joint_scores(table)
    za = (np.array(a) - np.mean(a)) / np.std(a)
    zb = (np.array(b) - np.mean(b)) / np.std(b)
    np.testing.assert_allclose(joint.scores[JOINT], (za + zb) / 2, rtol=1e-6)
    assert joint.scorers[JOINT]["id"] == "joint:a+b" and table.aspects == ["a", "b"]  # the input is unchanged
    kept = select_best_per_prompt(joint, "none", aspects=[JOINT]).aspects[JOINT].kept
    assert kept == (1, 4)
    assert select_best_per_prompt(table, "none", aspects=["a"]).aspects["a"].kept == (0, 3)  # a alone differs


def test_joint_scores_leave_out_images_an_aspect_could_not_judge():
    from versat2i.rewards.selection import JOINT, with_joint_scores

    table = ScoreTable.from_scores({"a": [1.0, 5.0, 2.0], "b": [1.0, 9.0, 2.0]}, {"a": SCORER, "b": SCORER},
                                   ["p", "p", "p"], judged={"b": [True, False, True]})
    joint = with_joint_scores(table)
    assert joint.judged[JOINT] == [True, False, True]
    assert select_best_per_prompt(joint, "none", aspects=[JOINT]).aspects[JOINT].kept == (2,)
    with pytest.raises(ValueError, match=">= 2 scored aspects"):
        with_joint_scores(table, ["a"])
    with pytest.raises(ValueError, match="name of the joint score column"):
        with_joint_scores(make_table({"joint": [1.0], "a": [2.0]}, ["p"]))
