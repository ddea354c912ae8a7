"""ScoreTable: construction from score_aspects results, validation, JSON/JSONL round trips, text."""

from __future__ import annotations

import json

import pytest
import torch

from versat2i.rewards.base import score_aspects
from versat2i.rewards.registry import get_scorer
from versat2i.rewards.score_table import ScoreTable, prompt_groups
from versat2i.safe_io import TargetExistsError


@pytest.fixture
def table() -> ScoreTable:
    scorers = {"sharp": get_scorer("analytic:sharpness"), "bright": get_scorer("analytic:brightness")}
    images = torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    prompts = ["a red fox", "a red fox", "ein Fuchs ü\nzweite Zeile", "ein Fuchs ü\nzweite Zeile"]
    scores = score_aspects(scorers, images, prompts)
    return ScoreTable.from_scores(scores, scorers, prompts, seeds=[1, 2, 2**40, None],
                                  image_ids=["a.png", "b.png", "c.png", "d.png"])


def test_prompt_groups():
    assert prompt_groups(["a", "b", "a", "a", "c", "b"]) == ([0, 1, 0, 0, 2, 1], [0, 0, 1, 2, 0, 1])


def test_from_scores_records_everything(table):
    assert len(table) == 4 and table.aspects == ["sharp", "bright"]
    assert table.prompt_indices == [0, 0, 1, 1] and table.candidate_indices == [0, 1, 0, 1]
    assert table.seeds == [1, 2, 2**40, None]
    assert table.scorers == {"sharp": {"id": "analytic:sharpness", "weights_hash": "none"},
                             "bright": {"id": "analytic:brightness", "weights_hash": "none"}}
    assert all(isinstance(v, float) for v in table.scores["sharp"])
    row = table.row(2)
    assert row["prompt"] == "ein Fuchs ü\nzweite Zeile" and row["seed"] == 2**40 and row["image_id"] == "c.png"
    assert set(row["scores"]) == {"sharp", "bright"}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_file_round_trip(table, tmp_path, suffix):
    path = tmp_path / f"scores{suffix}"
    table.save(path)
    again = ScoreTable.load(path)
    assert again == table
    with pytest.raises(TargetExistsError):
        table.save(path)
    table.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_jsonl_lines_are_self_contained(table):
    lines = table.to_jsonl().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert set(first) == {"image_id", "prompt", "seed", "prompt_index", "candidate_index", "scores", "judged",
                          "pixels_sha256", "scorers"}
    assert first["judged"] == {"sharp": True, "bright": True}
    assert first["scorers"]["sharp"] == {"id": "analytic:sharpness", "weights_hash": "none"}


def test_text_table_shows_rows_and_marks_kept(table):
    text = table.to_text({"sharp": [1, 3]})
    lines = text.splitlines()
    assert "analytic:sharpness" in lines[0] and "analytic:brightness" in lines[0]
    assert len(lines) == 1 + 1 + 4 + 1  # scorers, header, rows, legend
    assert "a red fox" in lines[2] and "ein Fuchs ü zweite Zeile" in lines[4]  # newline flattened
    assert lines[3].count("*") == 1 and lines[2].count("*") == 0
    assert str(2**40) in lines[4]


@pytest.mark.parametrize("change, fragment", [
    (dict(scores={"a": [0.1, float("nan")]}), "NaN/inf"),
    (dict(scores={"a": [0.1]}), "1 'a' scores for 2 images"),
    (dict(seeds=[1]), "1 seeds for 2 prompts"),
    (dict(seeds=[1, "2"]), r"seeds\[1\]"),
    (dict(seeds=[1, True]), r"seeds\[1\]"),
    (dict(prompts=["p", "p"], prompt_indices=[0, 0], candidate_indices=[0, 0]),
     "repeats prompt_index 0 / candidate_index 0"),
    (dict(prompt_indices=[0, 0], candidate_indices=[0, 1]), "different prompt"),
    (dict(prompt_indices=[0, -1]), "non-negative"),
    (dict(image_ids=["x.png", "x.png"]), "ids repeat"),
    (dict(scorers={"a": {"id": "x"}}), "weights_hash"),
    (dict(scorers={"b": {"id": "x", "weights_hash": "y"}}), "differ"),
    (dict(prompts=[], seeds=[], prompt_indices=[], candidate_indices=[], image_ids=[], scores={"a": []}), "no images"),
    (dict(judged={"a": [True, 1]}), "not true/false"),
    (dict(judged={"a": [True]}), "1 'a' judged flags for 2 images"),
    (dict(judged={"b": [True, True]}), "judged flags for aspects"),
    (dict(fingerprints=["abc", None]), "not a sha256"),
    (dict(fingerprints=[None]), "1 pixels_sha256 for 2 images"),
])
def test_validation(change, fragment):
    fields = dict(prompts=["p", "q"], seeds=[1, 2], prompt_indices=[0, 1], candidate_indices=[0, 0],
                  image_ids=[None, None], scores={"a": [0.1, 0.2]}, scorers={"a": {"id": "x", "weights_hash": "y"}})
    fields.update(change)
    with pytest.raises(ValueError, match=fragment):
        ScoreTable(**fields)


def test_from_scores_needs_a_scorer_per_aspect():
    with pytest.raises(ValueError, match="different aspects"):
        ScoreTable.from_scores({"a": [1.0], "b": [2.0]}, {"a": {"id": "x", "weights_hash": "y"}}, ["p"])


