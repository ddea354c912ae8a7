"""rewards/pyiqa_metric.py: pyiqa no-reference metrics, offline.

The networks are pyiqa's real architectures with random weights, saved under the published file
names and layouts by ``tiny_models.iqa`` (independently of the scorer's own table). Nothing is
downloaded: the conftest tripwire refuses connections, and ``no_network`` below also fails a test
on any host-name lookup, in case a library swallowed the refused connection and went on.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import shutil
import socket
import sys

import pytest
import torch

pytest.importorskip("pyiqa", reason="pyiqa (extra [iqa]) is not installed")

from tiny_models.iqa import (
    PUBLISHED,
    build_random_pyiqa_net,
    checkpoint_path,
    write_pyiqa_checkpoint,
)

from versat2i.rewards.base import ImageBatchError
from versat2i.rewards.pyiqa_metric import RECIPES, PyiqaScorer
from versat2i.rewards.registry import get_scorer
from versat2i.rewards.weights import MissingWeightsError, WeightsFormatError

CHEAP_METRICS = ("cnniqa", "wadiqam_nr", "niqe", "brisque")
BIG_METRICS = ("musiq", "topiq_nr")  # the two defaults, full size (27 M and 45 M parameters)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """One model folder with a random checkpoint for each metric under test (~300 MB, removed
    after the module)."""
    root = tmp_path_factory.mktemp("pyiqa-models")
    for metric in CHEAP_METRICS + BIG_METRICS:
        write_pyiqa_checkpoint(root, metric, seed=0)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any host-name lookup or non-loopback connection, even one a library catches."""
    attempts = []

    def lookup(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"test: network lookup of {host!r} refused")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield attempts
    assert attempts == [], f"tried to reach the network: {attempts}"


