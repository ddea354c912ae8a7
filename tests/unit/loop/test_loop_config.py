"""LoopConfig (loop/config.py): TOML round trip, and every bad config refused before any work.

Offline, no model is loaded: the "checkpoint" is an empty diffusers-looking folder (validation only
checks that it exists) and the scorers are weight-free analytic ones. Each bad config goes through
``run_loop`` and the ``versat2i loop`` command, and must fail with a message naming the setting,
without creating the output folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from versat2i.cli import main as cli_main
from versat2i.loop.config import (
    DatasetSection,
    EvaluationSection,
    GenerationConfig,
    LoopConfig,
    ModelSection,
    PromptsSection,
)
from versat2i.loop.generate import GenerationSettings
from versat2i.loop.run import run_loop


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def good_config(tmp_path: Path, model_dir: Path, **changes) -> LoopConfig:
    config = LoopConfig(
        name="test", output_dir=str(tmp_path / "run"), device="cpu",
        model=ModelSection(base_model=str(model_dir)),
        prompts=PromptsSection(train=("a red circle", "a blue square"), held_out=("a green triangle",),
                               candidates_per_prompt=4),
        generation=GenerationConfig(steps=2, guidance_scale=1.0),
        aspects={"lowlevel": "analytic:sharpness", "aesthetics": "analytic:contrast"},
        thresholds={"lowlevel": "p25"},
        lora={"rank": 4, "max_train_steps": 10, "resolution": 64},
        gate={"max_train_steps": 5},
        evaluation=EvaluationSection(seeds_per_prompt=4),
    )
    return dataclasses.replace(config, **changes)


def test_a_good_config_validates_and_round_trips_through_toml(tmp_path, model_dir):
    config = good_config(tmp_path, model_dir)
    assert config.problems() == []
    assert isinstance(config.generation, GenerationSettings)  # what generate_candidates takes
    text = config.to_toml()
    again = LoopConfig.from_toml(text)
    assert again == config
    assert again.to_toml() == text
    path = config.save(tmp_path / "loop.toml")
    assert LoopConfig.load(path) == config  # absolute paths stay as they are


def test_relative_paths_are_relative_to_the_config_file(tmp_path, model_dir):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "prompts.txt").write_text("# loop prompts\na red circle\n\na blue square\n")
    (folder / "loop.toml").write_text(f"""
