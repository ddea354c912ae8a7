"""Candidate generation with diffusers (loop/generate.py) on tiny random-weight models built in code.

Offline, one thread. The references are independent: an image sampled alone vs inside a batch; a
LoRA applied through our kohya file + diffusers' load_lora_weights vs the same LoRA injected with
peft into the model it was saved from; latents decoded by the VAE vs the saved PNG.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tiny_models.sd import build_tiny_model, build_tiny_sd15

from versat2i.loop.generate import (
    INDEX_NAME,
    SUMMARY_NAME,
    GenerationSettings,
    generate_candidates,
    plan_candidates,
    read_candidates,
)
from versat2i.models.loading import load_base_model
from versat2i.models.lora_files import save_kohya_lora
from versat2i.models.pipelines import LoraAdapters, build_pipeline, equal_weight_merge, single_lora
from versat2i.safe_io import TargetExistsError
from versat2i.training_set.layout import LATENTS_SUFFIX

FAST = GenerationSettings(steps=3, guidance_scale=4.0, batch_size=4)
PROMPTS = ["a red circle", "a blue square"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def assert_same(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    error = float((actual - expected).abs().max())
    assert error <= tolerance, f"max difference {error:.3g} > {tolerance}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def base(tiny):
    return load_base_model(tiny.folder)


def generate(model, prompts=PROMPTS, **kwargs):
    kwargs.setdefault("settings", FAST)
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("show_progress", False)
    return generate_candidates(model, prompts, **kwargs)


# -- the seed grid -------------------------------------------------------------------------------

def test_plan_derives_one_seed_per_image_from_the_base_seed():
    plan = plan_candidates(["a", "b"], k=3, base_seed=10)
    assert [(r.prompt, r.seed, r.prompt_index, r.candidate_index, r.image_id) for r in plan] == [
        ("a", 10, 0, 0, "p00000_c000"), ("a", 11, 0, 1, "p00000_c001"), ("a", 12, 0, 2, "p00000_c002"),
        ("b", 13, 1, 0, "p00001_c000"), ("b", 14, 1, 1, "p00001_c001"), ("b", 15, 1, 2, "p00001_c002"),
    ]


def test_plan_with_explicit_seeds_shared_or_per_image():
    shared = plan_candidates(["a", "b"], seeds=[7, 3])
    assert [r.seed for r in shared] == [7, 3, 7, 3] and [r.candidate_index for r in shared] == [0, 1, 0, 1]
    per_image = plan_candidates(["a", "b"], k=2, seeds=[1, 2, 3, 4])
    assert [r.seed for r in per_image] == [1, 2, 3, 4]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompts": [], "k": 2}, "no prompt given"),
    ({"prompts": "a cat", "k": 2}, "expected a list"),
    ({"prompts": ["a", " "], "k": 2}, r"prompts\[1\]: empty prompt"),
    ({"prompts": ["a", "a "], "k": 2}, "repeats prompt 0"),
    ({"prompts": ["a"], "k": 0}, "k=0"),
    ({"prompts": ["a", "b"], "k": 2, "seeds": [1, 2, 3]}, "3 seeds for 2 prompt"),
    ({"prompts": ["a"], "seeds": [5, 5]}, "same seed twice"),
    ({"prompts": ["a"], "k": 2, "base_seed": -1}, "base_seed=-1"),
])
def test_plan_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_candidates(**kwargs)


@pytest.mark.parametrize(("settings", "message"), [
    (GenerationSettings(steps=0), "steps=0"),
    (GenerationSettings(width=60), "width=60: must be a multiple of 8"),
    (GenerationSettings(scheduler="nope"), "scheduler='nope'"),
    (GenerationSettings(batch_size=0), "batch_size=0"),
])
def test_bad_settings_fail_before_anything_loads(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "missing-model", settings=settings)


# -- determinism and batch independence ----------------------------------------------------------

def test_an_image_depends_only_on_its_prompt_and_seed(base):
    grid = generate(base, k=3, seeds=[5, 6, 7]).images  # batches of 4 mix the two prompts
    assert grid.shape == (6, 64, 64, 3) and 0 <= float(grid.min()) and float(grid.max()) <= 1
    again = generate(base, k=3, seeds=[5, 6, 7]).images
    assert torch.equal(grid, again)
    # Image (prompt 1, seed 6) sampled alone, and in a batch with other company.
    alone = generate(base, ["a blue square"], seeds=[6], settings=GenerationSettings(**{**FAST.__dict__,
                                                                                         "batch_size": 1})).images
    assert_same(alone[0], grid[4])
    other_batch = generate(base, ["a blue square", "a green triangle"], seeds=[9, 6]).images
    assert_same(other_batch[1], grid[4])
    # Different seeds (and prompts) give different images.
    assert float((grid[0] - grid[1]).abs().max()) > 1e-2
    assert float((grid[0] - grid[3]).abs().max()) > 1e-3


def test_batches_sampled_side_by_side_give_the_same_images_and_folder(base, tmp_path):
    """``workers=2``: two batches at once, each thread with its own scheduler copy (euler_a keeps step
    state and draws noise each step); the same images, index and summary as one at a time."""
    settings = GenerationSettings(steps=3, guidance_scale=4.0, batch_size=2, scheduler="euler_a")
    threads = torch.get_num_threads()
    one = generate(base, k=3, seeds=[1, 2, 3], settings=settings, out_dir=tmp_path / "one", return_images=True)
    done = []
    two = generate(base, k=3, seeds=[1, 2, 3], settings=settings, out_dir=tmp_path / "two", return_images=True,
                   workers=2, progress=lambda n, total: done.append((n, total)))
    assert torch.equal(one.images, two.images) and done == [(2, 6), (4, 6), (6, 6)]
    for name in sorted(p.name for p in (tmp_path / "one").iterdir()):
        if name != "generation.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert torch.get_num_threads() == threads  # restored


def test_stochastic_scheduler_is_batch_independent_too(base):
    settings = GenerationSettings(steps=3, guidance_scale=4.0, batch_size=3, scheduler="euler_a")
    grid = generate(base, k=3, seeds=[1, 2, 3], settings=settings).images
    alone = generate(base, ["a blue square"], seeds=[3], settings=settings).images
    assert_same(alone[0], grid[5])
    with_ddim = generate(base, ["a blue square"], seeds=[3], settings=GenerationSettings(steps=3, scheduler="ddim",
                                                                                         guidance_scale=4.0)).images
    assert float((with_ddim[0] - alone[0]).abs().max()) > 1e-4  # the scheduler is really swapped in


# -- the output folder ------------------------------------------------------------------------------

def test_folder_has_images_index_latents_and_summary(base, tmp_path):
    out = tmp_path / "candidates"
    result = generate(base, k=2, base_seed=3, out_dir=out, save_latents=True, return_images=True)
    assert result.folder == out and not list(tmp_path.glob(".candidates*"))  # no temporary left
    lines = [json.loads(line) for line in (out / INDEX_NAME).read_text().splitlines()]
    assert lines == [
        {"file": f"p0000{p}_c00{c}.png", "prompt": PROMPTS[p], "seed": 3 + 2 * p + c, "prompt_index": p,
         "candidate_index": c, "image_id": f"p0000{p}_c00{c}", "latents": f"p0000{p}_c00{c}{LATENTS_SUFFIX}"}
        for p in range(2) for c in range(2)
    ]
    records, summary = read_candidates(out)
    assert [r.to_dict() for r in records] == lines
    assert summary["settings"]["width"] == 64 and summary["k"] == 2 and summary["images"] == 4
    assert summary["vae_sha256"] == base.source_sha256 and json.loads((out / SUMMARY_NAME).read_text()) == summary
    for i, record in enumerate(records):
        png = np.asarray(Image.open(out / record.file).convert("RGB"))
        expected = result.images[i].mul(255).round().to(torch.uint8).numpy()
        assert np.array_equal(png, expected)
        with safe_open(str(out / record.latents), "pt") as handle:
            assert handle.metadata() == {"vae_sha256": base.source_sha256}
            latents = handle.get_tensor("latents")
        assert latents.shape == (4, 8, 8) and latents.dtype == torch.float32
        assert torch.equal(latents, result.latents[i])
        # "Already multiplied by the VAE scaling factor": dividing and decoding gives the image.
        with torch.no_grad():
            decoded = base.vae.decode(latents[None] / base.vae_scaling_factor).sample
        assert_same(decoded[0].permute(1, 2, 0).add(1).div(2).clamp(0, 1), result.images[i], 1e-4)


def test_existing_folder_is_refused_before_work_unless_overwrite(base, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TargetExistsError, match="already exists"):
        generate(tmp_path / "no-such-model", out_dir=out)
    assert (out / "keep.txt").read_text() == "mine"
    generate(base, ["a cat"], k=1, out_dir=out, overwrite=True)
    assert (out / "p00000_c000.png").is_file() and not (out / "keep.txt").exists()


def test_failure_leaves_no_folder(base, tmp_path):
    @contextlib.contextmanager
    def broken(pipe):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError, match="boom"):
        generate(base, k=1, out_dir=tmp_path / "out", adapters=broken)
    assert list(tmp_path.iterdir()) == []


def test_default_scheduler_matches_the_folders_own_pipeline(tiny, base):
    """Pipeline assembled from load_base_model's modules == diffusers loading the folder itself."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny.folder), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    expected = pipe(["a red circle"] * 2, num_inference_steps=3, guidance_scale=4.0, generator=generators,
                    output_type="pt").images.permute(0, 2, 3, 1)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert_same(generate(base, ["a red circle"], seeds=[1, 2]).images, expected)


