"""Bad inputs found by a sweep (issue 15), each through the ``versat2i`` command: one error line
naming the input (or file) and the fix, exit status 2, no traceback, nothing written, nothing
started. Offline; no model runs (the configs point at folders that only need to exist).
"""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models.lora_training import make_kohya_dataset, tiny_lora_config

from versat2i.cli import main
from versat2i.rewards.score_table import ScoreTable
from versat2i.trainer.train_gate import GateTrainConfig
from versat2i.training_set.layout import caption_for
from versat2i.training_set.manifest import read_manifest

TOO_LONG = "n" * 300  # over the 255-byte limit of every common filesystem
ANALYTIC = ["--aspect", "sharp=analytic:sharpness"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str, command: str) -> str:
    assert err.startswith(f"versat2i {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def scored(tmp_path, capsys) -> tuple[Path, Path]:
    """Four images of two prompts and their scores (``versat2i score``)."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        pixels = torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(index))
        Image.fromarray((pixels.numpy() * 255).astype("uint8")).save(images / f"img{index}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na fox\na car\x00 in\x1b[31m red\x7f\na car\x00 in\x1b[31m red\x7f\n", encoding="utf-8")
    scores = tmp_path / "scores.jsonl"
    assert run(capsys, "score", images, "--prompts", prompts, *ANALYTIC, "--out", scores)[0] == 0
    return images, scores


# -- names too long for the filesystem: refused before any work ----------------------------------------

def test_train_lora_with_an_output_name_over_255_bytes(tmp_path, capsys):
    dataset = make_kohya_dataset(tmp_path / "ds", images_per_aspect=1)
    path = tiny_lora_config(tmp_path, dataset, dataset, output_name=TOO_LONG).save(tmp_path / "c.toml")
    code, err = run(capsys, "train-lora", "--config", path)
    assert code == 2
    assert "output_name: 'nnnn" in one_error_line(err.replace("\n  - ", " | "), "train-lora") and "shorten it" in err
    assert files_under(tmp_path / "loras") == [] and not (tmp_path / "run").exists()


def test_train_gate_with_an_output_name_over_255_bytes(tmp_path, capsys):
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("a", "b"):
        save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(loras / f"{name}.safetensors"),
                  metadata={"versat2i_aspect": name})
    config = GateTrainConfig(base_model=str(tmp_path), dataset_dir=str(tmp_path), loras=(str(loras / "a.safetensors"),
                             str(loras / "b.safetensors")), output_dir=str(loras), output_name=TOO_LONG,
                             work_dir=str(tmp_path / "run"))
    code, err = run(capsys, "train-gate", "--config", config.save(tmp_path / "g.toml"))
    assert code == 2
    assert "output_name: 'nnnn" in one_error_line(err.replace("\n  - ", " | "), "train-gate")
    assert files_under(loras) == ["a.safetensors", "b.safetensors"] and not (tmp_path / "run").exists()


def test_build_dataset_with_a_name_over_255_bytes(scored, tmp_path, capsys):
    images, scores = scored
    code, err = run(capsys, "build-dataset", scores, "--images", images, "--out", tmp_path / "sets", "--name", TOO_LONG)
    assert code == 2 and "--name: 'nnnn" in one_error_line(err, "build-dataset") and "shorten it" in err
    assert not (tmp_path / "sets").exists()


def test_score_with_an_out_name_over_255_bytes(scored, tmp_path, capsys):
    images, _ = scored
    out = tmp_path / "new" / f"{TOO_LONG}.jsonl"
    code, err = run(capsys, "score", images, "--prompts", tmp_path / "prompts.txt", *ANALYTIC, "--out", out)
    assert code == 2 and "--out: 'nnnn" in one_error_line(err, "score")
    assert not (tmp_path / "new").exists()


def test_build_dataset_out_pointing_at_a_file(scored, tmp_path, capsys):
    images, scores = scored
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, err = run(capsys, "build-dataset", scores, "--images", images, "--out", a_file, "--name", "run1")
    assert code == 2
    assert one_error_line(err, "build-dataset").startswith(f"versat2i build-dataset: error: --out {str(a_file)!r}: is "
                                                           "a file, not a folder")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("name", ["CON", "nul.txt", "Com1"])
def test_build_dataset_refuses_windows_device_names(scored, tmp_path, capsys, name):
    images, scores = scored
    code, err = run(capsys, "build-dataset", scores, "--images", images, "--out", tmp_path / "sets", "--name", name)
    assert code == 2 and "reserved device name on Windows" in one_error_line(err, "build-dataset")
    assert not (tmp_path / "sets").exists()


# -- what the system refuses, wherever it happens: one line naming the file ---------------------------------

def test_a_full_disk_while_writing_the_scores_is_one_line(scored, tmp_path, capsys, monkeypatch):
    images, _ = scored

    def full_disk(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ScoreTable, "save", full_disk)
    out = tmp_path / "more.jsonl"
    code, err = run(capsys, "score", images, "--prompts", tmp_path / "prompts.txt", *ANALYTIC, "--out", out)
    assert code == 2
    assert one_error_line(err, "score") == (f"versat2i score: error: {str(out)!r}: no space left on the disk; free "
                                            "space on it, or choose a folder on another disk\n")


# -- damaged MoL and LoRA files: one line naming the file ----------------------------------------------------

def damaged_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.mol.safetensors"
    save_file({"gate.bias": torch.zeros(2, 2)}, str(good), metadata={"versat2i_format": "mixture-of-lora"})
    files = {"truncated": good.read_bytes()[: len(good.read_bytes()) // 2], "empty": b"",
             "pickled": pickle.dumps({"gate.bias": torch.zeros(2)})}
    paths = {}
    for kind, data in files.items():
        paths[kind] = folder / f"{kind}.mol.safetensors"
        paths[kind].write_bytes(data)
    return paths


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickled"])
def test_mix_with_a_damaged_mol_file(tmp_path, capsys, kind):
    mol = damaged_files(tmp_path / "loras")[kind]
    code, err = run(capsys, "mix", "--base-model", tmp_path, "--mol", mol, "--prompt", "a cat", "--out", tmp_path / "o")
    assert code == 2
    line = one_error_line(err, "mix")
    assert f"MoL file {str(mol)!r}: cannot be read" in line and "train the gate again" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["truncated", "empty", "pickled"])
def test_a_damaged_lora_named_by_a_gate_config_is_one_problem_naming_it(tmp_path, kind):
    lora = damaged_files(tmp_path / "loras")[kind]
    good = tmp_path / "loras" / "ok.safetensors"
    save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(good))
    config = GateTrainConfig(base_model=str(tmp_path), dataset_dir=str(tmp_path), loras=(str(good), str(lora)),
                             output_dir=str(tmp_path / "loras"), output_name="mix", work_dir=str(tmp_path / "run"))
    problems = [p for p in config.problems() if p.startswith("loras")]
    assert len(problems) == 1 and f"LoRA file {str(lora)!r}: cannot be read" in problems[0], problems


# -- two LoRAs of one aspect: refused before the gate trains ------------------------------------------------

def test_a_gate_config_with_two_loras_of_one_aspect_is_refused_naming_them(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("first", "second", "third"):
        save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(loras / f"{name}.safetensors"),
                  metadata={"versat2i_aspect": "geometry" if name != "third" else "lowlevel"})
    paths = tuple(str(loras / f"{name}.safetensors") for name in ("first", "second", "third"))
    config = GateTrainConfig(base_model=str(tmp_path), dataset_dir=str(tmp_path), loras=paths, output_dir=str(loras),
                             output_name="mix", work_dir=str(tmp_path / "run"))
    assert config.problems() == [
        "loras: 'first.safetensors', 'second.safetensors' are all LoRAs of aspect 'geometry' (their versat2i_aspect "
        "metadata, else the file name); a mixture needs one LoRA per aspect: give LoRAs of different aspects, or "
        "name each one with `aspects` (one name per LoRA)"]
    assert config.replace(aspects=("g1", "g2", "low")).problems() == []


# -- prompts with control characters: clean captions, the manifest keeps the prompt ---------------------------

def test_captions_have_no_control_characters_and_the_manifest_keeps_the_prompt(scored, tmp_path, capsys):
    images, scores = scored
    code, err = run(capsys, "build-dataset", scores, "--images", images, "--out", tmp_path / "sets", "--name", "run1")
    assert code == 0, err
    entries = read_manifest(tmp_path / "sets" / "run1", aspect="sharp")
    car = next(e for e in entries if e.prompt.startswith("a car"))
    assert car.prompt == "a car\x00 in\x1b[31m red\x7f"
    caption_file = (tmp_path / "sets" / "run1" / car.file).with_suffix(".txt")
    assert caption_file.read_text(encoding="utf-8") == car.caption == "a car in [31m red"
    manifest = (tmp_path / "sets" / "run1" / "manifest.jsonl").read_text(encoding="utf-8")
    assert "\\u0000" in manifest and json.loads(manifest.splitlines()[0])  # JSON escapes it


@pytest.mark.parametrize("prompt, caption", [
    ("a\x00b", "a b"), ("tab\tand\nnew line", "tab and new line"), ("bell\x07 esc\x1b del\x7f", "bell esc del"),
    ("next line\x85c1 \x9b", "next line c1"), ("  ünïcode — ok  ", "ünïcode — ok"),
])
def test_caption_for(prompt, caption):
    assert caption_for(prompt) == caption
