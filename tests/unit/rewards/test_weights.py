"""rewards/weights.py: finding, hashing and reading weight files (offline, no models)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from versat2i.rewards import weights
from versat2i.rewards.registry import SCORERS, WEIGHT_INPUTS, get_scorer
from versat2i.rewards.weights import (
    MissingWeightsError,
    WeightFile,
    WeightsFormatError,
    combine_hashes,
    find_weight_file,
    find_weight_folder,
    find_weights,
    load_state_dict,
    torch_load_weights_only,
)
from versat2i.safe_io import sha256_file


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(4, 3, generator=generator), "layer.bias": torch.randn(4, generator=generator)}


# -- finding -------------------------------------------------------------------------------------

def test_find_weight_file_takes_the_first_search_dir_that_has_it(tmp_path):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (second, third):
        (folder / "clip").mkdir(parents=True)
        (folder / "clip" / "x.safetensors").write_bytes(b"x")
    found = find_weight_file("clip/x.safetensors", [first, second, third], source_hint="hint")
    assert found == second / "clip" / "x.safetensors"


def test_missing_weights_error_names_file_subfolder_every_folder_and_source(tmp_path):
    dirs = [tmp_path / "models_a", tmp_path / "models_b"]
    with pytest.raises(MissingWeightsError) as info:
        find_weight_file("aesthetic/sac+logos+ava1-l14-linearMSE.pth", dirs,
                         source_hint="https://example.org/predictor")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "'sac+logos+ava1-l14-linearMSE.pth'" in message
    assert "'aesthetic' sub-folder" in message
    for folder in dirs:
        assert str(folder / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth") in message
    assert "https://example.org/predictor" in message
    assert info.value.file_name == "sac+logos+ava1-l14-linearMSE.pth"
    assert info.value.subfolder == "aesthetic"
    assert info.value.search_dirs == dirs


def test_missing_weights_without_any_search_dir_says_how_to_give_one():
    with pytest.raises(MissingWeightsError, match="No model folder was given.*--models-dir"):
        find_weight_file("clip/ViT-L-14-openai.safetensors", [], source_hint="hint")


def test_a_folder_needs_its_required_files(tmp_path):
    folder = tmp_path / "pickscore" / "PickScore_v1"
    folder.mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="must contain: config.json"):
        find_weight_folder("pickscore/PickScore_v1", [tmp_path], required_files=("config.json",))
    (folder / "config.json").write_text("{}")
    assert find_weight_folder("pickscore/PickScore_v1", [tmp_path], required_files=("config.json",)) == folder


@pytest.mark.parametrize("bad", ["../clip/x.pt", "clip/../../x.pt", "/abs/x.pt"])
def test_relative_paths_may_not_escape_the_search_dirs(tmp_path, bad):
    with pytest.raises(ValueError, match="relative to a model folder"):
        find_weight_file(bad, [tmp_path])


def test_find_weights_accepts_an_explicit_absolute_path(tmp_path):
    spec = WeightFile("clip/x.safetensors", "hint")
    explicit = tmp_path / "elsewhere.safetensors"
    with pytest.raises(MissingWeightsError, match="elsewhere.safetensors"):
        find_weights(spec, [], override=str(explicit))
    explicit.write_bytes(b"x")
    assert find_weights(spec, [], override=str(explicit)) == explicit


def test_documented_file_names_are_the_published_ones():
    """Every single file keeps the name it is published under (its Hub file name): nothing to rename."""
    assert weights.CLIP_VIT_L_14_OPENAI.relative_path == "clip/open_clip_model.safetensors"
    assert weights.LAION_AESTHETIC_MLP.relative_path == "aesthetic/sac+logos+ava1-l14-linearMSE.pth"
    for relative_path, source in weights.HUB_FILES.items():
        assert relative_path.rsplit("/", 1)[1] == source.filename
        assert source.url.startswith(f"https://huggingface.co/{source.repo_id}/resolve/main/")
    assert set(weights.HUB_FILES) == {weights.CLIP_VIT_L_14_OPENAI.relative_path,
                                      weights.LAION_AESTHETIC_MLP.relative_path, weights.HPS_V2_1.relative_path}
    assert weights.HPS_V2_1.relative_path == "hps/HPS_v2.1_compressed.pt"
    assert weights.PICKSCORE_MODEL.relative_path == "pickscore/PickScore_v1"
    assert weights.PICKSCORE_PROCESSOR.relative_path == "pickscore/CLIP-ViT-H-14-laion2B-s32B-b79K"
    for spec in (weights.CLIP_VIT_L_14_OPENAI, weights.LAION_AESTHETIC_MLP, weights.HPS_V2_1,
                 weights.PICKSCORE_MODEL, weights.PICKSCORE_PROCESSOR):
        assert "huggingface.co" in spec.source_hint or "github.com" in spec.source_hint


def test_the_clip_file_is_found_under_the_name_earlier_versions_asked_for(tmp_path):
    """Users who renamed the CLIP file as the old README said keep working; the published name wins."""
    spec = weights.CLIP_VIT_L_14_OPENAI
    legacy = tmp_path / "clip" / "ViT-L-14-openai.safetensors"
    legacy.parent.mkdir()
    legacy.write_bytes(b"old name")
    assert find_weights(spec, [tmp_path]) == legacy
    published = tmp_path / "clip" / "open_clip_model.safetensors"
    published.write_bytes(b"published name")
    assert find_weights(spec, [tmp_path]) == published
    published.unlink()
    legacy.unlink()
    with pytest.raises(MissingWeightsError) as info:  # the error names the published file
        find_weights(spec, [tmp_path])
    assert info.value.relative_path == "clip/open_clip_model.safetensors"


# -- hashing -------------------------------------------------------------------------------------

def test_sha256_file_is_the_sha256_and_follows_changes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"first")
    assert sha256_file(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert sha256_file(path) == hashlib.sha256(b"second, longer").hexdigest()


def test_sha256_file_is_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"content")
    expected = sha256_file(path)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert sha256_file(path) == expected
    assert opened == []  # served from the cache, the file was not read again


def test_combine_hashes_is_order_independent_and_keeps_single_hashes():
    assert combine_hashes({"a": "1" * 64}) == "1" * 64
    assert combine_hashes({"a": "1" * 64, "b": "2" * 64}) == combine_hashes({"b": "2" * 64, "a": "1" * 64})
    assert combine_hashes({"a": "1" * 64, "b": "2" * 64}) != combine_hashes({"a": "1" * 64, "b": "3" * 64})


# -- reading -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_load_state_dict_reads_every_format(tmp_path, suffix):
    state = _state()
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, str(path))
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_state_dict_unwraps_training_checkpoints_and_data_parallel(tmp_path):
    state = _state()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, str(path))
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file_is_a_clear_error_naming_it(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    big = {"w": torch.randn(256, 256)}
    save_file(big, str(path)) if suffix == ".safetensors" else torch.save(big, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError) as info:
        load_state_dict(path, source_hint="https://example.org/w")
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in str(info.value)
    assert "https://example.org/w" in str(info.value)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"this is an HTML error page, not weights")
    with pytest.raises(WeightsFormatError, match="model.pth"):
        load_state_dict(path)


class _Payload:
    """Stands for arbitrary pickled objects (which could run code when unpickled)."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), "extra": _Payload()}, str(path))
    with pytest.raises(WeightsFormatError, match="refused for safety"):
        load_state_dict(path)


