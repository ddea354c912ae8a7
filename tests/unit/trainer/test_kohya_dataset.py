"""The kohya training-set reader: folders, repeats, captions, buckets, deterministic batches, caches."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models.lora_training import make_kohya_dataset, shape_image

from versat2i.trainer.kohya_dataset import (
    BucketBatchSampler,
    KohyaDataset,
    assign_bucket,
    collate_examples,
    fit_to_bucket,
    make_buckets,
)
from versat2i.training_set.folders import scan_training_set
from versat2i.training_set.layout import CAPTION_SUFFIX, LATENTS_SUFFIX


def test_scan_reads_repeats_captions_and_aspects(tmp_path):
    root = make_kohya_dataset(tmp_path / "ds", aspects={"aesthetics": 3, "alignment": 7}, images_per_aspect=2)
    everything = scan_training_set(root)
    counts = collections.Counter((im.aspect, im.repeats) for im in everything)
    assert counts == {("aesthetics", 3): 2, ("alignment", 7): 2}
    only = scan_training_set(root, "alignment")
    assert {im.aspect for im in only} == {"alignment"}
    assert only[0].caption == "a picture of shape number 0" and only[0].size == (64, 64)


def test_caption_falls_back_to_the_manifest_and_files_win(tmp_path):
    root = make_kohya_dataset(tmp_path / "ds", images_per_aspect=2)
    (root / "5_aesthetics" / "p00000_c000.txt").unlink()
    (root / "5_aesthetics" / "p00001_c000.txt").write_text("edited by hand\n")
    by_id = {im.id: im.caption for im in scan_training_set(root)}
    assert by_id == {"p00000_c000": "a picture of shape number 0", "p00001_c000": "edited by hand"}


def test_images_deleted_by_the_user_are_skipped_and_extra_ones_trained(tmp_path):
    root = make_kohya_dataset(tmp_path / "ds", images_per_aspect=3)
    (root / "5_aesthetics" / "p00001_c000.png").unlink()
    shape_image(9).save(root / "5_aesthetics" / "extra.png")
    (root / "5_aesthetics" / "extra.txt").write_text("added")
    assert sorted(im.id for im in scan_training_set(root)) == ["extra", "p00000_c000", "p00002_c000"]


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such folder"),
    ("no_folders", r"no '<repeats>_<aspect>' folders"),
    ("empty", "no images"),
    ("unreadable", "can't be read as an image"),
    ("truncated", "can't be read as an image"),
    ("no_caption", "no caption; add p00000_c000.txt"),
    ("wrong_aspect", "no folder for aspect 'geometry'; it has aesthetics"),
])
def test_bad_training_sets_raise_clear_errors(tmp_path, damage, message):
    root = make_kohya_dataset(tmp_path / "ds", images_per_aspect=1, manifest=False)
    image = root / "5_aesthetics" / "p00000_c000.png"
    aspect = ""
    if damage == "missing":
        root = tmp_path / "nothing"
    elif damage == "no_folders":
        (root / "5_aesthetics").rename(root / "aesthetics")
    elif damage == "empty":
        image.unlink()
    elif damage == "unreadable":
        image.write_bytes(b"not an image at all")
    elif damage == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    elif damage == "no_caption":
        image.with_suffix(CAPTION_SUFFIX).unlink()
    elif damage == "wrong_aspect":
        aspect = "geometry"
    with pytest.raises(ValueError, match=message):
        scan_training_set(root, aspect)


def test_buckets_respect_area_step_and_aspect_limit():
    buckets = make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for width, height in buckets:
        assert width * height <= 512 * 512
        assert width % 64 == 0 and height % 64 == 0
        assert max(width, height) / min(width, height) <= 2.0
    assert (520, 520) in make_buckets(520, 64)  # the square bucket even off the step grid


def test_assign_bucket_picks_the_closest_aspect_ratio():
    buckets = make_buckets(512, 64, 2.0)
    assert assign_bucket((1024, 1024), buckets) == (512, 512)
    wide = assign_bucket((1600, 900), buckets)
    assert wide[0] > wide[1] and abs(wide[0] / wide[1] - 16 / 9) < 0.2


def test_fit_to_bucket_covers_and_center_crops():
    image, (top, left) = fit_to_bucket(shape_image(0, (100, 50)), (64, 64))
    assert image.size == (64, 64) and top == 0 and left == (128 - 64) // 2


def test_dataset_items_and_collate(tmp_path):
    root = make_kohya_dataset(tmp_path / "ds", images_per_aspect=2, sizes=[(96, 64)])
    dataset = KohyaDataset(scan_training_set(root), resolution=64, bucket_step=8)
    width, height = dataset.bucket_of[0]
    assert width > height and width * height <= 64 * 64
    example = dataset[(0, False)]
    assert example["pixel_values"].shape == (3, height, width)
    assert -1.0 <= example["pixel_values"].min() and example["pixel_values"].max() <= 1.0
    assert example["original_size"] == (64, 96) and example["target_size"] == (height, width)
    flipped = dataset[(0, True)]["pixel_values"]
    assert torch.equal(flipped, example["pixel_values"].flip(-1))
    batch = collate_examples([dataset[(0, False)], dataset[(1, False)]])
    assert batch["pixel_values"].shape == (2, 3, height, width)
    assert batch["original_size"].tolist() == [[64, 96], [64, 96]]


def test_sampler_is_deterministic_per_epoch_and_applies_repeats():
    bucket_of = [(64, 64), (64, 64), (128, 32), (64, 64), (128, 32)]
    repeats = [3, 1, 2, 1, 1]
    sampler = BucketBatchSampler(bucket_of, repeats, batch_size=2, seed=5, random_flip=True)
    epoch0 = sampler.batches(0)
    assert epoch0 == BucketBatchSampler(bucket_of, repeats, batch_size=2, seed=5, random_flip=True).batches(0)
    assert epoch0 != sampler.batches(1)
    assert len(epoch0) == len(sampler) == 3 + 2  # 5 square items -> 3 batches of <= 2, 3 wide -> 2
    for epoch in range(3):
        batches = sampler.batches(epoch)
        seen = collections.Counter(index for batch in batches for index, _ in batch)
        assert seen == {0: 3, 1: 1, 2: 2, 3: 1, 4: 1}
        assert all(len({bucket_of[i] for i, _ in batch}) == 1 for batch in batches)  # one size per batch
    sampler.set_epoch(2)
    assert list(sampler) == sampler.batches(2)


def test_accelerate_deals_bucket_batches_out_to_processes_as_they_are():
    """Several processes: accelerate's BatchSamplerShard (what ``accelerator.prepare`` wraps the sampler
    in) must hand each process whole batches of one bucket, the same number to each process."""
    from accelerate.data_loader import BatchSamplerShard

    bucket_of = [(64, 64), (64, 64), (128, 32), (64, 64), (128, 32)]
    repeats = [3, 1, 2, 1, 1]
    sampler = BucketBatchSampler(bucket_of, repeats, batch_size=2, seed=5)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == len(BatchSamplerShard(sampler, num_processes=2))
        dealt = [batch for pair in zip(*shards) for batch in pair]
        batches = sampler.batches(epoch)
        assert dealt[:len(batches)] == batches  # every batch once, in order, none cut or topped up
        assert dealt[len(batches):] == batches[:len(dealt) - len(batches)]  # the odd one out: filled from the start
        assert all(len({bucket_of[i] for i, _ in batch}) == 1 for batch in dealt)


def test_generation_latents_are_reused_only_when_they_match(tmp_path):
    root = make_kohya_dataset(tmp_path / "ds", images_per_aspect=3)
    folder = root / "5_aesthetics"
    good = torch.randn(4, 8, 8)
    save_file({"latents": good}, str(folder / f"p00000_c000{LATENTS_SUFFIX}"), metadata={"vae_sha256": "abc"})
    save_file({"latents": torch.randn(4, 8, 8)}, str(folder / f"p00001_c000{LATENTS_SUFFIX}"),
              metadata={"vae_sha256": "other-vae"})
    save_file({"latents": torch.randn(4, 4, 4)}, str(folder / f"p00002_c000{LATENTS_SUFFIX}"),
              metadata={"vae_sha256": "abc"})  # wrong size for the bucket
    dataset = KohyaDataset(scan_training_set(root), resolution=64)
    encoded = []

    def encode(pixels):
        encoded.append(pixels.shape[0])
        return torch.zeros(pixels.shape[0], 4, 8, 8)

    reused = dataset.cache_latents(encode, vae_sha256="abc")
    assert reused == 1 and sum(encoded) == 2
    assert torch.equal(dataset.latents[0], good)
    assert torch.equal(dataset[(1, False)]["latents"], torch.zeros(4, 8, 8))
    assert "pixel_values" not in dataset[(0, False)]
    assert dataset.cache_latents(encode, vae_sha256=None) == 0  # no hash known: never reuse
    # The latent size follows the VAE's downsampling (16x here; the demo world's VAE keeps 32 px):
    # now the 4x4 latents are the ones that fit a 64 px bucket.
    coarse = KohyaDataset(scan_training_set(root), resolution=64, latent_scale=16)
    assert coarse.cache_latents(lambda px: torch.zeros(px.shape[0], 4, 4, 4), vae_sha256="abc") == 1
    assert torch.equal(coarse.latents[2], load_file(str(folder / f"p00002_c000{LATENTS_SUFFIX}"))["latents"])


def test_text_embedding_cache_is_per_caption(tmp_path):
    root = make_kohya_dataset(tmp_path / "ds", images_per_aspect=2)
    dataset = KohyaDataset(scan_training_set(root), resolution=64)
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return {"encoder_hidden_states": torch.stack([torch.full((77, 8), float(len(c))) for c in captions])}

    dataset.cache_text_embeddings(encode)
    assert sorted(calls[0]) == sorted({im.caption for im in dataset.images})
    example = dataset[(1, False)]
    assert torch.equal(example["encoder_hidden_states"], torch.full((77, 8), float(len(dataset.images[1].caption))))
