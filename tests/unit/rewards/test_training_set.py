"""Training-set writer and reader: kohya layout, manifest contents, atomicity, confinement and
bad inputs (each refused with nothing written)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from versat2i.rewards.score_table import ScoreTable
from versat2i.rewards.selection import select_best_per_prompt
from versat2i.safe_io import TargetExistsError
from versat2i.training_set import writer as training_set
from versat2i.training_set.layout import LATENTS_SUFFIX, MANIFEST_NAME, SUMMARY_NAME
from versat2i.training_set.manifest import read_manifest, read_training_set
from versat2i.training_set.writer import write_training_set

SCORERS = {
    "aesthetics": {"id": "laion-aesthetic-v2", "weights_hash": "a" * 64},
    "lowlevel": {"id": "analytic:sharpness", "weights_hash": "none"},
}
PROMPTS = ["a red fox", "a red fox", "a red fox", "a blue\ncar", "a blue\ncar", "a blue\ncar"]
SEEDS = [100, 101, 102, 200, 201, 202]


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def table() -> ScoreTable:
    return ScoreTable.from_scores(
        {"aesthetics": [5.0, 6.5, 4.0, 3.0, 5.5, 5.5], "lowlevel": [10.0, 30.0, 20.0, 40.0, 5.0, 1.0]},
        SCORERS, PROMPTS, seeds=SEEDS,
    )


@pytest.fixture
def images() -> torch.Tensor:
    # Each image has its own colour, plus values that exercise rounding (x.5 / 255 levels).
    generator = torch.Generator().manual_seed(0)
    return torch.rand(6, 12, 16, 3, generator=generator)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "output"
    folder.mkdir()
    return folder


def write(root, table, images, name="run1", thresholds=None, **kwargs):
    selection = select_best_per_prompt(table, thresholds)
    return write_training_set(root, name, table, selection, images, **kwargs)


def test_layout_and_manifest_contents(root, table, images):
    written = write(root, table, images, thresholds={"aesthetics": "none", "lowlevel": 15.0},
                    repeats={"aesthetics": 3, "lowlevel": 7})
    dataset = root / "run1"
    assert written.path == dataset.resolve()
    # aesthetics: fox best = row 1 (6.5), car tie 5.5/5.5 -> candidate 1 (row 4).
    # lowlevel: fox best = row 1 (30 >= 15), car best = row 3 (40).
    # The layout spelled out as users and kohya see it: the one test that pins the names
    # training_set/layout.py defines (a change to them is a format change); others use the constants.
    assert listing(dataset) == [
        "3_aesthetics", "3_aesthetics/p00000_c001.png", "3_aesthetics/p00000_c001.txt",
        "3_aesthetics/p00001_c001.png", "3_aesthetics/p00001_c001.txt",
        "7_lowlevel", "7_lowlevel/p00000_c001.png", "7_lowlevel/p00000_c001.txt",
        "7_lowlevel/p00001_c000.png", "7_lowlevel/p00001_c000.txt",
        "dataset.json", "manifest.jsonl",
    ]
    lines = [json.loads(line) for line in (dataset / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4
    by_key = {(e["aspect"], e["id"]): e for e in lines}
    car = by_key[("lowlevel", "p00001_c000")]
    assert car == {
        "id": "p00001_c000", "aspect": "lowlevel", "file": "7_lowlevel/p00001_c000.png",
        "caption": "a blue car", "prompt": "a blue\ncar", "seed": 200, "prompt_index": 1, "candidate_index": 0,
        "score": 40.0, "scorer": SCORERS["lowlevel"],
        "scores": {"aesthetics": 3.0, "lowlevel": 40.0}, "scorers": SCORERS,
        "threshold": {"kind": "absolute", "value": 15.0, "resolved": 15.0},
        "width": 16, "height": 12, "latents": None, "source": None,
        "judged": {"aesthetics": True, "lowlevel": True},
        "pixels_sha256": hashlib.sha256((images[3] * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest(),
    }
    fox = by_key[("aesthetics", "p00000_c001")]
    assert (fox["seed"], fox["score"], fox["scorer"], fox["threshold"]) == (
        101, 6.5, SCORERS["aesthetics"], {"kind": "none", "value": None, "resolved": None})
    assert fox["scores"] == {"aesthetics": 6.5, "lowlevel": 30.0}
    # Captions: the prompt on one line, UTF-8.
    assert (dataset / "7_lowlevel/p00001_c000.txt").read_text(encoding="utf-8") == "a blue car"
    summary = json.loads((dataset / SUMMARY_NAME).read_text())
    assert summary["format"] == "versat2i-training-set" and summary["version"] == 1
    assert (summary["images_scored"], summary["prompts"], summary["images_kept"]) == (6, 2, 4)
    assert summary["aspects"]["lowlevel"] == {
        "folder": "7_lowlevel", "repeats": 7, "kept": 2, "discarded": 4, "scorer": SCORERS["lowlevel"],
        "threshold": {"kind": "absolute", "value": 15.0, "resolved": 15.0},
    }


def test_png_pixels_round_to_nearest(root, table, images):
    write(root, table, images)
    saved = np.asarray(Image.open(root / "run1/10_lowlevel/p00001_c000.png"))
    expected = (images[3] * 255).round().to(torch.uint8).numpy()
    assert saved.dtype == np.uint8 and saved.shape == (12, 16, 3)
    np.testing.assert_array_equal(saved, expected)
    assert np.abs(saved / 255.0 - images[3].numpy()).max() <= 0.5 / 255 + 1e-7


def test_read_manifest_and_training_set(root, table, images):
    written = write(root, table, images)
    entries = read_manifest(root / "run1")
    assert entries == written.entries
    assert all(e.image_path.is_file() and e.caption_path.is_file() for e in entries)
    lowlevel = read_manifest(root / "run1" / MANIFEST_NAME, aspect="lowlevel")
    assert {e.aspect for e in lowlevel} == {"lowlevel"} and len(lowlevel) == 2
    with pytest.raises(ValueError, match="no images for aspect 'geometry'; it has: aesthetics, lowlevel"):
        read_manifest(root / "run1", aspect="geometry")
    loaded = read_training_set(root / "run1")
    assert loaded.summary == written.summary and len(loaded.aspect_entries("aesthetics")) == 2


def test_read_manifest_refuses_paths_outside_the_dataset(root, table, images):
    write(root, table, images)
    manifest = root / "run1" / MANIFEST_NAME
    record = json.loads(manifest.read_text().splitlines()[0])
    record["file"] = "../../secret.png"
    manifest.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"line 1: file '../../secret.png': '\.\.' is not allowed"):
        read_manifest(root / "run1")
    del record["seed"]
    record["file"] = "ok.png"
    manifest.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seed'\]"):
        read_manifest(root / "run1")
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(root / "nothing-here")


def test_latents_are_saved_next_to_images(root, table, images):
    latents = torch.randn(6, 4, 3, 2)
    written = write(root, table, images, latents=latents, latents_metadata={"vae_sha256": "b" * 64})
    entry = next(e for e in written.entries if e.aspect == "lowlevel" and e.prompt_index == 1)
    assert entry.latents == f"10_lowlevel/p00001_c000{LATENTS_SUFFIX}"
    with safe_open(str(entry.latents_path), "pt") as handle:
        assert list(handle.keys()) == ["latents"]
        assert handle.metadata() == {"vae_sha256": "b" * 64}
        torch.testing.assert_close(handle.get_tensor("latents"), latents[3])
    assert written.summary["latents"] is True


def test_crash_mid_write_leaves_nothing(root, table, images, monkeypatch):
    real_save = training_set.save_png
    calls = []

    def failing_save(pixels, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_save(pixels, path)

    monkeypatch.setattr(training_set, "save_png", failing_save)
    with pytest.raises(OSError, match="simulated"):
        write(root, table, images, name="nested/run1")
    assert len(calls) == 3
    assert listing(root) == []  # no dataset, no temp folder, not even the 'nested' parent


def test_existing_dataset_is_not_overwritten_unless_asked(root, table, images):
    write(root, table, images)
    before = {p: p.read_bytes() for p in (root / "run1").rglob("*") if p.is_file()}
    other = ScoreTable.from_scores({"aesthetics": [1.0] * 6, "lowlevel": [1.0] * 6}, SCORERS, PROMPTS, seeds=SEEDS)
    with pytest.raises(TargetExistsError, match="already exists.*overwrite"):
        write(root, other, images)
    assert {p: p.read_bytes() for p in (root / "run1").rglob("*") if p.is_file()} == before
    write(root, other, images, overwrite=True, repeats=2)
    assert sorted(p.name for p in root.iterdir()) == ["run1"]  # replaced, no backup or temp left
    assert sorted(p.name for p in (root / "run1").iterdir()) == sorted([
        "2_aesthetics", "2_lowlevel", SUMMARY_NAME, MANIFEST_NAME])
    # candidate 0 wins every all-equal tie
    assert {e.candidate_index for e in read_manifest(root / "run1")} == {0}


def file_states(folder: Path) -> dict:
    """Every file's bytes and identity (inode, mtime): a rewrite with equal bytes still changes it."""
    return {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_the_same_content_again_returns_the_existing_set_and_writes_nothing(root, table, images):
    first = write(root, table, images, thresholds={"lowlevel": 15.0})
    assert not first.reused
    before = file_states(root / "run1")
    again = write(root, table, images.clone(), thresholds={"lowlevel": 15.0})  # equal content, other tensors
    assert again.reused and again.path == first.path
    assert again.summary["content_sha256"] == first.summary["content_sha256"]
    assert [e.to_dict() for e in again.entries] == [e.to_dict() for e in first.entries]
    assert file_states(root / "run1") == before  # nothing rewritten: a LoRA trained on it stays valid
    # overwrite=True does not rewrite equal content either
    assert write(root, table, images, thresholds={"lowlevel": 15.0}, overwrite=True).reused
    assert file_states(root / "run1") == before


@pytest.mark.parametrize("change", ["threshold", "repeats", "score", "caption", "pixels"])
def test_any_change_to_the_content_is_another_set(root, table, images, change):
    write(root, table, images)
    before = file_states(root / "run1")
    kwargs, other_table, other_images = {}, table, images
    if change == "threshold":
        kwargs["thresholds"] = {"lowlevel": 15.0}  # keeps other images for lowlevel
    elif change == "repeats":
        kwargs["repeats"] = 3
    elif change == "score":  # same picks, one kept score differs
        other_table = ScoreTable.from_scores(
            {"aesthetics": [5.0, 6.6, 4.0, 3.0, 5.5, 5.5], "lowlevel": [10.0, 30.0, 20.0, 40.0, 5.0, 1.0]},
            SCORERS, PROMPTS, seeds=SEEDS)
    elif change == "caption":
        other_table = ScoreTable.from_scores(
            {"aesthetics": [5.0, 6.5, 4.0, 3.0, 5.5, 5.5], "lowlevel": [10.0, 30.0, 20.0, 40.0, 5.0, 1.0]},
            SCORERS, [p.replace("fox", "cat") for p in PROMPTS], seeds=SEEDS)
    else:  # a kept image's pixels (the table scored these pixels: no fingerprints recorded in it)
        other_images = images.clone()
        other_images[1] = 1.0 - other_images[1]
    with pytest.raises(TargetExistsError, match="already exists and holds other content") as info:
        write(root, other_table, other_images, **kwargs)
    assert info.value.path == (root / "run1").resolve()
    assert file_states(root / "run1") == before
    replaced = write(root, other_table, other_images, overwrite=True, **kwargs)
    assert not replaced.reused and file_states(root / "run1") != before


def test_a_folder_that_is_no_training_set_is_not_reused(root, table, images):
    (root / "run1").mkdir()
    (root / "run1" / "notes.txt").write_text("mine")
    with pytest.raises(TargetExistsError, match="holds other content"):
        write(root, table, images)
    assert (root / "run1" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/../../escape", "", "C:\\x"])
def test_dataset_name_is_confined(root, table, images, name):
    with pytest.raises(ValueError, match="dataset name"):
        write(root, table, images, name=name)
    assert listing(root) == [] and listing(root.parent) == ["output"]


def test_symlink_escape_is_refused(root, table, images, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        write(root, table, images, name="link/run1")
    assert listing(outside) == []


def test_image_files_as_source(root, table, images, tmp_path):
    files = []
    for i, image in enumerate(images):
        path = tmp_path / f"src_{i}.png"
        Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(path)
        files.append(path)
    written = write(root, table, files)
    entry = written.entries[0]
    source = np.asarray(Image.open(files[table.prompt_indices.index(entry.prompt_index) + entry.candidate_index]))
    np.testing.assert_array_equal(np.asarray(Image.open(entry.image_path)), source)


def test_bad_inputs_write_nothing(root, table, images, tmp_path):
    selection = select_best_per_prompt(table)
    rgba = torch.rand(6, 12, 16, 4)
    nan_images = images.clone()
    nan_images[2, 0, 0, 0] = float("nan")
    smaller = ScoreTable.from_scores({"aesthetics": [1.0], "lowlevel": [1.0]}, SCORERS, ["x"])
    cases = [
        (dict(images=images[:5]), "5 images for 6 scored rows"),
        (dict(images=rgba), "RGBA"),
        (dict(images=nan_images), "NaN"),
        (dict(images=images * 2), "range"),
        (dict(images=[tmp_path / "missing.png"] * 6), "not found"),
        (dict(images=str(tmp_path)), "single path"),
        (dict(selection=select_best_per_prompt(smaller)), "selection covers 1 images"),
        (dict(repeats=0), "whole number >= 1"),
        (dict(repeats={"geometry": 3}), "not in the selection"),
        (dict(latents=torch.zeros(5, 4, 2, 2)), "5 latents for 6 images"),
        (dict(selection=select_best_per_prompt(table, 100.0)), "no image passed the threshold"),
    ]
    for change, fragment in cases:
        kwargs = dict(images=images, selection=selection)
        kwargs.update(change)
        with pytest.raises((ValueError, FileNotFoundError), match=fragment):
            write_training_set(root, "run1", table, kwargs.pop("selection"), kwargs.pop("images"), **kwargs)
        assert listing(root) == [], change


def test_aspect_names_must_be_folder_names(root, images):
    table = ScoreTable.from_scores({"../up": [1.0] * 6}, {"../up": SCORERS["lowlevel"]}, PROMPTS)
    with pytest.raises(ValueError, match="an aspect name uses letters, digits"):
        write(root, table, images)
    assert listing(root) == []


def test_aspect_with_nothing_kept_gets_no_folder(root, table, images):
    written = write(root, table, images, thresholds={"aesthetics": 100.0, "lowlevel": "none"})
    assert sorted(p.name for p in written.path.iterdir()) == sorted(["10_lowlevel", SUMMARY_NAME, MANIFEST_NAME])
    assert written.summary["aspects"]["aesthetics"]["kept"] == 0
    assert written.summary["aspects"]["aesthetics"]["discarded"] == 6


def test_manifest_records_each_scorers_settings(root, images):
    scorers = {"lowlevel": {"id": "pyiqa:niqe", "weights_hash": "e" * 64, "score_transform": "negate"},
               "geometry": {"id": "mediapipe-anatomy", "weights_hash": "f" * 64, "no_person_score": 0.0,
                            "max_num_hands": 4}}
    judged = [False, True, True, False, False, False]
    table = ScoreTable.from_scores({"lowlevel": [-5.0, -4.0, -6.0, -3.0, -2.0, -1.0],
                                    "geometry": [0.0, 0.8, 0.6, 0.0, 0.0, 0.0]}, scorers, PROMPTS, seeds=SEEDS,
                                   judged={"geometry": judged})
    written = write(root, table, images)
    lines = [json.loads(line) for line in (written.path / MANIFEST_NAME).read_text().splitlines()]
    assert all(line["scorers"] == scorers for line in lines)
    assert {line["aspect"]: line["scorer"] for line in lines} == scorers
    # The car prompt has no person in any candidate: geometry keeps nothing for it.
    assert [(line["prompt_index"], line["candidate_index"]) for line in lines if line["aspect"] == "geometry"] == [(0,
                                                                                                                    1)]
    # Every entry says which of its scores are judgements: the car kept for lowlevel (row 5) had
    # nothing to judge for geometry, so its geometry score is only the placeholder.
    rows = {(line["prompt_index"], line["candidate_index"]): line for line in lines}
    for (prompt_index, candidate_index), line in rows.items():
        assert line["judged"] == {"lowlevel": True, "geometry": judged[prompt_index * 3 + candidate_index]}
    assert rows[(1, 2)]["judged"]["geometry"] is False and rows[(1, 2)]["aspect"] == "lowlevel"
    assert {e.judged["geometry"] for e in read_manifest(written.path)} == {True, False}
    summary = json.loads((written.path / SUMMARY_NAME).read_text())
    assert summary["aspects"]["geometry"]["scorer"] == scorers["geometry"]


def test_images_other_than_the_scored_ones_are_refused_and_nothing_is_written(root, images, tmp_path):
    """The same number of images is not enough: where the table recorded each image's pixels
    (Score Images and `versat2i score` do), a different batch or order is refused up front."""
    from versat2i.rewards.score_table import image_fingerprints

    table = ScoreTable.from_scores(
        {"aesthetics": [5.0, 6.5, 4.0, 3.0, 5.5, 5.5], "lowlevel": [10.0, 30.0, 20.0, 40.0, 5.0, 1.0]},
        SCORERS, PROMPTS, seeds=SEEDS, fingerprints=image_fingerprints(images))
    other = torch.rand(6, 12, 16, 3, generator=torch.Generator().manual_seed(99))
    for wrong, rows in ((other, "0, 1, 2, 3, 4, 5"), (images.flip(0), "0, 1, 2, 3, 4, 5"),
                        (torch.cat([images[:4], images[5:], images[4:5]]), "4, 5")):
        with pytest.raises(ValueError, match=rf"image\(s\) \[{rows}\] are not the images that were scored"):
            write(root, table, wrong)
        assert listing(root) == []
    # Per-row sources are checked too (files are compared when they are read, inside the temp folder).
    files = []
    for row in range(6):
        path = tmp_path / f"{row}.png"
        Image.fromarray(training_set.to_uint8(images[row if row != 1 else 0])).save(path)
        files.append(path)
    with pytest.raises(ValueError, match=r"images\[1\].*1.png.*is not the image that was scored"):
        write(root, table, files)
    assert listing(root) == []
    assert write(root, table, images).entries  # the scored images themselves are accepted


def test_process_killed_mid_write_leaves_no_dataset_under_the_final_name(root, tmp_path):
    """A hard crash (the process dies: no exception handler runs, nothing is cleaned up) part-way
    through the images: the final name never appears; only a hidden temporary folder remains."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import torch
        from versat2i.training_set import writer as training_set
        from versat2i.rewards.score_table import ScoreTable
        from versat2i.rewards.selection import select_best_per_prompt

        table = ScoreTable.from_scores({{"lowlevel": [float(i) for i in range(6)]}},
                                       {{"lowlevel": {{"id": "analytic:sharpness", "weights_hash": "none"}}}},
                                       ["a", "a", "a", "b", "b", "b"])
        real_save, calls = training_set.save_png, []

        def save_then_die(pixels, path):
            real_save(pixels, path)
            calls.append(path)
            if len(calls) == 2:
                os._exit(9)  # like SIGKILL or a power cut: no cleanup runs

        training_set.save_png = save_then_die
        training_set.write_training_set({str(root)!r}, "run1", table, select_best_per_prompt(table),
                                        torch.rand(6, 12, 16, 3), repeats=1)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    left = sorted(p.name for p in root.iterdir())
    assert "run1" not in left
    assert len(left) == 1 and left[0].startswith(".run1.tmp-"), left  # hidden, never taken for a dataset
    with pytest.raises(FileNotFoundError):
        read_manifest(root / "run1")