def test_reading_errors_name_the_line(tmp_path, table):
    path = tmp_path / "scores.jsonl"
    lines = table.to_jsonl().splitlines()
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        ScoreTable.load(path)
    other = json.loads(lines[1])
    other["scorers"]["sharp"]["weights_hash"] = "different"
    path.write_text(lines[0] + "\n" + json.dumps(other) + "\n")
    with pytest.raises(ValueError, match="image 2: scorers"):
        ScoreTable.load(path)
    with pytest.raises(FileNotFoundError, match="versat2i score"):
        ScoreTable.load(tmp_path / "missing.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a versat2i scores file"):
        ScoreTable.load(tmp_path / "bad.json")


def test_scorer_records_keep_describe_extras_that_round_trip_through_json(tmp_path):
    class Described:
        scorer_id = "pyiqa:niqe"
        weights_hash = "c" * 64

        def describe(self):
            return {"id": self.scorer_id, "aspect": "lowlevel", "weights_hash": self.weights_hash,
                    "score_transform": "negate", "no_person_score": 0.0, "max_num_hands": 4,
                    "nested": {"not": "a scalar"}, "tensor_like": object(), "nan": float("nan")}

    table = ScoreTable.from_scores({"lowlevel": [-3.0, -2.0]}, {"lowlevel": Described()}, ["a", "a"])
    record = {"id": "pyiqa:niqe", "weights_hash": "c" * 64, "score_transform": "negate", "no_person_score": 0.0,
              "max_num_hands": 4}
    assert table.scorers == {"lowlevel": record}  # 'aspect' and non-JSON values dropped
    for suffix in (".jsonl", ".json"):
        path = table.save(tmp_path / f"scores{suffix}")
        assert ScoreTable.load(path).scorers == {"lowlevel": record}


def test_a_record_that_marks_unjudged_images_by_score_is_refused(tmp_path):
    # Scores written before the per-image judged flags told unjudged images by their score; such a
    # file can't tell a judged image scoring that value apart, so it is refused with the fix.
    scorer = {"id": "mediapipe-anatomy", "weights_hash": "d" * 64, "unjudged_score": 0.0}
    with pytest.raises(ValueError, match="unjudged_score.*score the images again"):
        ScoreTable.from_scores({"geometry": [0.5]}, {"geometry": scorer}, ["a"])
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"prompt": "a", "prompt_index": 0, "candidate_index": 0, "scores": {"geometry": 0.0},
                                "scorers": {"geometry": scorer}}) + "\n")
    with pytest.raises(ValueError, match="unjudged_score"):
        ScoreTable.load(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_judged_flags_and_fingerprints_round_trip_through_files(tmp_path, suffix):
    from versat2i.rewards.score_table import image_fingerprints

    images = torch.rand(3, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    table = ScoreTable.from_scores({"geometry": [0.0, 0.0, 0.7], "sharp": [1.0, 2.0, 3.0]},
                                   {"geometry": {"id": "g", "weights_hash": "none"},
                                    "sharp": {"id": "s", "weights_hash": "none"}},
                                   ["a", "a", "b"], judged={"geometry": torch.tensor([False, True, True])},
                                   fingerprints=image_fingerprints(images))
    assert table.judged == {"geometry": [False, True, True], "sharp": [True, True, True]}
    again = ScoreTable.load(table.save(tmp_path / f"scores{suffix}"))
    assert again.judged == table.judged and again.fingerprints == table.fingerprints
    assert "n/a" in table.to_text().splitlines()[2] and "nothing to judge" in table.to_text()
    # Rows without "judged" (every image judged) or "pixels_sha256" (unknown) still read.
    rows = [{k: v for k, v in row.items() if k not in ("judged", "pixels_sha256")} for row in table.rows()]
    bare = ScoreTable.from_rows(rows)
    assert bare.judged["geometry"] == [True] * 3 and bare.fingerprints == [None] * 3
    with pytest.raises(ValueError, match="'judged' must be an object"):
        ScoreTable.from_rows([{**rows[0], "judged": {"style": False}}])


def test_fingerprints_tell_the_scored_images_from_others():
    from versat2i.rewards.score_table import image_fingerprints

    # 8-bit levels (like images read from PNGs), so a sub-level offset can't cross a rounding boundary.
    images = torch.randint(0, 256, (4, 16, 12, 3), generator=torch.Generator().manual_seed(2)).float() / 255
    table = ScoreTable.from_scores({"a": [0.1, 0.2, 0.3, 0.4]}, {"a": {"id": "x", "weights_hash": "none"}},
                                   ["p", "p", "q", "q"], fingerprints=image_fingerprints(images))
    table.check_images_match(images)
    table.check_images_match((images + 0.2 / 255).clamp(0, 1))  # below 8-bit resolution: the same PNG pixels
    with pytest.raises(ValueError, match=r"image\(s\) \[1, 2\] are not the images that were scored"):
        table.check_images_match(images[[0, 2, 1, 3]])
    other = images.clone()
    other[3, 5, 5, 1] = 1.0 - other[3, 5, 5, 1]  # one pixel of one image
    with pytest.raises(ValueError, match=r"image\(s\) \[3\]"):
        table.check_images_match(other)
    with pytest.raises(ValueError, match="3 images but 4 were scored"):
        table.check_images_match(images[:3])
    # Each fingerprint is the sha256 of the image's 8-bit RGB bytes (what its PNG decodes to).
    import hashlib

    pixels = (images[0] * 255).round().to(torch.uint8).numpy().tobytes()
    assert table.fingerprints[0] == hashlib.sha256(pixels).hexdigest()