def test_single_file_checkpoint_gives_the_same_images(tiny, base):
    from_folder = generate(base, k=2, seeds=[1, 2]).images
    from_file = generate(tiny.checkpoint, k=2, seeds=[1, 2], config_dir=tiny.folder).images
    assert_same(from_file, from_folder)


def test_sdxl_uses_the_xl_pipeline(tmp_path):
    sdxl = load_base_model(build_tiny_model("sdxl", tmp_path).folder, compute_hash=False)
    assert type(build_pipeline(sdxl)).__name__ == "StableDiffusionXLPipeline"
    images = generate(sdxl, ["a cat"], seeds=[1, 2], settings=GenerationSettings(steps=2, guidance_scale=3.0)).images
    assert images.shape == (2, 64, 64, 3) and float((images[0] - images[1]).abs().max()) > 1e-3


# -- adapters -------------------------------------------------------------------------------------

def lora_model(tiny, seed: int, adapter_names=("a",)):
    """A fresh copy of the tiny model with random, non-zero peft LoRAs on the UNet and text encoder."""
    from peft import LoraConfig, inject_adapter_in_model

    model = load_base_model(tiny.folder, compute_hash=False)
    generator = torch.Generator().manual_seed(seed)
    for name in adapter_names:
        model.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=UNET_TARGETS), adapter_name=name)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS), model.text_encoders[0],
                                adapter_name=name)
    with torch.no_grad():
        for module in (model.denoiser, model.text_encoders[0]):
            for key, parameter in module.named_parameters():
                if "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def save_lora(model, path: Path, adapter_name: str = "a") -> Path:
    return save_kohya_lora(path, denoiser=model.denoiser, text_encoders=model.text_encoders, adapter_name=adapter_name,
                           metadata={"versat2i_aspect": "test"})