name = "relative"
output_dir = "runs/one"
[model]
base_model = "../{model_dir.name}"
[prompts]
train_file = "prompts.txt"
held_out = ["a green triangle"]
candidates_per_prompt = 2
[aspects]
lowlevel = "analytic:sharpness"
""")
    config = LoopConfig.load(folder / "loop.toml")
    assert config.output_dir == str(folder / "runs" / "one")
    assert config.model.base_model == str(model_dir)
    assert config.train_prompts() == ["a red circle", "a blue square"]
    assert config.problems() == []


def test_aspects_as_a_list_get_their_default_scorers(tmp_path, model_dir):
    config = LoopConfig.from_toml('aspects = ["aesthetics", "lowlevel"]\n')
    assert config.resolved_aspects() == {"aesthetics": "laion-aesthetic-v2", "lowlevel": "clip-iqa"}


def test_default_variants_depend_on_the_number_of_aspects(tmp_path, model_dir):
    # one held-out prompt: nothing to set aside for choosing the uniform weight, so no "uniform"
    two = good_config(tmp_path, model_dir)
    assert two.validation_prompts() == []
    assert two.evaluation_variant_kinds() == ("base", "lora", "merge", "sum", "ties", "dare_linear", "dare_ties",
                                              "gated") and two.needs_gate
    three_held_out = good_config(tmp_path, model_dir, prompts=PromptsSection(
        train=("a red circle",), held_out=("a green triangle", "a blue square", "a red square"),
        candidates_per_prompt=4))
    assert len(three_held_out.validation_prompts()) == 1  # round(0.25 * 3) = 1 of 3
    assert three_held_out.evaluation_variant_kinds() == ("base", "lora", "merge", "sum", "uniform", "ties",
                                                         "dare_linear", "dare_ties", "gated")
    assert three_held_out.problems() == []
    one = good_config(tmp_path, model_dir, aspects={"lowlevel": "analytic:sharpness"}, thresholds={})
    assert one.evaluation_variant_kinds() == ("base", "lora") and not one.needs_gate
    assert one.problems() == []
    no_gate = good_config(tmp_path, model_dir, evaluation=EvaluationSection(variants=("base", "lora", "merge")))
    assert not no_gate.needs_gate
    assert dataclasses.replace(no_gate, rounds=2).needs_gate  # round 2 samples with round 1's mixture


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ValueError) as err:
        LoopConfig.from_toml('nmae = "x"\n[lora]\nrank = 4\n[prompts]\ncandidates_per_promt = 4\n')
    message = str(err.value)
    assert "'nmae' (did you mean 'name'?)" in message
    assert "'candidates_per_promt' (did you mean 'candidates_per_prompt'?)" in message


BAD_CONFIGS = {
    "unknown aspect": ({"aspects": {"sparkle": ""}}, "unknown aspect 'sparkle'"),
    "unknown scorer": ({"aspects": {"aesthetics": "laion-aesthetic-v9"}}, "unknown scorer (did you mean"),
    "unknown scorer variant": ({"aspects": {"lowlevel": "analytic:crispness"}}, "unknown scorer variant"),
    "no aspect": ({"aspects": {}}, "[aspects]: no aspect"),
    "missing checkpoint": ({"model": ModelSection(base_model="/nonexistent/model.safetensors")},
                           "base_model='/nonexistent/model.safetensors': no such file or folder"),
    "zero prompts": ({"prompts": PromptsSection(train=(), held_out=("a green triangle",))}, "train: zero prompts"),
    "K < 2": ({"prompts": PromptsSection(train=("a red circle",), held_out=("a cat",), candidates_per_prompt=1)},
              "candidates_per_prompt=1: must be >= 2"),
    "bad threshold": ({"thresholds": {"lowlevel": "p150"}}, "[thresholds] lowlevel: percentile threshold 150.0"),
    "threshold of an unknown aspect": ({"thresholds": {"alignment": "none"}},
                                       "[thresholds] 'alignment': unknown aspect"),
    "bad LoRA field": ({"lora": {"rank": 0}}, "[lora] rank=0: must be >= 1"),
    "misspelt LoRA field": ({"lora": {"rnak": 4}}, "[lora] unknown setting 'rnak' (did you mean 'rank'?)"),
    "LoRA field the loop sets": ({"lora": {"output_dir": "elsewhere"}}, "[lora] output_dir: set by the loop"),
    "bad gate field": ({"gate": {"balance_weight": -1.0}}, "[gate] balance_weight=-1.0: must be >= 0"),
    "merge of one aspect": ({"aspects": {"lowlevel": "analytic:sharpness"}, "thresholds": {},
                                 "evaluation": EvaluationSection(variants=("base", "lora", "merge"))},
                            "variants ['merge']: a merge or mixture needs >= 2 aspects"),
    "one evaluation seed": ({"evaluation": EvaluationSection(seeds_per_prompt=1)}, "seeds_per_prompt=1: must be >= 2"),
    "no held-out prompt": ({"prompts": PromptsSection(train=("a red circle",), candidates_per_prompt=2)},
                           "no held-out prompt"),
    "held-out prompt trained on": ({"prompts": PromptsSection(train=("a red circle",), held_out=("a red circle",))},
                                   "also training prompts"),
    "replay without a folder": ({"dataset": DatasetSection(replay_fraction=0.5)},
                                "replay_fraction > 0 needs replay_dir"),
    "evaluation seeds used by candidates": (
        {"evaluation": EvaluationSection(seed=3, include_train_prompts=True)}, "overlap the candidate seeds"),
    # candidates use 10..17; the 3 evaluated prompts x 4 seeds use 5..16 (the first prompt's 5..8 alone would not)
    "a later prompt's evaluation seeds used by candidates": (
        {"prompts": PromptsSection(train=("a red circle", "a blue square"), held_out=("a green triangle",),
                                   candidates_per_prompt=4, seed=10),
         "evaluation": EvaluationSection(seed=5, seeds_per_prompt=4, include_train_prompts=True)},
        "evaluation seeds 5..16 overlap the candidate seeds 10..17"),
    "bad generation setting": ({"generation": GenerationConfig(steps=0)}, "[generation] generation settings: steps=0"),
    "bad variant": ({"evaluation": EvaluationSection(variants=("base", "lora", "best"))}, "variants ['best']"),
    "rounds": ({"rounds": 0}, "rounds=0: must be a whole number >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_is_one_clear_error_before_any_work(case, tmp_path, model_dir):
    changes, expected = BAD_CONFIGS[case]
    config = good_config(tmp_path, model_dir, **changes)
    with pytest.raises(ValueError) as err:
        run_loop(config, show_progress=False)
    assert expected in str(err.value)
    assert str(err.value).startswith("invalid loop config:")
    assert not (tmp_path / "run").exists()


def test_every_evaluation_image_has_its_own_seed(tmp_path, model_dir):
    """Evaluation prompt p gets seeds seed + p*S ... : no two (prompt, seed) pairs share their noise,
    which the pair bootstrap and the seed-to-seed spread assume (loop/evaluate.py)."""
    config = good_config(tmp_path, model_dir, evaluation=EvaluationSection(seed=100, seeds_per_prompt=3,
                                                                           include_train_prompts=True))
    prompts = config.evaluation_prompts()
    assert len(prompts) == 3
    assert config.evaluation_seeds() == list(range(100, 109))  # prompt-major: prompt 1 has 103, 104, 105


def test_every_problem_is_listed_at_once(tmp_path, model_dir):
    config = good_config(tmp_path, model_dir, aspects={"sparkle": ""}, model=ModelSection(base_model="/nope"),
                         prompts=PromptsSection(train=("a",), held_out=("b",), candidates_per_prompt=1))
    problems = config.problems()
    assert any("unknown aspect 'sparkle'" in p for p in problems)
    assert any("base_model='/nope'" in p for p in problems)
    assert any("candidates_per_prompt=1" in p for p in problems)


def test_empty_prompt_file_and_missing_prompt_file(tmp_path, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    config = good_config(tmp_path, model_dir, prompts=PromptsSection(train_file=str(empty), held_out=("a cat",)))
    assert any("has no prompt" in p for p in config.problems())
    config = good_config(tmp_path, model_dir, prompts=PromptsSection(train_file=str(tmp_path / "missing.txt"),
                                                                     held_out=("a cat",)))
    assert any("train_file=" in p and "no such file" in p for p in config.problems())


def test_replay_folder_needs_captions_and_enough_images(tmp_path, model_dir):
    replay = tmp_path / "real"
    replay.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(replay / "one.png")
    config = good_config(tmp_path, model_dir, dataset=DatasetSection(replay_dir=str(replay), replay_fraction=1.0))
    assert any("without a caption" in p for p in config.problems())
    (replay / "one.txt").write_text("a red circle")
    assert any("1 captioned image(s); replay_fraction 1 needs up to 2" in p for p in config.problems())
    Image.new("RGB", (8, 8)).save(replay / "two.png")
    (replay / "two.txt").write_text("a blue square")
    assert config.problems() == []


def test_missing_scorer_weights_are_reported_before_any_work(tmp_path, model_dir):
    """A learned scorer without its weight file: the loop names the file and creates nothing."""
    config = good_config(tmp_path, model_dir, aspects={"aesthetics": "laion-aesthetic-v2", "lowlevel": ""},
                         thresholds={})
    assert config.problems() == []
    with pytest.raises(ValueError) as err:
        run_loop(config, show_progress=False)
    message = str(err.value)
    assert "the scorers can't be loaded" in message and "aesthetics = 'laion-aesthetic-v2'" in message
    assert "lowlevel = 'clip-iqa'" in message
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_loop_folder_is_refused(tmp_path, model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="holds no loop.toml"):
        run_loop(good_config(tmp_path, model_dir), show_progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["holiday.jpg"]


def test_the_command_prints_one_error_line_and_creates_nothing(tmp_path, model_dir, capsys):
    config = good_config(tmp_path, model_dir, prompts=PromptsSection(train=(), held_out=("a cat",)))
    path = config.save(tmp_path / "bad.toml")
    assert cli_main(["loop", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("versat2i loop: error: invalid loop config:") and "train: zero prompts" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_command_checks_and_prints_an_example(tmp_path, model_dir, capsys):
    path = good_config(tmp_path, model_dir).save(tmp_path / "good.toml")
    assert cli_main(["loop", "--config", str(path), "--check"]) == 0
    assert "valid" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert cli_main(["loop", "--print-config"]) == 0
    example = LoopConfig.from_toml(capsys.readouterr().out)
    assert example.aspects and example.prompts.train_file == "prompts.txt"


# -- versat2i loop --print-config -------------------------------------------------------------------

def printed_settings(text: str) -> dict[str, list[tuple[str, str]]]:
    """{section ("" = top level): [(key, the comment line above it)]} of a printed config. Its
    layout: blocks separated by blank lines (the header, the top-level settings, then per section
    its comment, ``[section]`` and its settings), every setting one comment line and one setting
    line (``# key = value`` when shown commented out: unset, or a gate setting taken from [lora])."""
    import re

    blocks = text.rstrip("\n").split("\n\n")
    assert all(line.startswith("# ") for line in blocks[0].splitlines()), "the header is comments"
    found = {}
    for block in blocks[1:]:
        if len(block.splitlines()) == 1:  # a table of tables with none set: its note alone
            note = block.splitlines()[0]
            assert note.startswith("# ") and note.endswith(": none set"), block
            continue
        lines = []
        for line in block.splitlines():  # a long list continues on lines of its own: one setting
            if line.startswith(("    ", "]")) and lines:
                lines[-1] += "\n" + line
            else:
                lines.append(line)
        section = ""
        if len(lines) > 1 and re.fullmatch(r"\[\w+(\.\w+)?\]", lines[1]):
            section, lines = lines[1][1:-1], lines[2:]
        assert len(lines) % 2 == 0, f"[{section}]: not one comment line per setting:\n{block}"
        pairs = []
        for comment, setting in zip(lines[0::2], lines[1::2]):
            match = re.fullmatch(r"(?:# )?(\w+) = .+", setting, flags=re.S)
            assert match, f"[{section}]: {setting!r} is not a setting"
            pairs.append((match.group(1), comment))
        found[section] = pairs
    return found


def accepted_settings(config: LoopConfig) -> dict[str, set[str]]:
    """Every key ``LoopConfig.from_dict`` accepts, per section (the tables keyed by aspect: this
    config's aspects)."""
    from versat2i.loop.config import (
        LOOP_OWNED_TRAINING_FIELDS,
        MAPPING_SECTIONS,
        NESTED_SECTIONS,
        SECTIONS,
        TOP_LEVEL,
    )
    from versat2i.trainer.config import LoraTrainConfig
    from versat2i.trainer.train_gate import GateTrainConfig

    def trainer_fields(cls):
        return {f.name for f in dataclasses.fields(cls)} - LOOP_OWNED_TRAINING_FIELDS

    accepted = {"": set(TOP_LEVEL), **{name: {f.name for f in dataclasses.fields(cls)} for name,
                                       cls in SECTIONS.items()},
                "aspects": set(config.aspects), "thresholds": set(config.aspects),
                "lora": trainer_fields(LoraTrainConfig), "gate": trainer_fields(GateTrainConfig)}
    # the tables of tables: the ones this config sets, each with the settings it overrides
    accepted.update({f"{section}.{name}": set(overrides) for section in NESTED_SECTIONS
                     for name, overrides in getattr(config, section).items()})
    assert {s for s in accepted if "." not in s} == {"", *SECTIONS, *MAPPING_SECTIONS} - set(NESTED_SECTIONS)
    return accepted


@pytest.mark.parametrize("which", ["example", "demo", "dit"])
def test_print_config_names_every_setting_under_a_one_line_comment(which, capsys):
    assert cli_main(["loop", "--print-config", which]) == 0
    text = capsys.readouterr().out
    config = LoopConfig.from_toml(text)
    printed = printed_settings(text)
    accepted = accepted_settings(config)
    assert set(printed) == set(accepted), "every section is printed"
    for section, keys in accepted.items():
        names = [key for key, _comment in printed[section]]
        assert sorted(names) == sorted(keys), f"[{section}] printed {sorted(names)}, accepted {sorted(keys)}"
        for key, comment in printed[section]:
            assert comment.startswith("# ") and len(comment) > 8, (section, key, comment)
    for section in accepted:  # and every section says what it is for
        if section:
            above = text.split(f"\n[{section}]\n")[0].splitlines()[-1]
            assert above.startswith("# ") and len(above) > 20, (section, above)


def test_the_printed_example_reads_back_to_the_same_settings(capsys):
    from versat2i.loop.cli import example_config

    assert cli_main(["loop", "--print-config"]) == 0
    printed = LoopConfig.from_toml(capsys.readouterr().out)
    example = example_config()
    assert_same_effective_settings(printed, example)
    assert printed.generation.width == printed.generation.height == 512
    assert printed.validate(check_paths=False)


def test_the_printed_dit_example_reads_back_and_hands_its_files_to_the_trainers(tmp_path, capsys):
    from versat2i.loop.cli import example_dit_config

    assert cli_main(["loop", "--print-config", "dit"]) == 0
    file = tmp_path / "klein.toml"
    file.write_text(capsys.readouterr().out, encoding="utf-8")
    printed = LoopConfig.load(file)  # relative paths resolved against the file's folder
    example = example_dit_config()
    assert printed.model.text_encoders == (str(tmp_path / "models/text_encoders/qwen_3_4b.safetensors"),)
    assert printed.model.vae == str(tmp_path / "models/vae/flux2-vae.safetensors")
    relative = printed.replace(model=example.model, output_dir=example.output_dir, scoring=example.scoring,
                               prompts=example.prompts)
    assert_same_effective_settings(relative, example)
    assert printed.validate(check_paths=False)
    problems = printed.problems()  # the files do not exist here: each is named
    assert any(p.startswith("[model] text_encoders[0]=") for p in problems)
    assert any(p.startswith("[model] vae=") for p in problems)
    paths = {"dataset_dir": "d", "output_dir": "o", "work_dir": "w"}
    lora = printed.lora_config(aspect="aesthetics", **paths)
    gate = printed.gate_config(loras=["a.safetensors", "b.safetensors"], aspects=["a", "b"], **paths)
    for trainer_config in (lora, gate):
        assert trainer_config.text_encoders == printed.model.text_encoders and trainer_config.vae == printed.model.vae


def assert_same_effective_settings(printed: LoopConfig, original: LoopConfig) -> None:
    """Equal in everything the loop does with them ([lora] and [gate] print every setting, so they
    are compared as the training configs the loop builds from them)."""
    def without_training(config):
        data = {k: v for k, v in config.to_dict().items() if k not in ("lora", "gate")}
        data["thresholds"] = {a: config.thresholds.get(a, "none") for a in config.aspects}  # unset = "none"
        return data

    assert without_training(printed) == without_training(original)
    paths = {"dataset_dir": "d", "output_dir": "o", "work_dir": "w"}
    aspects = list(original.aspects)
    assert printed.lora_config(aspect=aspects[0], **paths) == original.lora_config(aspect=aspects[0], **paths)
    loras = [f"{a}.safetensors" for a in aspects]
    assert printed.gate_config(loras=loras, aspects=aspects, **paths) == original.gate_config(loras=loras,
                                                                                          aspects=aspects, **paths)


def test_the_printed_demo_config_is_the_demo_and_validates_once_its_replay_images_exist(tmp_path, capsys):
    from versat2i.loop.demo import DEFAULT_OUT, REPLAY_DIR, demo_config, write_replay_images

    assert cli_main(["loop", "--print-config", "demo"]) == 0
    file = tmp_path / "demo.toml"
    file.write_text(capsys.readouterr().out, encoding="utf-8")
    printed = LoopConfig.load(file)  # relative paths resolved against the file's folder
    demo = demo_config(tmp_path / DEFAULT_OUT)
    assert printed.output_dir == str(tmp_path / DEFAULT_OUT / "my-loop")  # beside the demo's own run
    assert_same_effective_settings(printed.replace(output_dir=demo.output_dir), demo)
    with pytest.raises(ValueError, match="replay_dir"):  # `versat2i demo` renders them first
        printed.validate()
    write_replay_images(tmp_path / DEFAULT_OUT / REPLAY_DIR, demo.train_prompts(), len(demo.train_prompts()))
    assert printed.validate()


def test_the_command_reports_every_problem_at_once_those_of_reading_included(tmp_path, model_dir, capsys):
    """Before, a setting that did not parse hid every other problem (issue 15)."""
    text = good_config(tmp_path, model_dir).to_toml()
    text = (text.replace("rounds = 1", 'rounds = "two"').replace("steps = 2", 'steps = "x"\nstepz = 3')
            .replace("candidates_per_prompt = 4", "candidates_per_prompt = 1")
            .replace("rank = 4", "rank = 0").replace("resolution = 64", "resolution = 100000"))
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli_main(["loop", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    for problem in ("rounds: expected a whole number, got 'two'", "[generation] steps: expected an integer, got 'x'",
                    "[generation] unknown setting 'stepz' (did you mean 'steps'?)",
                    "[prompts] candidates_per_prompt=1: must be >= 2", "[lora] rank=0: must be >= 1",
                    "[lora] resolution=100000: must be <= 4096",
                    "[gate] resolution=100000: must be <= 4096"):  # the gate trains at the LoRAs' resolution
        assert f"\n  - {problem}" in err, (problem, err)
    assert err.count("\n  - ") == 7 and "rounds=" not in err  # the stand-in for an unparsed setting is not judged
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_dir_that_cannot_be_created_names_the_setting(tmp_path, model_dir, capsys):
    path = good_config(tmp_path, model_dir, output_dir="/proc/versat2i-run").save(tmp_path / "proc.toml")
    assert cli_main(["loop", "--config", str(path)]) == 2
    assert capsys.readouterr().err == ("versat2i loop: error: output_dir '/proc/versat2i-run': cannot be created: no "
                                       "such file or folder (or it cannot be created there); check the path\n")


def test_an_output_dir_below_a_file_or_with_a_name_too_long_is_a_config_problem(tmp_path, model_dir):
    (tmp_path / "a_file").write_text("x")
    problems = good_config(tmp_path, model_dir, output_dir=str(tmp_path / "a_file" / "run")).problems()
    assert any(p.startswith("output_dir ") and "is a file, not a folder" in p for p in problems), problems
    problems = good_config(tmp_path, model_dir, output_dir=str(tmp_path / ("r" * 256))).problems()
    assert any(p.startswith("output_dir: 'rrrr") and "at most 255 bytes" in p for p in problems), problems


def test_merge_baseline_and_gate_variant_settings_are_checked(tmp_path, model_dir):
    config = good_config(
        tmp_path, model_dir,
        evaluation=EvaluationSection(seeds_per_prompt=4, variants=("base", "uniform", "ties"), validation_fraction=1.5,
                                     uniform_weights=(0.5, -1.0), merge_weight=0.0, merge_density=0.0),
        gate_variants={"bad name": {"gate_kind": "softmax_n"}, "free": {"gate_kind": "maxout", "timestep_knots": 1},
                       "mine": {"output_name": "x", "granularty": "layer"}})
    problems = "\n".join(config.problems())
    assert "validation_fraction=1.5: must be in [0, 1)" in problems
    assert "uniform_weights=[0.5, -1.0]" in problems
    assert "merge_weight=0.0" in problems and "merge_density=0.0" in problems
    assert "[gate_variants] 'bad name': a variant name uses" in problems
    assert "[gate_variants.free] gate_kind='maxout'" in problems
    assert "[gate_variants.free] timestep_knots=1" in problems
    assert "[gate_variants.mine] output_name: set by the loop" in problems
    assert "'granularty' (did you mean 'granularity'?)" in problems
    assert "add \"gated\" to [evaluation] variants" in problems
    # no validation prompt to choose the uniform weight on
    none_aside = good_config(tmp_path, model_dir, evaluation=EvaluationSection(
        seeds_per_prompt=4, variants=("base", "uniform"), validation_fraction=0.0))
    assert any("chooses its weight on validation prompts" in p for p in none_aside.problems())


def test_gate_variants_round_trip_and_build_their_own_gate_configs(tmp_path, model_dir):
    config = good_config(tmp_path, model_dir, gate_variants={"free": {"gate_kind": "sigmoid", "timestep_knots": 4},
                                                             "layer": {"granularity": "layer"}})
    assert config.problems() == []
    again = LoopConfig.from_toml(config.to_toml())
    assert again.gate_variants == config.gate_variants
    gate = again.gate_config(loras=["a.safetensors", "b.safetensors"], aspects=["a", "b"], dataset_dir="d",
                             output_dir="o", work_dir="w", variant="free")
    assert (gate.gate_kind, gate.timestep_knots, gate.max_train_steps) == ("sigmoid", 4, 5)  # [gate] underneath
    assert gate.output_path.name == "mixture-free.mol.safetensors"
    plain = again.gate_config(loras=["a.safetensors", "b.safetensors"], aspects=["a", "b"], dataset_dir="d",
                              output_dir="o", work_dir="w")
    assert plain.output_path.name == "mixture.mol.safetensors" and plain.timestep_knots == 0