def _images(count: int, height: int = 112, width: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.rand(count, 3, height // 8, width // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(smooth, size=(height, width), mode="bilinear", align_corners=False)
    noise = 0.1 * torch.rand(count, 3, height, width, generator=generator)
    return (0.8 * smooth + noise).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


# -- real formats load, and the loaded weights are the ones used ----------------------------------

@pytest.mark.parametrize("metric", ("cnniqa", "wadiqam_nr") + BIG_METRICS)
def test_published_checkpoint_loads_and_its_weights_are_used(models_dir, metric, no_network):
    # Built here first (under no_network); the batch tests below reuse the cached scorer.
    scorer = get_scorer(f"pyiqa:{metric}", search_dirs=[models_dir])
    images = _images(1)
    scores = scorer.score(images, [""])

    # Reference: the same architecture with other random weights, then the file loaded by plain torch.
    reference = build_random_pyiqa_net(metric, seed=1)
    pixels = images.permute(0, 3, 1, 2)
    with torch.no_grad():
        before = reference(pixels).reshape(1, -1)[:, 0]
        state = torch.load(checkpoint_path(models_dir, metric), weights_only=True)
        reference.load_state_dict(state[PUBLISHED[metric][1]] if PUBLISHED[metric][1] else state)
        after = reference(pixels).reshape(1, -1)[:, 0]
    torch.testing.assert_close(scores, after, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scores, before, rtol=1e-3, atol=1e-4), "other weights score the same: test is blind"


def _varied_images(height: int = 112, width: int = 128) -> torch.Tensor:
    """Four images of clearly different content: a smooth gradient, coarse blobs, fine noise and
    stripes, so a metric that mixed images up (or ignored them) would give different scores."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    generator = torch.Generator().manual_seed(3)
    gradient = torch.stack([xx, yy, 1 - xx], dim=-1)
    blobs = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=generator), size=(height, width),
                                            mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    noise = torch.rand(height, width, 3, generator=generator)
    stripes = (0.5 + 0.5 * torch.sin(xx * 60))[..., None].repeat(1, 1, 3) * torch.tensor([1.0, 0.6, 0.2])
    return torch.stack([gradient, blobs, noise, stripes]).clamp(0, 1).contiguous()


@pytest.mark.parametrize("metric", BIG_METRICS)
def test_default_metrics_are_batch_independent(models_dir, metric):
    scorer = get_scorer(f"pyiqa:{metric}", search_dirs=[models_dir])
    images = _varied_images()
    prompts = [""] * 4
    together = scorer.score(images, prompts)
    alone = torch.cat([scorer.score(images[i:i + 1], [""]) for i in range(4)])
    reversed_order = scorer.score(images.flip(0), prompts).flip(0)
    chunked = scorer.score(images, prompts, chunk_size=3)
    for other in (alone, reversed_order, chunked):
        torch.testing.assert_close(together, other, rtol=1e-6, atol=1e-5)
    # The images must score differently, well beyond the tolerance, or a mix-up would go unseen.
    values = sorted(together.tolist())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-3, values


@pytest.mark.parametrize("metric", CHEAP_METRICS + ("piqe", "entropy"))
def test_batch_independence_chunks_and_order(models_dir, metric):
    scorer = get_scorer(f"pyiqa:{metric}", search_dirs=[models_dir])
    images = _images(4, height=128, width=112, seed=4)
    prompts = [""] * 4
    together = scorer.score(images, prompts)
    alone = torch.cat([scorer.score(images[i:i + 1], [""]) for i in range(4)])
    chunked = scorer.score(images, prompts, chunk_size=3)
    reversed_order = scorer.score(images.flip(0), prompts).flip(0)
    for other in (alone, chunked, reversed_order):
        torch.testing.assert_close(together, other, rtol=1e-6, atol=1e-5)
    assert together.dtype == torch.float32 and together.shape == (4,)
    assert len(set(together.tolist())) > 1, "all images score the same: the test could not catch a mix-up"


def test_musiq_ava_checkpoint_loads_into_its_ten_bin_rating_head(tmp_path):
    path = write_pyiqa_checkpoint(tmp_path, "musiq-ava")
    try:
        scorer = get_scorer("pyiqa:musiq-ava", search_dirs=[tmp_path], cache=False)
        images = _images(2, seed=5)
        together = scorer.score(images, ["", ""])
        alone = torch.cat([scorer.score(images[i:i + 1], [""]) for i in range(2)])
    finally:
        path.unlink()  # 110 MB; pytest keeps old tmp dirs
    assert all(1.0 <= score <= 10.0 for score in together.tolist())  # means of distributions over ratings 1..10
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-5)  # the 10-bin head is per image too


def test_weights_hash_is_the_files_sha256(models_dir):
    scorer = get_scorer("pyiqa:cnniqa", search_dirs=[models_dir])
    path = checkpoint_path(models_dir, "cnniqa")
    assert scorer.weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert scorer.weight_files() == (path,)
    assert scorer.describe() == {"id": "pyiqa:cnniqa", "aspect": "lowlevel",
                                 "weights_hash": scorer.weights_hash, "score_transform": "identity"}
    assert get_scorer("pyiqa:entropy").weights_hash == "none"


@pytest.mark.parametrize("metric", ["cnniqa", "brisque"])  # a state dict, and a file pyiqa reads itself
def test_weights_hash_is_taken_when_the_weights_are_read(tmp_path, metric):
    # A file replaced after loading must not be recorded as the weights that produced the scores.
    path = write_pyiqa_checkpoint(tmp_path, metric, seed=0)
    loaded = hashlib.sha256(path.read_bytes()).hexdigest()
    scorer = get_scorer(f"pyiqa:{metric}", search_dirs=[tmp_path], cache=False)
    write_pyiqa_checkpoint(tmp_path, metric, seed=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    replaced = hashlib.sha256(path.read_bytes()).hexdigest()
    assert replaced != loaded
    assert scorer.weights_hash == loaded
    assert get_scorer(f"pyiqa:{metric}", search_dirs=[tmp_path], cache=False).weights_hash == replaced


def test_brisque_file_swapped_while_pyiqa_builds_can_not_run_code(tmp_path, monkeypatch):
    """pyiqa's BRISQUE unpickles its file with weights_only=False. Swap the file for pickled code
    after it was checked, right before pyiqa reads it: pyiqa must still get the checked bytes."""
    import pyiqa

    path = write_pyiqa_checkpoint(tmp_path, "brisque", seed=0)
    checked = path.read_bytes()
    sv_coef, _sv = torch.load(path, weights_only=True)
    marker = tmp_path / "code-ran"
    real_create_metric = pyiqa.create_metric

    def swap_then_create(*args, **kwargs):
        with open(path, "wb") as handle:  # the attacker's file, in place of the checked one
            pickle.dump((_RunsCode(marker), torch.zeros(1)), handle, protocol=2)
        return real_create_metric(*args, **kwargs)

    monkeypatch.setattr(pyiqa, "create_metric", swap_then_create)
    scorer = get_scorer("pyiqa:brisque", search_dirs=[tmp_path], cache=False)
    assert not marker.exists(), "pyiqa unpickled the swapped file"
    torch.testing.assert_close(scorer.model.net.sv_coef, sv_coef)
    assert scorer.weights_hash == hashlib.sha256(checked).hexdigest()


def test_weights_option_takes_a_path_outside_the_model_folders(models_dir, tmp_path):
    elsewhere = tmp_path / "my_cnniqa.pth"
    shutil.copy(checkpoint_path(models_dir, "cnniqa"), elsewhere)
    scorer = get_scorer("pyiqa:cnniqa", weights=str(elsewhere), cache=False)
    assert scorer.weight_files() == (elsewhere,)
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        get_scorer("pyiqa:cnniqa", weights=str(tmp_path / "nope.pth"), cache=False)


# -- higher is better ----------------------------------------------------------------------------

def test_lower_is_better_metric_is_negated():
    import pyiqa

    scorer = get_scorer("pyiqa:piqe")
    assert scorer.lower_better and scorer.describe()["score_transform"] == "negate"
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    texture = (0.5 + 0.25 * torch.sin(xx * 20) * torch.cos(yy * 13))[None, :, :, None].repeat(1, 1, 1, 3)
    generator = torch.Generator().manual_seed(0)
    slightly_noisy = (texture + 0.05 * torch.randn(texture.shape, generator=generator)).clamp(0, 1)
    very_noisy = (texture + 0.3 * torch.randn(texture.shape, generator=generator)).clamp(0, 1)
    images = torch.cat([slightly_noisy, very_noisy])
    scores = scorer.score(images, ["", ""])

    raw = pyiqa.create_metric("piqe", device="cpu")(images.permute(0, 3, 1, 2)).flatten()
    torch.testing.assert_close(scores, -raw.float())
    assert raw[0] < raw[1], "PIQE should rate the noisier image worse (higher)"
    assert scores[0] > scores[1], "after the flip the less noisy image must score higher"


def test_higher_is_better_metric_is_not_negated():
    import pyiqa

    scorer = get_scorer("pyiqa:entropy")
    assert not scorer.lower_better and scorer.describe()["score_transform"] == "identity"
    images = _images(2)
    raw = pyiqa.create_metric("entropy", device="cpu")(images.permute(0, 3, 1, 2)).flatten()
    torch.testing.assert_close(scorer.score(images, ["", ""]), raw.float())


# -- missing, corrupt, unsafe or wrong weights -----------------------------------------------------

@pytest.mark.parametrize("name, file_name", [
    ("pyiqa:topiq_nr", "cfanet_nr_koniq_res50-9a73138b.pth"),
    ("pyiqa", "musiq_koniq_ckpt-e95806b9.pth"),  # the default variant
    ("pyiqa:niqe", "niqe_modelparameters.mat"),
])
def test_missing_file_names_the_file_the_folder_and_the_download(tmp_path, name, file_name, no_network):
    with pytest.raises(MissingWeightsError) as info:
        get_scorer(name, search_dirs=[tmp_path], cache=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert file_name in message
    assert str(tmp_path / "pyiqa" / file_name) in message
    assert f"https://huggingface.co/chaofengc/IQA-PyTorch-Weights/blob/main/{file_name}" in message


def test_corrupt_and_truncated_files_are_refused(tmp_path, models_dir):
    path = tmp_path / "pyiqa" / PUBLISHED["cnniqa"][0]
    path.parent.mkdir()
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsFormatError, match="truncated or corrupt") as info:
        get_scorer("pyiqa:cnniqa", search_dirs=[tmp_path], cache=False)
    assert str(path) in str(info.value)

    data = checkpoint_path(models_dir, "cnniqa").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFormatError, match=str(path)):
        get_scorer("pyiqa:cnniqa", search_dirs=[tmp_path], cache=False)

    mat = tmp_path / "pyiqa" / PUBLISHED["niqe"][0]
    mat.write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(WeightsFormatError, match="niqe_modelparameters.mat"):
        get_scorer("pyiqa:niqe", search_dirs=[tmp_path], cache=False)


class _RunsCode:
    """Unpickling this would create the marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("metric", ["cnniqa", "brisque"])
def test_pickled_code_is_refused_before_anything_unpickles_it(tmp_path, metric):
    # brisque is the case that matters most: pyiqa reads that file with weights_only=False.
    marker = tmp_path / "code-ran"
    path = tmp_path / "pyiqa" / PUBLISHED[metric][0]
    path.parent.mkdir()
    with open(path, "wb") as handle:
        pickle.dump({"params": {"conv1.weight": _RunsCode(marker)}}, handle, protocol=2)
    with pytest.raises(WeightsFormatError, match="refused for safety"):
        get_scorer(f"pyiqa:{metric}", search_dirs=[tmp_path], cache=False)
    assert not marker.exists()


def test_checkpoint_of_another_shape_or_layout_is_refused(tmp_path):
    path = write_pyiqa_checkpoint(tmp_path, "cnniqa")
    state = torch.load(path, weights_only=True)["params"]

    torch.save(state, path)  # bare state dict: the published CNNIQA file nests it under "params"
    with pytest.raises(WeightsFormatError, match="no 'params' entry"):
        get_scorer("pyiqa:cnniqa", search_dirs=[tmp_path], cache=False)

    state["fc3.weight"] = torch.zeros(1, 400)  # published shape is [1, 800]
    torch.save({"params": state}, path)
    with pytest.raises(WeightsFormatError, match="does not match pyiqa's cnniqa network"):
        get_scorer("pyiqa:cnniqa", search_dirs=[tmp_path], cache=False)

    del state["fc3.weight"]
    torch.save({"params": state}, path)
    with pytest.raises(WeightsFormatError, match="fc3.weight"):
        get_scorer("pyiqa:cnniqa", search_dirs=[tmp_path], cache=False)


# -- names, options, inputs, extra -----------------------------------------------------------------

@pytest.mark.parametrize("name, fragment", [
    ("pyiqa:no_such_metric", "unknown pyiqa metric"),
    ("pyiqa:lpips", "full-reference"),
    ("pyiqa:clipiqa", "not supported offline"),
])
def test_unsupported_metric_names_list_the_supported_ones(name, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        get_scorer(name, cache=False)
    assert "pyiqa:musiq" in str(info.value) and "pyiqa:topiq_nr" in str(info.value)


def test_unknown_option_and_weights_for_a_weight_free_metric_are_refused():
    with pytest.raises(ValueError, match="unknown option"):
        get_scorer("pyiqa:piqe", wieghts="x", cache=False)
    with pytest.raises(ValueError, match="has no weight file"):
        get_scorer("pyiqa:piqe", weights="x.pth", cache=False)


def test_images_below_the_metrics_minimum_size_are_refused(models_dir):
    scorer = get_scorer("pyiqa:niqe", search_dirs=[models_dir])
    with pytest.raises(ImageBatchError, match="at least 96x96"):
        scorer.score(torch.rand(1, 64, 200, 3), [""])


def test_every_recipe_names_a_real_no_reference_pyiqa_metric():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for metric in RECIPES:
        assert DEFAULT_CONFIGS[metric]["metric_mode"] == "NR", metric
    assert PyiqaScorer.aspect == "lowlevel"


def test_missing_pyiqa_raises_import_error_naming_the_extra_and_the_licence(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # what `import pyiqa` sees when it is absent
    with pytest.raises(ImportError) as info:
        get_scorer("pyiqa:musiq", cache=False)
    message = str(info.value)
    assert "pip install 'comfyui-versat2i[iqa]'" in message
    assert "PolyForm-Noncommercial-1.0.0" in message
    assert "clip-iqa" in message


def test_broken_pyiqa_dependency_is_told_apart_from_a_missing_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "pyiqa":
            raise ModuleNotFoundError("No module named 'pkg_resources'", name="pkg_resources")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"installed but failed to import.*setuptools<81"):
        get_scorer("pyiqa:musiq", cache=False)
