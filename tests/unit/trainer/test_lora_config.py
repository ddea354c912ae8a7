"""LoraTrainConfig (TOML/JSON round trip, validation messages, fingerprints) and the event schema."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import tomllib

from versat2i.config_file import dump_flat_toml
from versat2i.trainer.config import LoraTrainConfig
from versat2i.trainer.events import EventWriter, encode_event, make_event, parse_event_line, read_events


def config(tmp_path, **overrides) -> LoraTrainConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    settings = dict(base_model=str(tmp_path / "model"), dataset_dir=str(tmp_path / "data"),
                    output_dir=str(tmp_path / "loras"), output_name="versat2i/x", work_dir=str(tmp_path / "run"))
    settings.update(overrides)
    return LoraTrainConfig(**settings)


def test_toml_and_json_round_trip_every_field(tmp_path):
    original = config(tmp_path, aspect="aesthetics", rank=8, alpha=4.5, learning_rate=3e-5, snr_gamma=5.0,
                      output_name='versat2i/na"me ü', lr_scheduler="cosine", train_text_encoder=True)
    for suffix in (".toml", ".json"):
        path = original.save(tmp_path / f"cfg{suffix}")
        assert LoraTrainConfig.load(path) == original
    # the hand-written TOML is real TOML
    assert tomllib.loads(original.to_toml())["output_name"] == 'versat2i/na"me ü'


def test_toml_writer_handles_special_values():
    text = dump_flat_toml({"a": float("inf"), "b": 1e-05, "c": "tab\tdel\x7f", "d": [1, 2], "e": None, "f": True})
    parsed = tomllib.loads(text)
    assert parsed == {"a": math.inf, "b": 1e-05, "c": "tab\tdel\x7f", "d": [1, 2], "f": True}


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    data = {**config(tmp_path).to_dict(), "learning_rat": 1e-4}
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'\?\)"):
        LoraTrainConfig.from_dict(data)


def test_wrong_types_and_missing_required_are_named(tmp_path):
    data = config(tmp_path).to_dict()
    data["rank"] = "sixteen"
    data["cache_latents"] = 1
    del data["base_model"]
    with pytest.raises(ValueError) as err:
        LoraTrainConfig.from_dict(data)
    message = str(err.value)
    assert "rank: expected an integer" in message
    assert "cache_latents: expected true/false" in message
    assert "base_model: required setting is missing" in message


def test_ints_are_accepted_for_floats(tmp_path):
    text = config(tmp_path).to_toml().replace("alpha = 16.0", "alpha = 16")
    assert LoraTrainConfig.from_toml(text).alpha == 16.0


@pytest.mark.parametrize("overrides, expected", [
    ({"resolution": 500}, "resolution=500: must be a multiple of 8"),
    ({"resolution": 4}, "resolution=4: must be a multiple of 8"),
    ({"rank": 0}, "rank=0: must be >= 1"),
    ({"learning_rate": 0.0}, "learning_rate=0.0: must be >= 1e-07"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"lr_scheduler": "cosine_warm"}, "lr_scheduler='cosine_warm': must be one of"),
    ({"mixed_precision": "fp8"}, "mixed_precision='fp8'"),
    ({"output_name": "../escape"}, "must stay inside the loras folder"),
    ({"output_name": "/abs/x"}, "not an absolute path"),
    ({"output_name": "C:\\x"}, "not an absolute path"),
    ({"output_name": ""}, "output_name: is empty"),
    ({"random_flip": True, "cache_latents": True}, "random_flip with cache_latents"),
    ({"cache_text_embeddings": True, "train_text_encoder": True}, "cache_text_embeddings with train_text_encoder"),
    ({"aspect": "../x"}, "an aspect name uses letters, digits"),
    ({"bucket_step": 60}, "bucket_step=60: must be a multiple of 8"),
])
def test_validate_names_the_field_and_the_fix(tmp_path, overrides, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace("?", r"\?")):
        config(tmp_path, **overrides).validate()


def test_validate_reports_every_problem_at_once(tmp_path):
    with pytest.raises(ValueError) as err:
        config(tmp_path, resolution=100, rank=0).validate()
    assert "resolution=100" in str(err.value) and "rank=0" in str(err.value)


def test_validate_checks_paths_and_existing_output(tmp_path):
    with pytest.raises(ValueError, match="base_model=.*no such file or folder"):
        config(tmp_path, base_model=str(tmp_path / "missing.safetensors")).validate()
    with pytest.raises(ValueError, match="dataset_dir=.*no such folder"):
        config(tmp_path, dataset_dir=str(tmp_path / "nodata")).validate()
    existing = config(tmp_path)
    existing.output_path.parent.mkdir(parents=True)
    existing.output_path.write_bytes(b"x")
    with pytest.raises(ValueError, match="already exists; choose another name or set overwrite = true"):
        existing.validate()
    existing.replace(overwrite=True).validate()
    config(tmp_path, base_model="nowhere").validate(check_paths=False)


def test_fingerprint_follows_result_settings_only(tmp_path):
    base = config(tmp_path)
    assert base.fingerprint() == config(tmp_path).fingerprint()
    assert base.fingerprint() != base.replace(learning_rate=2e-4).fingerprint()
    assert base.fingerprint() != base.replace(aspect="other").fingerprint()
    # where things are stored and how often checkpoints are written do not change the result
    assert base.fingerprint() == base.replace(work_dir="/elsewhere", checkpointing_steps=7, overwrite=True,
                                              output_name="versat2i/y", cache_text_embeddings=True).fingerprint()
    # cached latents do: one posterior sample drawn up front instead of a fresh one every step
    assert base.fingerprint() != base.replace(cache_latents=True).fingerprint()
    assert base.fingerprint(data=[1]) != base.fingerprint(data=[2])


def test_save_is_atomic_and_refuses_to_overwrite_unless_asked(tmp_path, monkeypatch):
    first, second = config(tmp_path, rank=4), config(tmp_path, rank=8)
    path = first.save(tmp_path / "sub" / "c.toml")
    with pytest.raises(FileExistsError, match="already exists"):
        second.save(path)
    assert LoraTrainConfig.load(path) == first
    second.save(path, overwrite=True)
    assert LoraTrainConfig.load(path) == second

    real_write_bytes = Path.write_bytes

    def half_write(self, data, *args, **kwargs):  # the disk fills up half-way through the write
        real_write_bytes(self, (data if isinstance(data, bytes) else data.encode())[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    monkeypatch.setattr(Path, "write_text", half_write)
    with pytest.raises(OSError, match="config file .*c.toml.*: could not be written: no space left on the disk"):
        first.save(path, overwrite=True)
    with pytest.raises(OSError, match="new.toml.*: could not be written: no space left on the disk"):
        first.save(tmp_path / "new.toml")
    assert LoraTrainConfig.load(path) == second  # the old file is untouched
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.toml"]  # no temporary left behind


def test_output_path_adds_the_suffix_once(tmp_path):
    assert config(tmp_path, output_name="versat2i/a").output_path.name == "a.safetensors"
    assert config(tmp_path, output_name="versat2i/a.safetensors").output_path.name == "a.safetensors"


# -- events ------------------------------------------------------------------------------------

def test_events_round_trip_and_reject_foreign_lines(tmp_path):
    event = make_event("step", step=3, total=10, loss=0.5, lr=1e-4, eta_s=2.0, epoch=0)
    assert parse_event_line(encode_event(event)) == event
    assert parse_event_line("INFO something {\"event\": \"step\"}") is None
    assert parse_event_line('{"event": "step", "v": 1, "step": 1}') is None  # missing fields
    assert parse_event_line('{"event": "bogus", "v": 1}') is None
    assert parse_event_line("{not json") is None
    with pytest.raises(ValueError, match="missing loss"):
        make_event("step", step=1, total=2, lr=0.1, eta_s=1)
    with pytest.raises(ValueError, match="unknown event kind"):
        make_event("progress")


def test_non_finite_loss_is_written_as_null():
    line = encode_event(make_event("step", step=1, total=2, loss=float("nan"), lr=0.1, eta_s=1))
    assert json.loads(line)["loss"] is None
    assert parse_event_line(line)["loss"] is None


def test_event_writer_appends_to_file_and_stream(tmp_path):
    stream = io.StringIO()
    log = tmp_path / "sub" / "log.jsonl"
    with EventWriter(log, stream=stream) as writer:
        writer.emit("start", total_steps=2, start_step=0, num_examples=4, output="x")
    with EventWriter(log, stream=None) as writer:
        writer.emit("done", step=2, lora_path="x")
    assert [e["event"] for e in read_events(log)] == ["start", "done"]
    assert parse_event_line(stream.getvalue())["event"] == "start"


# -- limits: one definition for the configs and the training nodes (issue 15) -----------------------

# node input -> config setting, for every bounded input of the two training nodes
NODE_INPUTS = {
    "VersaT2I_TrainAspectLoRA": {
        "steps": "max_train_steps", "learning_rate": "learning_rate", "rank": "rank", "alpha": "alpha",
        "batch_size": "train_batch_size", "resolution": "resolution", "seed": "seed",
        "lr_warmup_steps": "lr_warmup_steps", "gradient_accumulation_steps": "gradient_accumulation_steps",
        "noise_offset": "noise_offset", "snr_gamma": "snr_gamma", "dropout": "dropout",
        "checkpoint_every": "checkpointing_steps"},
    "VersaT2I_TrainGate": {
        "balance_weight": "balance_weight", "steps": "max_train_steps", "learning_rate": "learning_rate",
        "batch_size": "train_batch_size", "resolution": "resolution", "seed": "seed",
        "checkpoint_every": "checkpointing_steps"},
}


def test_the_training_nodes_offer_exactly_the_config_limits():
    """The node definitions as ComfyUI serves them (tests/data/object_info.json, checked against the
    node sources by test_workflows_schema) use SETTING_RANGES for every bounded input."""
    from versat2i.trainer.config import SETTING_RANGES

    versions = json.loads((Path(__file__).parents[2] / "data" / "object_info.json").read_text())["versions"]
    assert versions, "the snapshot has no ComfyUI version"
    for (node, inputs), snapshot in ((item, entry["nodes"]) for entry in versions.values()
                                     for item in NODE_INPUTS.items()):
        spec = {**snapshot[node]["input"]["required"], **snapshot[node]["input"].get("optional", {})}
        for name, setting in inputs.items():
            options = spec[name][1]
            limits = SETTING_RANGES[setting]
            assert (options["min"], options["max"]) == (limits.minimum, limits.maximum), (node, name)


BOUNDED_LORA_SETTINGS = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
                         "lr_warmup_steps", "seed", "dataloader_num_workers", "checkpointing_steps",
                         "checkpoints_total_limit", "resolution", "bucket_step", "bucket_max_aspect", "rank", "alpha",
                         "dropout", "text_encoder_lr", "noise_offset", "snr_gamma")


@pytest.mark.parametrize("setting", BOUNDED_LORA_SETTINGS)
def test_each_limit_accepts_its_bounds_and_refuses_beyond_them(tmp_path, setting):
    from versat2i.trainer.config import SETTING_RANGES

    limits = SETTING_RANGES[setting]
    kind = type(getattr(config(tmp_path), setting))
    step = 8 if setting in ("resolution", "bucket_step") else (1 if kind is int else 1e-3)
    for value in (limits.minimum, limits.maximum):
        assert not [p for p in config(tmp_path, **{setting: kind(value)}).problems() if p.startswith(setting)]
    too_big = config(tmp_path, **{setting: kind(limits.maximum + step)}).problems()
    assert any(p.startswith(f"{setting}=") and f"must be <= {limits.maximum}" in p for p in too_big), too_big
    too_small = config(tmp_path, **{setting: kind(limits.minimum - step)}).problems()
    assert any(p.startswith(f"{setting}=") and f"must be >= {limits.minimum}" in p for p in too_small), too_small


def test_a_resolution_of_100000_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"resolution=100000: must be <= 4096"):
        config(tmp_path, resolution=100000).validate()


# -- names: the output file and its temporary sibling must fit ---------------------------------------

def test_output_name_fits_with_the_suffix_and_the_temporary_name(tmp_path):
    longest = "x" * (241 - len(".safetensors"))  # 229: "<name>.safetensors" + 14 bytes of temporary name = 255
    assert config(tmp_path, output_name=longest).problems() == []
    assert config(tmp_path, output_name=f"versat2i/{longest}").problems() == []
    problems = config(tmp_path, output_name=longest + "x").problems()
    assert problems == [f"output_name: '{'x' * 40}...' is 242 bytes long; a file or folder name has at most 241 "
                        "bytes (255, less 14 for the temporary name it is written under first); shorten it"]


@pytest.mark.parametrize("name", ["CON", "versat2i/nul", "Aux.safetensors"])
def test_output_name_refuses_windows_device_names(tmp_path, name):
    with pytest.raises(ValueError, match="output_name: .* reserved device name on Windows"):
        config(tmp_path, output_name=name).validate()


def test_output_and_work_folders_under_a_file_are_refused(tmp_path):
    (tmp_path / "a_file").write_text("x")
    problems = config(tmp_path, output_dir=str(tmp_path / "a_file" / "loras"), work_dir=str(tmp_path / "a_file")
                      ).problems()
    assert any(p.startswith("output_dir ") and "is a file, not a folder" in p for p in problems), problems
    assert any(p.startswith("work_dir ") and "is a file, not a folder" in p for p in problems), problems


def test_load_checked_reports_the_settings_that_do_not_parse_with_every_other_problem(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(config(tmp_path).to_toml().replace("rank = 16", 'rank = "sixteen"')
                    .replace("resolution = 512", "resolution = 100000") + "learning_rat = 0.1\n")
    with pytest.raises(ValueError) as err:
        LoraTrainConfig.load_checked(path)
    message = str(err.value)
    assert "rank: expected an integer" in message and "resolution=100000: must be <= 4096" in message
    assert "unknown setting 'learning_rat' (did you mean 'learning_rate'?)" in message
    assert "rank=" not in message  # the unparsed rank is not also reported as its stand-in's problem
