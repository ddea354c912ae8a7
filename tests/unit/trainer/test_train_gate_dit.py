"""Gate training on the DiT families (trainer/train_gate.py, issue 13): a tiny random-weight model of
each family in ComfyUI's file layout (``tiny_models/dit.py``), three aspect LoRAs in the family's
file format, CPU, offline.

The LoRAs: one trained by the real LoRA trainer on the data (attention and MLP Linears of the double-
and single-stream blocks, or Z-Image's blocks), and two copies of it scaled by -3 and -2, which push
the prediction the wrong way. The uniform (untrained) softmax gate applies their average (-4/3 of the
trained LoRA); training moves weight between them per layer and token, and the denoising loss on
fixed noise, noise levels and images must fall. The loss is measured through the trainer's own hooks with
the untrained and the trained gate, on the same draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models.dit import MODELS, write_tiny_dit
from tiny_models.lora_training import TINY_SIZE, make_kohya_dataset, tiny_lora_config

from versat2i.trainer import train_gate, train_lora
from versat2i.trainer.mol_file import load_mol

pytestmark = pytest.mark.family

ASPECTS = ("aesthetics", "geometry", "lowlevel")
OPPOSITE_SCALES = {"geometry": -3.0, "lowlevel": -2.0}
# Where each family's gate must reach (the LoRA targets of the table entry, train_feed_forward on)
BLOCK_LAYERS = {"flux1": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                          "transformer_blocks.0.ff_context.net.2", "single_transformer_blocks.0.proj_mlp",
                          "single_transformer_blocks.0.attn.to_v"),
                "flux2_klein": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                                "transformer_blocks.0.ff.linear_in", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                                "single_transformer_blocks.0.attn.to_out"),
                "zimage": ("layers.0.attention.to_q", "layers.0.feed_forward.w2", "noise_refiner.0.attention.to_out.0",
                           "context_refiner.0.feed_forward.w1")}


def aspect_loras(name: str, root: Path):
    """(tiny model, dataset, [trained LoRA, two opposite copies]) of ``name``, in the family's format."""
    from safetensors.torch import load_file, save_file

    from versat2i.models.lora_files import read_lora_metadata

    model = write_tiny_dit(name, root / "model")
    dataset = make_kohya_dataset(root / "dataset", aspects={a: 1 for a in ASPECTS}, images_per_aspect=2)
    loras = root / "loras"
    config = tiny_lora_config(root, model.diffusion_model, dataset, aspect="aesthetics", output_dir=str(loras),
                              output_name="aesthetics", work_dir=str(root / "lora-run"),
                              text_encoders=tuple(map(str, model.text_encoders)), vae=str(model.vae),
                              learning_rate=1e-2, max_train_steps=6, checkpointing_steps=1000, cache_latents=True,
                              cache_text_embeddings=True, train_feed_forward=True)
    good = train_lora.main(train_lora.parse_args(["--config", str(config.save(root / "lora.toml"))]))
    state, metadata = load_file(str(good)), read_lora_metadata(good)
    paths = [good]
    for aspect, scale in OPPOSITE_SCALES.items():
        opposite = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        path = loras / f"{aspect}.safetensors"
        save_file(opposite, str(path), metadata={**metadata, "versat2i_aspect": aspect})
        paths.append(path)
    return model, dataset, paths


def gate_config(root: Path, model, dataset: Path, paths, name: str, **overrides) -> Path:
    settings = dict(
        base_model=str(model.diffusion_model), text_encoders=tuple(map(str, model.text_encoders)), vae=str(model.vae),
        dataset_dir=str(dataset), loras=tuple(str(p) for p in paths), output_dir=str(paths[0].parent),
        output_name=name, work_dir=str(root / f"run-{name}"), resolution=TINY_SIZE, bucket_step=TINY_SIZE,
        train_batch_size=6, max_train_steps=12, learning_rate=0.2, checkpointing_steps=100, mixed_precision="no",
        seed=3, cache_latents=True, cache_text_embeddings=True, granularity="token", gate_kind="softmax",
        balance_weight=0.0,
    )
    settings.update(overrides)
    return train_gate.GateTrainConfig(**settings).save(root / f"{name}.toml")