def test_non_tensor_entries_and_unknown_extensions_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), "note": "text"}, str(path))
    with pytest.raises(WeightsFormatError, match="'note' is a str"):
        load_state_dict(path)
    with pytest.raises(WeightsFormatError, match="unsupported extension '.onnx'"):
        load_state_dict(tmp_path / "model.onnx")


def test_load_state_dict_takes_the_state_dict_from_a_named_entry(tmp_path):
    state = _state()
    path = tmp_path / "pyiqa_style.pth"
    torch.save({"params": state, "note": "ignored"}, str(path))
    loaded = load_state_dict(path, key="params")
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save(state, str(path))  # no "params" entry: not the file the caller expects
    with pytest.raises(WeightsFormatError, match=r"has no 'params' entry.*https://example.org/w") as info:
        load_state_dict(path, key="params", source_hint="https://example.org/w")
    assert str(path) in str(info.value)


def test_torch_load_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "tuple.pth"
    torch.save((torch.zeros(2), torch.ones(3)), str(path))
    loaded = torch_load_weights_only(path)  # not a state dict, but only tensors: fine
    assert isinstance(loaded, tuple) and torch.equal(loaded[1], torch.ones(3))
    torch.save((torch.zeros(2), _Payload()), str(path))
    with pytest.raises(WeightsFormatError, match="refused for safety"):
        torch_load_weights_only(path)


@pytest.mark.parametrize("name", [name for name, entry in SCORERS.items() if entry.weight_inputs])
def test_the_weight_inputs_of_load_scorers_are_options_the_scorer_reads(name, tmp_path):
    """Load Scorers sets a scorer's ``weight_inputs`` from its file inputs: each must be an option the
    factory accepts and reads (the missing file it reports is the one the option named)."""
    options = {option: WEIGHT_INPUTS[option].relative_path.split("/")[0] + "/chosen-by-the-user.bin"
               for option in SCORERS[name].weight_inputs}
    with pytest.raises(MissingWeightsError) as info:
        get_scorer(name, search_dirs=[tmp_path], cache=False, **options)
    assert info.value.relative_path in options.values()