@pytest.fixture(scope="module")
def two_loras(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    model = lora_model(tiny, seed=3, adapter_names=("a", "b"))
    return model, save_lora(model, folder / "a.safetensors", "a"), save_lora(model, folder / "b.safetensors", "b")


@pytest.mark.parametrize("fuse", [True, False])
def test_kohya_lora_file_equals_the_peft_model_it_was_saved_from(base, two_loras, fuse):
    reference_model, path_a, _ = two_loras
    reference_model.denoiser.set_adapters(["a"])
    for layer in reference_model.text_encoders[0].modules():
        if hasattr(layer, "set_adapter") and hasattr(layer, "lora_A"):
            layer.set_adapter("a")
    expected = generate(reference_model, k=2, seeds=[1, 2]).images
    plain = generate(base, k=2, seeds=[1, 2]).images
    with_lora = generate(base, k=2, seeds=[1, 2], adapters=LoraAdapters([path_a], fuse=fuse)).images
    assert float((with_lora - plain).abs().max()) > 1e-2  # the LoRA changes the output
    assert_same(with_lora, expected, 1e-4 if fuse else 1e-5)
    # The pipeline is restored when the with-block ends.
    assert_same(generate(base, k=2, seeds=[1, 2]).images, plain)
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer)
                   for part in (base.denoiser, base.text_encoders[0]) for m in part.modules())