def fixed_draw_loss(model, dataset: Path, mol_path: Path, *, trained: bool) -> float:
    """The flow-matching loss on the training images at noise levels 0.2 / 0.5 / 0.8 with fixed
    noise, through the trainer's hooks, with the MoL file's gate (``trained``) or a fresh uniform
    gate of the same form."""
    from versat2i.models.flow_matching import encode_latents, encode_prompts
    from versat2i.models.loading import load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.trainer.kohya_dataset import KohyaDataset
    from versat2i.trainer.mix_diffusers import DiffusersMixture, gate_for_layers, gate_form, mixture_layers
    from versat2i.trainer.objective import flow_loss
    from versat2i.training_set.folders import scan_training_set

    mol = load_mol(mol_path)
    base = load_base_model(model.diffusion_model, text_encoders=model.text_encoders, vae=model.vae,
                           compute_hash=False)
    loaded = [load_kohya_lora(p) for p in mol.lora_paths]
    layers = mixture_layers(base, [s for s, _ in loaded], [m for _, m in loaded])
    gate = mol.gate
    if not trained:
        gate = gate_for_layers(mol.aspects, layers, gate.granularity, gate.prompt_features,
                               kind=gate.kind, **gate_form(base.architecture))
        gate.input_scale.copy_(mol.gate.input_scale)  # the same normalisation: only the learned weights differ
        gate.calibrated = [True] * len(gate.layers)
    gate.eval()
    mixture = DiffusersMixture(gate, layers, denoiser=base.denoiser, architecture=base.architecture).attach(train=True)
    images = scan_training_set(dataset)
    data = KohyaDataset(images, resolution=TINY_SIZE)
    pixels = torch.stack([data.load_pixels(i)[0] for i in range(len(data))])
    generator = torch.Generator().manual_seed(11)
    guidance = base.variant.training_guidance if base.variant is not None else None
    losses = []
    with torch.no_grad():
        latents = encode_latents(base, pixels, torch.Generator().manual_seed(5))
        cond = encode_prompts(base, [im.caption for im in images], "cpu")
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = torch.full((len(images),), sigma)
            noisy = (1 - sigma) * latents + sigma * noise
            losses.append(float(flow_loss(base, base.denoiser, latents, noise, sigmas, noisy, cond,
                                          weighting_scheme="none", guidance=guidance)))
    mixture.remove()
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (tiny model, dataset, LoRA paths), the LoRA trained once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = aspect_loras(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-dev", "flux2-klein", "zimage"])
def test_the_gate_trains_over_the_dit_blocks_and_the_loss_falls(name, trained, tmp_path):
    model, dataset, paths = trained(name)
    mol_path = train_gate.main(train_gate.parse_args(["--config", str(gate_config(tmp_path, model, dataset, paths,
                                                                                  "token"))]))
    mol = load_mol(mol_path)
    family = MODELS[name][0]
    # the gate covers the Linears the family's LoRA targets, double- and single-stream (or Z-Image's) blocks
    for suffix in BLOCK_LAYERS[family]:
        assert f"transformer.{suffix}" in mol.gate.layers, (suffix, mol.gate.layers[:8])
    assert mol.base_model["arch"] == family and mol.gate.timestep_range == 1.0
    before = fixed_draw_loss(model, dataset, mol_path, trained=False)
    after = fixed_draw_loss(model, dataset, mol_path, trained=True)
    mass = mol.gate.prior.mean(0)
    print(f"{name}: loss with the uniform gate {before:.5f}, trained {after:.5f}; mean gate {mass.tolist()}")
    assert after < before
    assert (mass - 1 / 3).abs().max() > 0.05  # the mean gate moved away from uniform


def random_prompt_mol(model, paths, seed: int = 0) -> Path:
    """A prompt gate of random weights (sigmoid: free to combine) over the LoRAs, saved next to them."""
    from versat2i.models.loading import load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.trainer.mix_diffusers import gate_for_layers, gate_form, mixture_layers
    from versat2i.trainer.mol_file import expert_record, save_mol

    base = load_base_model(model.diffusion_model, text_encoders=model.text_encoders, vae=model.vae,
                           compute_hash=False)
    loaded = [load_kohya_lora(p) for p in paths]
    layers = mixture_layers(base, [s for s, _ in loaded], [m for _, m in loaded])
    gate = gate_for_layers(ASPECTS, layers, "prompt", base.architecture.gate_prompt_features(base.denoiser.config),
                           kind="sigmoid", **gate_form(base.architecture))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in gate.named_parameters():
            if "temperature" not in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    folder = paths[0].parent
    records = [expert_record(a, p, folder) for a, p in zip(ASPECTS, paths)]
    return save_mol(folder / "prompt.mol.safetensors", gate, records, overwrite=True)


@pytest.mark.slow
def test_mix_command_and_the_loops_evaluation_on_a_dit(trained, tmp_path):
    """FLUX.1-dev (its prompt gate reads the pooled CLIP-L vector): ``versat2i mix`` from the split files
    writes images that the mixture changes, and a prompt gate baked on the prompt gives dynamic mode's
    image (the distilled guidance input: no unconditional pass); the loop's evaluation path
    (``generate_candidates`` with ``MixtureAdapters``) samples with the gate and restores the base."""
    import argparse

    import numpy as np
    from PIL import Image

    from versat2i.loop.generate import GenerationSettings, generate_candidates
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.cli import add_mix_subcommand
    from versat2i.trainer.mix_diffusers import MixtureAdapters

    model, _, paths = trained("flux1-dev")
    mol = random_prompt_mol(model, paths)
    parser = argparse.ArgumentParser()
    add_mix_subcommand(parser.add_subparsers(dest="command"))

    def mix(name, *extra):
        files = [arg for path in model.text_encoders for arg in ("--text-encoder", str(path))]
        args = parser.parse_args(["mix", "--base-model", str(model.diffusion_model), *files, "--vae", str(model.vae),
                                  "--mol", str(mol), "--prompt", "a disc", "--steps", "2", "--size", "64",
                                  "--device", "cpu", "--out", str(tmp_path / name), *extra])
        assert args.func(args) == 0
        return np.asarray(Image.open(tmp_path / name / "0000.png"), dtype=np.int16)

    off = mix("off", "--mode", "dynamic", "--strength", "0")
    dynamic = mix("dynamic", "--mode", "dynamic")
    baked = mix("bake", "--mode", "bake")
    assert np.abs(dynamic - off).max() > 2  # the mixture changes the image
    assert np.abs(baked - dynamic).max() <= 1

    base = load_base_model(model.diffusion_model, text_encoders=model.text_encoders, vae=model.vae,
                           compute_hash=False)
    weights = {k: v.clone() for k, v in base.denoiser.state_dict().items()}
    settings = GenerationSettings(steps=2, width=64, height=64, guidance_scale=3.5)
    plain = generate_candidates(base, ["a disc"], k=1, settings=settings, device="cpu", show_progress=False)
    gated = generate_candidates(base, ["a disc"], k=1, settings=settings, device="cpu", show_progress=False,
                                adapters=MixtureAdapters(mol, base, mode="dynamic"))
    assert (gated.images - plain.images).abs().max() > 1e-3
    assert all(torch.equal(v, weights[k]) for k, v in base.denoiser.state_dict().items())
