"""`versat2i score` and `versat2i build-dataset` end to end on a tmp folder, with the weight-free
analytic scorers (offline). Bad inputs: one error line, exit status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from versat2i.cli import main
from versat2i.rewards.registry import get_scorer
from versat2i.rewards.score_table import ScoreTable
from versat2i.training_set.layout import MANIFEST_NAME
from versat2i.training_set.manifest import read_manifest

ASPECTS = ["--aspect", "sharp=analytic:sharpness", "--aspect", "bright=analytic:brightness"]


def texture(seed: int, blur: int, size=(24, 32)) -> np.ndarray:
    """Random texture, box-blurred ``blur`` times: more blur -> less sharp."""
    rng = np.random.default_rng(seed)
    image = rng.random((*size, 3))
    for _ in range(blur):
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        image = sum(padded[dy:dy + size[0], dx:dx + size[1]] for dy in range(3) for dx in range(3)) / 9
    return (image * 255).round().astype(np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """2 prompts x 3 candidates; the sharpest candidate is img2 for 'fox' and img3 for 'car'.
    Names sort naturally: img2 < img10."""
    images = tmp_path / "images"
    images.mkdir()
    blur_of = {"img1": 2, "img2": 0, "img3": 1, "img4": 0, "img5": 3, "img10": 2}
    for name, blur in blur_of.items():
        Image.fromarray(texture(len(name) * 7 + blur, blur)).save(images / f"{name}.png")
    return images


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_score_then_build_dataset(folder, tmp_path, capsys):
    # Natural order: img1, img2, img3 (fox), img4, img5, img10 (car).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na fox\na fox\n\na car\na car\na car\n", encoding="utf-8")
    scores = tmp_path / "scores.jsonl"
    code, out, err = run(capsys, "score", folder, "--prompts", prompts, *ASPECTS, "--out", scores)
    assert code == 0, err
    assert "analytic:sharpness" in out and "img" not in out.splitlines()[0]
    table = ScoreTable.load(scores)
    assert table.image_ids == ["img1.png", "img2.png", "img3.png", "img4.png", "img5.png", "img10.png"]
    assert table.prompts == ["a fox"] * 3 + ["a car"] * 3
    assert table.candidate_indices == [0, 1, 2, 0, 1, 2]
    assert table.scorers["sharp"] == {"id": "analytic:sharpness", "weights_hash": "none"}
    # Scores equal the library's on the same pixels.
    pixels = torch.from_numpy(np.array(Image.open(folder / "img5.png"))).float()[None] / 255
    assert table.scores["sharp"][4] == pytest.approx(get_scorer("analytic:sharpness").score(pixels, ["a car"]).item())

    out_root = tmp_path / "datasets"
    code, out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", out_root, "--name", "run1",
                         "--threshold", "sharp=p0", "--repeats", "5", "--repeats", "bright=2")
    assert code == 0, err
    entries = read_manifest(out_root / "run1", aspect="sharp")
    assert sorted(e.source for e in entries) == ["img2.png", "img4.png"]  # the unblurred candidates
    assert {e.file.split("/")[0] for e in entries} == {"5_sharp"}
    assert {e.file.split("/")[0] for e in read_manifest(out_root / "run1", aspect="bright")} == {"2_bright"}
    assert "sharp: kept 2 of 2 prompts" in out
    # the same command again: the set is there with this content; nothing is written, no error
    manifest = out_root / "run1" / "manifest.jsonl"
    stamp = manifest.stat().st_mtime_ns
    code, out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", out_root, "--name", "run1",
                         "--threshold", "sharp=p0", "--repeats", "5", "--repeats", "bright=2")
    assert code == 0, err
    assert "unchanged: it holds this content already" in out and manifest.stat().st_mtime_ns == stamp
    code, _out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", out_root, "--name", "run1")
    assert code != 0 and "holds other content" in err and "--overwrite" in err

    # --joint: one folder, the image of each prompt best at both aspects at once (what a gate trains on)
    code, out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", out_root, "--name", "gate",
                         "--joint", "--repeats", "3")
    assert code == 0, err
    from versat2i.rewards.selection import JOINT, select_best_per_prompt, with_joint_scores

    expected = select_best_per_prompt(with_joint_scores(table), "none", aspects=[JOINT]).aspects[JOINT].kept
    joint_entries = read_manifest(out_root / "gate", aspect=JOINT)
    assert sorted(e.source for e in joint_entries) == sorted(table.image_ids[row] for row in expected)
    assert {e.file.split("/")[0] for e in joint_entries} == {"3_joint"} and len(joint_entries) == 2
    code, _out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", out_root, "--name", "g2",
                          "--joint", "--threshold", "p50")
    assert code != 0 and "--threshold" in err


def test_jsonl_prompts_carry_seeds_to_the_manifest(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    names = ["img1.png", "img2.png", "img3.png", "img4.png", "img5.png", "img10.png"]
    prompts.write_text("".join(
        json.dumps({"file": name, "prompt": "fox" if i < 3 else "car", "seed": 1000 + i}) + "\n"
        for i, name in enumerate(reversed(names))  # order in the file does not matter
    ))
    scores = tmp_path / "scores.json"
    assert run(capsys, "score", folder, "--prompts", prompts, *ASPECTS, "--out", scores, "--quiet")[0] == 0
    table = ScoreTable.load(scores)
    assert table.seeds == [1005, 1004, 1003, 1002, 1001, 1000]
    code, _out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", tmp_path / "ds",
                          "--name", "seeded", "--aspects", "sharp")
    assert code == 0, err
    entries = read_manifest(tmp_path / "ds" / "seeded")
    assert {(e.source, e.seed) for e in entries} == {("img2.png", 1004), ("img4.png", 1002)}


def test_sidecar_captions(folder, tmp_path, capsys):
    for path in folder.glob("*.png"):
        path.with_suffix(".txt").write_text(f"caption of {path.stem}\n", encoding="utf-8")
    code, out, err = run(capsys, "score", folder, "--aspect", "sharp=analytic:sharpness")
    assert code == 0, err
    assert "caption of img10" in out and not list(tmp_path.glob("*.json*"))


def test_mixed_sizes_score_like_single_images(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    arrays = [texture(1, 0, (16, 16)), texture(2, 1, (20, 24)), texture(3, 0, (16, 16))]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    out = tmp_path / "s.jsonl"
    assert run(capsys, "score", folder, "--prompts", tmp_path / "p.txt", "--aspect", "s=analytic:sharpness",
               "--out", out, "--chunk-size", "2")[0] == 0
    scorer = get_scorer("analytic:sharpness")
    expected = [scorer.score(torch.from_numpy(a).float()[None] / 255, ["x"]).item() for a in arrays]
    assert ScoreTable.load(out).scores["s"] == pytest.approx(expected, rel=1e-6)


def test_score_bad_inputs(folder, tmp_path, capsys):
    good_prompts = tmp_path / "prompts.txt"
    good_prompts.write_text("\n".join(["p"] * 6))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"this is not a png")
    (tmp_path / "one.txt").write_text("p")
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.new("RGBA", (16, 16)).save(rgba / "a.png")
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me")
    bad_seed = tmp_path / "bad_seed.jsonl"
    bad_seed.write_text("".join(
        json.dumps({"file": p.name, "prompt": "p", "seed": "x"}) + "\n" for p in folder.glob("*.png")
    ))
    out = tmp_path / "out.jsonl"
    with_prompts = ["score", folder, "--prompts", good_prompts]
    cases = [
        (["score", empty, "--out", out], "has no images"),
        (["score", tmp_path / "nope", "--out", out], "not found"),
        (["score", folder, "--prompts", tmp_path / "one.txt", *ASPECTS, "--out", out], "1 prompt(s) for 6 image(s)"),
        (["score", folder, "--prompts", tmp_path / "missing.txt", *ASPECTS, "--out", out], "not found"),
        (["score", folder, *ASPECTS, "--out", out], "no prompt for 6 image(s)"),
        (["score", broken, "--prompts", tmp_path / "one.txt", *ASPECTS, "--out", out], "can't be read as an image"),
        (["score", rgba, "--prompts", tmp_path / "one.txt", *ASPECTS, "--out", out], "alpha channel"),
        (["score", folder, "--prompts", good_prompts, "--aspect", "style", "--out", out], "unknown aspect"),
        ([*with_prompts, "--aspect", "sharp=nosuch", "--out", out], "unknown scorer 'nosuch'"),
        ([*with_prompts, "--aspect", "sharp=analytic:fuzz", "--out", out], "analytic:fuzz"),
        (["score", folder, "--prompts", good_prompts, *ASPECTS, "--out", existing], "already exists"),
        (["score", folder, "--prompts", good_prompts, *ASPECTS, "--out", tmp_path / "x.csv"], ".jsonl or .json"),
        (["score", folder, "--prompts", good_prompts, *ASPECTS, "--chunk-size", "0", "--out", out], "chunk-size"),
        (["score", folder, "--prompts", bad_seed, *ASPECTS, "--out", out], "seeds"),
        ([*with_prompts, *ASPECTS, "--models-dir", tmp_path / "none", "--out", out], "models-dir"),
    ]
    assert_score_refuses(capsys, cases, tmp_path)
    assert existing.read_text() == "keep me"


def assert_score_refuses(capsys, cases, tmp_path) -> None:
    """Each (argv, fragment): `versat2i score` exits 2 with one error line containing fragment, and
    writes nothing under tmp_path."""
    before = listing(tmp_path)
    for argv, fragment in cases:
        code, stdout, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("versat2i score: error:") and fragment in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and stdout == ""
        assert listing(tmp_path) == before, argv  # nothing written


def test_build_dataset_bad_inputs(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["fox"] * 3 + ["car"] * 3))
    scores = tmp_path / "scores.jsonl"
    assert run(capsys, "score", folder, "--prompts", prompts, *ASPECTS, "--out", scores, "--quiet")[0] == 0
    out_root = tmp_path / "ds"
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "img1.png").write_bytes((folder / "img1.png").read_bytes())
    base = ["build-dataset", scores, "--images", folder, "--out", out_root]
    cases = [
        ([*base, "--name", "../escape"], "'..' is not allowed"),
        ([*base, "--name", "/abs"], "absolute"),
        ([*base, "--name", "r", "--threshold", "p200"], "between 0 and 100"),
        ([*base, "--name", "r", "--threshold", "sharp=high"], "give 'none'"),
        ([*base, "--name", "r", "--threshold", "style=1"], "not being built"),
        ([*base, "--name", "r", "--repeats", "three"], "not a whole number"),
        ([*base, "--name", "r", "--repeats", "0"], ">= 1"),
        ([*base, "--name", "r", "--aspects", "style"], "not scored"),
        ([*base, "--name", "r", "--threshold", "1e9"], "no image passed"),
        (["build-dataset", tmp_path / "nope.jsonl", "--images", folder, "--out", out_root, "--name", "r"], "not found"),
        (["build-dataset", scores, "--images", moved, "--out", out_root, "--name", "r"], "not found in --images"),
    ]
    before = listing(tmp_path)
    for argv, fragment in cases:
        code, stdout, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("versat2i build-dataset: error:") and fragment in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
        assert listing(tmp_path) == before, argv

    assert run(capsys, *base, "--name", "r")[0] == 0
    first = (out_root / "r" / MANIFEST_NAME).read_text()
    code, _out, err = run(capsys, *base, "--name", "r", "--threshold", "p90")
    assert code == 2 and "already exists" in err
    assert (out_root / "r" / MANIFEST_NAME).read_text() == first
    assert run(capsys, *base, "--name", "r", "--threshold", "p90", "--overwrite")[0] == 0
    assert (out_root / "r" / MANIFEST_NAME).read_text() != first
    assert sorted(p.name for p in out_root.iterdir()) == ["r"]


def test_unreadable_image_fails_before_any_scorer_loads(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(texture(0, 0)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "p.txt").write_text("x\ny\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a scorer was built before the inputs were checked")

    monkeypatch.setattr("versat2i.rewards.registry.get_scorer", no_loading)
    code, _out, err = run(capsys, "score", folder, "--prompts", tmp_path / "p.txt", "--aspect", "s=analytic:contrast")
    assert code == 2 and "b.png" in err and "can't be read as an image" in err


def test_help_lists_defaults_without_importing_torch_at_parser_build(capsys):
    import subprocess
    import sys

    probe = ("import sys; from versat2i.cli import build_parser; build_parser(); "
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # `versat2i --help` stays fast
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    from versat2i.rewards.registry import DEFAULT_SCORERS

    flat = " ".join(text.split())
    assert all(f"{aspect}={name}" in flat for aspect, name in DEFAULT_SCORERS.items())
    assert ".webp" in flat and "@" not in flat


def test_geometry_scores_keep_their_unjudged_mark_through_the_scores_file(tmp_path, capsys):
    """`score` records which images the geometry scorer judged in the scores file, and
    `build-dataset` with its defaults then keeps no image without a person for geometry."""
    pytest.importorskip("mediapipe", reason="mediapipe (extra [geometry]) is not installed")
    from tiny_models.figures import draw_figure, no_person_images

    folder = tmp_path / "candidates"
    folder.mkdir()
    nobody = no_person_images()
    for name, image in {"1": draw_figure()[0], "2": nobody[0], "3": nobody[1], "4": nobody[3]}.items():
        Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(folder / f"{name}.png")
    (tmp_path / "p.txt").write_text("a person\na person\na landscape\na landscape\n")
    scores = tmp_path / "scores.jsonl"
    code, _out, err = run(capsys, "score", folder, "--prompts", tmp_path / "p.txt", "--aspect", "geometry",
                          "--aspect", "sharp=analytic:sharpness", "--out", scores, "--quiet")
    assert code == 0, err
    table = ScoreTable.load(scores)
    assert table.scorers["geometry"]["id"] == "mediapipe-anatomy"
    assert table.scores["geometry"][0] > 0 and table.scores["geometry"][1:] == [0.0, 0.0, 0.0]
    assert table.judged["geometry"] == [True, False, False, False]
    assert table.judged["sharp"] == [True] * 4
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [row["judged"]["geometry"] for row in rows] == [True, False, False, False]

    code, out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", tmp_path / "ds",
                         "--name", "run")
    assert code == 0, err
    assert [e.source for e in read_manifest(tmp_path / "ds" / "run", aspect="geometry")] == ["1.png"]
    assert len(read_manifest(tmp_path / "ds" / "run", aspect="sharp")) == 2  # every prompt for the other aspect
    assert "geometry: kept 1 of 1 prompts" in out


# -- explicit weight files -----------------------------------------------------------------------------

def test_scorer_options_name_explicit_weight_files(tmp_path, capsys, monkeypatch):
    """--scorer-option gives a scorer its weight files directly (no --models-dir): relative paths
    are read from the current folder. The scores and the recorded hash are those of these files."""
    from tiny_models.clip import TINY_CLIP, build_open_clip, write_laion_mlp, write_open_clip_weights

    weights = tmp_path / "my weights"  # not laid out like a model folder
    paths = {"clip": write_open_clip_weights(weights / "clip.safetensors", build_open_clip(TINY_CLIP)),
             "aesthetic": write_laion_mlp(weights / "mlp.pth")}
    folder = tmp_path / "imgs"
    folder.mkdir()
    arrays = [texture(seed, blur) for seed, blur in ((1, 0), (2, 2), (3, 1))]
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.jsonl"
    clip_relative = paths["clip"].relative_to(tmp_path)
    code, _out, err = run(capsys, "score", folder, "--prompts", "p.txt", "--aspect", "aesthetics", "--quiet",
                          "--scorer-option", f"aesthetics.clip_architecture={TINY_CLIP}",
                          "--scorer-option", f"aesthetics.clip_weights={clip_relative}",
                          "--scorer-option", f"aesthetics.aesthetic_weights={paths['aesthetic']}", "--out", out)
    assert code == 0, err
    table = ScoreTable.load(out)
    reference = get_scorer("laion-aesthetic-v2", clip_architecture=TINY_CLIP, clip_weights=str(paths["clip"]),
                           aesthetic_weights=str(paths["aesthetic"]))
    expected = reference.score(torch.stack([torch.from_numpy(a).float() / 255 for a in arrays]), ["a", "b", "c"])
    assert table.scores["aesthetics"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert len(set(table.scores["aesthetics"])) == 3
    assert table.scorers["aesthetics"]["weights_hash"] == reference.weights_hash


def test_scorer_option_errors_name_the_missing_file_and_write_nothing(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["p"] * 6))
    out = tmp_path / "out.jsonl"
    missing = tmp_path / "weights" / "sac+logos+ava1-l14-linearMSE.pth"
    base = ["score", folder, "--prompts", prompts, "--aspect", "aesthetics", "--aspect", "sharp=analytic:sharpness",
            "--out", out]
    sharp_only = ["score", folder, "--prompts", prompts, "--aspect", "sharp=analytic:sharpness", "--out", out]
    cases = [
        ([*base, "--scorer-option", f"aesthetics.aesthetic_weights={missing}"], str(missing)),
        ([*base, "--scorer-option", "aesthetics.aesthetic_weights=nope/mlp.pth"], str(Path.cwd() / "nope" / "mlp.pth")),
        ([*base, "--scorer-option", "aesthetic_weights=x.pth"], "ASPECT.KEY=VALUE"),
        ([*base, "--scorer-option", "style.weights=x.pth"], "aspect 'style' is not scored"),
        ([*base, "--scorer-option", "sharp.aspect=a", "--scorer-option", "sharp.aspect=b"], "given twice"),
        ([*sharp_only, "--scorer-option", "sharp.radius=3"], "unknown option(s) radius"),
    ]
    assert_score_refuses(capsys, cases, tmp_path)


def test_build_dataset_refuses_an_image_file_replaced_after_scoring(folder, tmp_path, capsys):
    """The scores file records each image's pixel hash; a file replaced since (same name, other
    pixels) would put its pixels under another image's scores: refused, nothing written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["fox"] * 3 + ["car"] * 3))
    scores = tmp_path / "scores.jsonl"
    assert run(capsys, "score", folder, "--prompts", prompts, *ASPECTS, "--out", scores, "--quiet")[0] == 0
    assert all(ScoreTable.load(scores).fingerprints)
    Image.fromarray(texture(99, 0)).save(folder / "img2.png")  # the sharpest 'fox' candidate, kept by 'sharp'
    out_root = tmp_path / "ds"
    code, _out, err = run(capsys, "build-dataset", scores, "--images", folder, "--out", out_root, "--name", "r")
    assert code == 2 and "img2.png" in err and "not the image that was scored" in err, err
    assert not out_root.exists() or listing(out_root) == []