def test_equal_weight_merge_equals_peft_adapters_at_half_weight(base, two_loras):
    reference_model, path_a, path_b = two_loras
    reference_model.denoiser.set_adapters(["a", "b"], weights=[0.5, 0.5])
    text_encoder = reference_model.text_encoders[0]
    from peft.tuners.lora import LoraLayer

    for layer in text_encoder.modules():
        if isinstance(layer, LoraLayer):
            layer.set_adapter(["a", "b"])
            for name in ("a", "b"):
                layer.set_scale(name, 0.5)
    expected = generate(reference_model, k=2, seeds=[1, 2]).images
    merged = generate(base, k=2, seeds=[1, 2], adapters=equal_weight_merge([path_a, path_b], fuse=False)).images
    assert_same(merged, expected)
    only_a = generate(base, k=2, seeds=[1, 2], adapters=single_lora(path_a)).images
    assert float((merged - only_a).abs().max()) > 1e-3


def test_denoiser_only_loras_load_as_diffusers_loads_them_without_its_notices(base, two_loras, tmp_path, caplog,
                                                                              recwarn):
    # Our trainer's LoRAs have no text-encoder keys: they go into the denoiser alone, which must
    # give what diffusers' load_lora_weights gives, without its "No LoRA keys associated to
    # CLIPTextModel" notice; a merge of two must not raise peft's several-adapters warning.
    import logging

    reference_model, _, _ = two_loras
    paths = [save_kohya_lora(tmp_path / f"{name}.safetensors", denoiser=reference_model.denoiser, text_encoders=(),
                             adapter_name=name) for name in ("a", "b")]
    caplog.set_level(logging.WARNING)
    merged = generate(base, k=2, seeds=[1, 2], adapters=equal_weight_merge(paths, fuse=False)).images
    assert not [r for r in caplog.records if "No LoRA keys" in r.getMessage()]
    assert not [w for w in recwarn if "peft_config" in str(w.message)]

    @contextlib.contextmanager
    def with_diffusers_loader(pipe):
        from versat2i.models.lora_files import load_kohya_lora

        for name, path in zip(("a", "b"), paths):
            pipe.load_lora_weights(dict(load_kohya_lora(path)[0]), adapter_name=name)
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
        try:
            yield pipe
        finally:
            pipe.unload_lora_weights()

    expected = generate(base, k=2, seeds=[1, 2], adapters=with_diffusers_loader).images
    assert any("No LoRA keys" in r.getMessage() for r in caplog.records)  # what the notice looks like
    assert_same(merged, expected, 0.0)
    assert float((merged - generate(base, k=2, seeds=[1, 2]).images).abs().max()) > 1e-3


def test_adapters_nest_and_restore_the_outer_ones(base, two_loras):
    _, path_a, path_b = two_loras
    only_a = generate(base, k=1, seeds=[4], adapters=single_lora(path_a, fuse=False)).images
    only_b = generate(base, k=1, seeds=[4], adapters=single_lora(path_b, fuse=False)).images
    with single_lora(path_a, fuse=False)(build_pipeline(base)):
        assert_same(generate(base, k=1, seeds=[4]).images, only_a)
        assert_same(generate(base, k=1, seeds=[4], adapters=single_lora(path_b)).images, only_b, 1e-4)
        assert_same(generate(base, k=1, seeds=[4]).images, only_a)  # the outer LoRA is active again
    assert float((only_a - only_b).abs().max()) > 1e-3


def test_custom_adapter_hook_wraps_generation(base):
    events = []

    @contextlib.contextmanager
    def hook(pipe):
        events.append(("enter", type(pipe).__name__))
        original = pipe.unet.conv_out.bias.detach().clone()
        with torch.no_grad():
            pipe.unet.conv_out.bias.add_(0.5)
        try:
            yield
        finally:
            with torch.no_grad():
                pipe.unet.conv_out.bias.copy_(original)
            events.append(("exit",))

    plain = generate(base, ["a cat"], seeds=[1]).images
    hooked = generate(base, ["a cat"], seeds=[1], adapters=hook).images
    assert events == [("enter", "StableDiffusionPipeline"), ("exit",)]
    assert float((hooked - plain).abs().max()) > 1e-3
    assert_same(generate(base, ["a cat"], seeds=[1]).images, plain)


def test_missing_lora_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA file"):
        LoraAdapters([tmp_path / "nope.safetensors"])


# -- CLI --------------------------------------------------------------------------------------------

