"""Downloading a missing weight file (``rewards/download.py``), against a stand-in for the Hugging
Face Hub on 127.0.0.1 (``tests/fake_hub.py``; huggingface_hub is pointed at it as HF_ENDPOINT would).
Nothing leaves the machine: the tests' network tripwire allows loopback only."""

from __future__ import annotations

import hashlib

import pytest
from fake_hub import FakeHub, HubFile

from versat2i.rewards import download as dl
from versat2i.rewards.weights import (
    CLIP_VIT_L_14_OPENAI,
    HUB_FILES,
    LAION_AESTHETIC_MLP,
    MissingWeightsError,
    find_weights,
)

AESTHETIC = LAION_AESTHETIC_MLP.relative_path
CONTENT = bytes(range(256)) * 1200  # 300 KiB


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    fake = FakeHub()
    # What HF_ENDPOINT=<fake.url> sets when huggingface_hub is imported.
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session runs with HF_HUB_OFFLINE=1
    yield fake
    fake.close()


def serve(hub: FakeHub, relative_path: str, content: bytes = CONTENT, **options) -> None:
    source = HUB_FILES[relative_path]
    hub.files[(source.repo_id, source.filename)] = HubFile(content, **options)


def test_a_missing_file_is_downloaded_under_its_published_name_with_progress(hub, tmp_path):
    serve(hub, AESTHETIC)
    progress = []
    path = dl.download_weight_file(AESTHETIC, tmp_path, progress=lambda done, total: progress.append((done, total)))
    assert path == tmp_path / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    assert path.read_bytes() == CONTENT
    assert progress and progress[-1] == (len(CONTENT), len(CONTENT))
    assert find_weights(LAION_AESTHETIC_MLP, [tmp_path]) == path  # where the scorer looks
    source = HUB_FILES[AESTHETIC]
    assert ("GET", f"/{source.repo_id}/resolve/main/{source.filename}", None) in hub.requests
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".incomplete")]


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of this size: small, so the bytes before the
    # drop are on disk (with its 10 MB default they would be for a real multi-GB file)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    serve(hub, AESTHETIC, drop_after=100_000)
    path = dl.download_weight_file(AESTHETIC, tmp_path)
    assert path.read_bytes() == CONTENT
    ranges = [r for method, _, r in hub.requests if method == "GET"]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 100_000  # the second request asks only for the rest


def test_a_file_whose_sha256_is_not_the_published_one_is_deleted(hub, tmp_path):
    serve(hub, AESTHETIC, etag=hashlib.sha256(b"what the hub says it is").hexdigest())
    with pytest.raises(dl.DownloadError, match="sha256 .* not the published .*deleted"):
        dl.download_weight_file(AESTHETIC, tmp_path)
    assert not (tmp_path / AESTHETIC).exists()


def test_nothing_is_fetched_when_huggingface_hub_is_offline(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    serve(hub, AESTHETIC)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(dl.DownloadError, match="HF_HUB_OFFLINE"):
        dl.download_weight_file(AESTHETIC, tmp_path)
    assert hub.requests == [] and not (tmp_path / AESTHETIC).exists()


def test_a_cancelled_download_leaves_nothing_under_the_final_name(hub, tmp_path):
    serve(hub, AESTHETIC)

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        dl.download_weight_file(AESTHETIC, tmp_path, progress=cancel)
    folder = tmp_path / "aesthetic"
    assert not (folder / "sac+logos+ava1-l14-linearMSE.pth").exists()
    assert not [p for p in folder.rglob("*") if p.name.endswith(".incomplete")]


def test_a_server_error_is_one_clear_error_naming_the_url(hub, tmp_path):
    with pytest.raises(dl.DownloadError, match="downloading 'aesthetic/.*' from .*/resolve/main/.* failed"):
        dl.download_weight_file(AESTHETIC, tmp_path)  # the hub does not have it: 404


def test_find_or_download_fetches_each_missing_file_then_finds(hub, tmp_path):
    serve(hub, AESTHETIC)
    serve(hub, CLIP_VIT_L_14_OPENAI.relative_path, b"clip weights")

    def find_both():
        return (find_weights(LAION_AESTHETIC_MLP, [tmp_path]), find_weights(CLIP_VIT_L_14_OPENAI, [tmp_path]))

    with pytest.raises(MissingWeightsError):  # download off: the missing file is the error
        dl.find_or_download(find_both, tmp_path, download=False)
    assert hub.requests == []
    aesthetic, clip = dl.find_or_download(find_both, tmp_path, download=True)
    assert aesthetic.read_bytes() == CONTENT and clip.read_bytes() == b"clip weights"
    with pytest.raises(MissingWeightsError, match="other.bin"):  # not a published file: not downloadable
        dl.find_or_download(lambda: find_weights(type(LAION_AESTHETIC_MLP)("x/other.bin", "hint"), [tmp_path]),
                            tmp_path, download=True)