def test_cli_generate_writes_a_folder_versat2i_score_reads(tiny, tmp_path, capsys):
    from versat2i.cli import main
    from versat2i.rewards.cli import list_images, read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# demo\na red circle\n\na blue square\n", encoding="utf-8")
    out = tmp_path / "gen"
    code = main(["generate", "--checkpoint", str(tiny.folder), "--prompts", str(prompts), "--k", "2", "--out",
                 str(out), "--steps", "2", "--device", "cpu", "--seed", "100", "--save-latents", "--quiet"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    images = list_images(out)
    info = read_prompts(images, out, out / INDEX_NAME)  # the scoring CLI accepts our index as is
    assert info["prompts"] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert info["seeds"] == [100, 101, 102, 103] and info["candidate_indices"] == [0, 1, 0, 1]
    assert len(list(out.glob(f"*{LATENTS_SUFFIX}"))) == 4


@pytest.mark.parametrize(("args", "message"), [
    (["--k", "0"], "k=0"),
    (["--width", "50"], "width=50"),
    (["--seeds", "1,x"], "'x' is not a whole number"),
    (["--lora", "missing.safetensors"], "not found"),
])
def test_cli_generate_bad_input_is_one_error_line(tiny, tmp_path, capsys, args, message):
    from versat2i.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code = main(["generate", "--checkpoint", str(tiny.folder), "--prompts", str(prompts), "--out",
                 str(tmp_path / "out"), *args])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


# -- several processes --------------------------------------------------------------------------------

SPLIT_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from versat2i.loop.generate import GenerationSettings, generate_candidates
result = generate_candidates(sys.argv[1], ["a red circle", "a blue square", "a cow"], k=3, device="cpu",
                             settings=GenerationSettings(steps=2, batch_size=2), out_dir=sys.argv[2],
                             show_progress=False)
from accelerate import PartialState
rank = PartialState().process_index
# One file per process (printed lines of two processes can interleave).
open(f"{sys.argv[2]}.rank{rank}", "w").write(str(len(result.records)))
"""


@pytest.mark.slow
def test_two_processes_split_the_grid_and_write_one_folder(tiny, tmp_path):
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tiny.folder), str(tmp_path / "split")],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    counts = sorted(int((tmp_path / f"split.rank{rank}").read_text()) for rank in (0, 1))
    assert counts == [4, 5]  # each process sampled its share of the 9 images
    single = generate(tiny.folder, ["a red circle", "a blue square", "a cow"], k=3,
                      settings=GenerationSettings(steps=2, batch_size=2), out_dir=tmp_path / "single")
    split_records, _ = read_candidates(tmp_path / "split")
    assert [r.to_dict() for r in split_records] == [r.to_dict() for r in single.records]
    for record in split_records:
        a = np.asarray(Image.open(tmp_path / "split" / record.file), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "single" / record.file), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # float rounding of a different batch composition, at most 1 level
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_accelerate_launch_of_the_cli_splits_a_single_file_checkpoint_between_two_processes(tiny, tmp_path):
    """What the README documents for several GPUs: ``accelerate launch ... -m versat2i.cli generate``
    (here two CPU processes, gloo) on a single-file checkpoint, against the plain command."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na cow\n")
    arguments = ["-m", "versat2i.cli", "generate", "--checkpoint", str(tiny.checkpoint), "--config-dir",
                 str(tiny.folder), "--prompts", str(prompts), "--k", "3", "--steps", "2", "--device", "cpu",
                 "--batch-size", "2", "--quiet"]
    # HF_HOME: no accelerate config of the user's changes the launch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         *arguments, "--out", str(tmp_path / "split")],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
    plain = subprocess.run([sys.executable, *arguments, "--out", str(tmp_path / "plain")],
                           capture_output=True, text=True, env=env, timeout=300, check=False)
    assert plain.returncode == 0, plain.stderr[-3000:]
    summary = json.loads((tmp_path / "split" / SUMMARY_NAME).read_text())
    assert summary["processes"] == 2 and summary["model"]["source_format"] != "diffusers"
    split_records, _ = read_candidates(tmp_path / "split")
    plain_records, _ = read_candidates(tmp_path / "plain")
    assert [r.to_dict() for r in split_records] == [r.to_dict() for r in plain_records]
    assert len(split_records) == 9
    for record in split_records:
        a = np.asarray(Image.open(tmp_path / "split" / record.file), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "plain" / record.file), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # float rounding of a different batch composition, at most 1 level
