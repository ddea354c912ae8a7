"""Gate training (trainer/train_gate.py) on a tiny SD1.5-shaped model with three tiny aspect LoRAs
(CPU, offline). The balancing test trains gates on the same data in the same test, with and
without the balancing term, and measures each LoRA's mean gate mass on the training images.
The LoRA fixture is trained by the real LoRA trainer (in-process, ~10 s)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tiny_models.lora_training import TINY_SIZE, make_kohya_dataset
from tiny_models.sd import build_tiny_sd15
from versat2i.trainer import train_gate
from versat2i.trainer.gate import GateUsage
from versat2i.trainer.mol_file import load_mol

ASPECTS = ("aesthetics", "geometry", "lowlevel")
# LoRA 0 is trained on the data (it lowers the denoising loss); LoRAs 1 and 2 are the same LoRA
# scaled by -2 and -1.5, which push the prediction the other way. Without balancing, the gate
# learns to route away from them (per layer, often completely).
OPPOSITE_SCALES = {"geometry": -2.0, "lowlevel": -1.5}
GLOBAL_FLOOR = 0.27  # uniform is 1/3; measured here: ~0.22 without balancing, ~0.32 with
LAYER_FLOOR = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from tiny_models.lora_training import tiny_lora_config
    from versat2i.trainer import train_lora

    root = tmp_path_factory.mktemp("tiny-gate")
    model = build_tiny_sd15(root)
    dataset = make_kohya_dataset(root / "dataset", aspects={a: 1 for a in ASPECTS}, images_per_aspect=2)
    loras = root / "loras"
    config = tiny_lora_config(root, model.folder, dataset, aspect="", output_dir=str(loras), output_name="aesthetics",
                              work_dir=str(root / "lora-run"), learning_rate=1e-2, max_train_steps=30,
                              checkpointing_steps=1000, cache_latents=True, cache_text_embeddings=True)
    good = train_lora.main(train_lora.parse_args(["--config", str(config.save(root / "lora.toml"))]))
    state = load_file(str(good))
    paths = [good]
    for aspect, scale in OPPOSITE_SCALES.items():
        opposite = {k: v * scale if k.endswith(".lora_up.weight") else v for k, v in state.items()}
        save_file(opposite, str(loras / f"{aspect}.safetensors"), metadata={"versat2i_aspect": aspect})
        paths.append(loras / f"{aspect}.safetensors")
    return model, dataset, paths


def gate_config(tmp: Path, tiny, name: str, **overrides) -> Path:
    model, dataset, paths = tiny
    settings = dict(
        base_model=str(model.folder), dataset_dir=str(dataset), loras=tuple(str(p) for p in paths),
        output_dir=str(paths[0].parent), output_name=name, work_dir=str(tmp / f"run-{name}"),
        resolution=TINY_SIZE, bucket_step=TINY_SIZE, train_batch_size=6, max_train_steps=25,
        learning_rate=0.2, checkpointing_steps=100, mixed_precision="no", seed=3, cache_latents=True,
        cache_text_embeddings=True, granularity="token",
    )
    settings.update(overrides)
    config = train_gate.GateTrainConfig(**settings)
    return config.save(tmp / f"{name}.toml")


def measure_mass(tiny, mol_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean gate value per LoRA over every gated layer and token ([N]), and per layer ([L, N]), on
    the training images at a few noise levels (the gate applied through the trainer's hooks)."""
    from versat2i.trainer.kohya_dataset import KohyaDataset, scan_training_set
    from versat2i.trainer.lora_io import load_kohya_lora
    from versat2i.trainer.mix_diffusers import DiffusersMixture, mixture_layers
    from versat2i.trainer.model_loading import encode_prompts, load_base_model

    model, dataset_dir, _ = tiny
    mol = load_mol(mol_path)
    base = load_base_model(model.folder, compute_hash=False)
    layers = mixture_layers(base, [load_kohya_lora(p)[0] for p in mol.lora_paths])
    gate = mol.gate.eval()
    mixture = DiffusersMixture(gate, layers, unet=base.unet).attach(train=True)
    images = scan_training_set(dataset_dir)
    data = KohyaDataset(images, resolution=TINY_SIZE)
    pixels = torch.stack([data.load_pixels(i)[0] for i in range(len(data))])
    generator = torch.Generator().manual_seed(11)
    usage = GateUsage(len(mol.aspects))
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.mean * base.vae_scaling_factor
        hidden, _ = encode_prompts(base, [im.caption for im in images], "cpu")
        gate.usage = usage
        for timestep in (100, 500, 900):
            noisy = base.noise_scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator),
                                                   torch.full((len(images),), timestep))
            base.unet(noisy, torch.full((len(images),), timestep), hidden)
    mixture.remove()
    per_layer = usage.layer_means()
    return usage.mean_mass(), torch.stack([per_layer[i] for i in sorted(per_layer)])


def run(config_path: Path) -> Path:
    return train_gate.main(train_gate.parse_args(["--config", str(config_path)]))


@pytest.mark.slow
def test_balancing_keeps_every_lora_above_a_floor(tiny, tmp_path):
    unbalanced = run(gate_config(tmp_path, tiny, "unbalanced", balance_weight=0.0))
    balanced = run(gate_config(tmp_path, tiny, "balanced", balance_loss="mole", balance_weight=1.0))
    (mass_without, layers_without), (mass_with, _) = measure_mass(tiny, unbalanced), measure_mass(tiny, balanced)
    print(f"mean gate mass without balancing {mass_without.tolist()}, with MoLE balancing {mass_with.tolist()}")
    assert mass_without.min().item() < GLOBAL_FLOOR  # routed away from the opposite LoRAs
    assert mass_without.argmax().item() == 0
    assert mass_with.min().item() > GLOBAL_FLOOR  # the balancing term kept every LoRA in use
    # MoLE's loss balances the mean over layers; single layers may still specialise. Switch's loss
    # balances each layer: far fewer layers leave an expert (almost) unused.
    switched = run(gate_config(tmp_path, tiny, "switch", balance_loss="switch", balance_weight=1.0))
    _, layers_switch = measure_mass(tiny, switched)
    collapsed_without = (layers_without.min(1).values < LAYER_FLOOR).float().mean().item()
    collapsed_switch = (layers_switch.min(1).values < LAYER_FLOOR).float().mean().item()
    print(f"layers with an expert below {LAYER_FLOOR}: {collapsed_without:.2f} without, {collapsed_switch:.2f} with switch")
    assert collapsed_without > 0.5 and collapsed_switch < collapsed_without / 2
    # the result is a loadable, hash-checked MoL file next to the LoRAs, with its training record
    mol = load_mol(balanced)
    assert balanced.parent == tiny[2][0].parent and balanced.name == "balanced.mol.safetensors"
    assert mol.aspects == ASPECTS and mol.training["steps"] == 25 and mol.training["balance_weight"] == 1.0
    assert all(mol.gate.calibrated) and (mol.gate.input_scale != 1.0).all()


@pytest.fixture(scope="module")
def prompt_mol(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt-gate")
    return run(gate_config(tmp, tiny, "prompt-switch", granularity="prompt", balance_loss="switch",
                           balance_weight=1.0, max_train_steps=6, cache_text_embeddings=False))


def test_prompt_gates_train(prompt_mol):
    mol = load_mol(prompt_mol)
    assert mol.gate.granularity == "prompt"
    assert mol.gate.weight.abs().sum() > 0  # the prompt projection trained
    torch.testing.assert_close(mol.gate.prior.sum(-1), torch.ones(len(mol.gate.layers)))


def test_diffusers_bake_equals_dynamic_for_prompt_gates(tiny, prompt_mol):
    from versat2i.trainer.mix_diffusers import load_mixture, prompt_context
    from versat2i.trainer.model_loading import load_base_model

    base = load_base_model(tiny[0].folder, compute_hash=False)
    mol, mixture = load_mixture(base, prompt_mol, enabled=["aesthetics", "lowlevel"], strength=0.8)
    context = prompt_context(base, "a picture of shape number 1", "cpu")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base.unet(latents, 500, context).sample
        mixture.attach()
        dynamic = base.unet(latents, 500, context).sample
        mixture.remove()
        mixture.bake(mol.gate.merge_weights(context, mixture.mask))
        baked = base.unet(latents, 500, context).sample
        mixture.remove()
        restored = base.unet(latents, 500, context).sample
    assert (dynamic - plain).abs().max() > 1e-3
    torch.testing.assert_close(baked, dynamic, rtol=1e-4, atol=1e-5)
    assert torch.equal(restored, plain)  # remove() undoes the merge exactly


def test_mix_command_writes_images(tiny, prompt_mol, tmp_path):
    import argparse

    from versat2i.trainer.cli import MIX_MODES, add_mix_subcommand
    from versat2i.trainer.mix_diffusers import MODES

    assert MIX_MODES == MODES  # the CLI's choices (kept torch-free) follow the library's modes
    parser = argparse.ArgumentParser()
    add_mix_subcommand(parser.add_subparsers(dest="command"))
    for mode in ("dynamic", "bake", "equal"):
        args = parser.parse_args(["mix", "--base-model", str(tiny[0].folder), "--mol", str(prompt_mol), "--prompt", "a disc",
                                  "--steps", "2", "--device", "cpu", "--out", str(tmp_path / mode), "--mode", mode,
                                  "--disable-aspects", "geometry"])
        assert args.func(args) == 0
        assert (tmp_path / mode / "0000.png").is_file()
    with pytest.raises(ValueError, match="already exists"):
        args.func(args)


def test_print_config_round_trips(capsys):
    import argparse

    from versat2i.trainer.cli import add_train_gate_subcommand

    parser = argparse.ArgumentParser()
    add_train_gate_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-gate", "--print-config"])
    assert args.func(args) == 0
    config = train_gate.GateTrainConfig.from_toml(capsys.readouterr().out)
    assert config.balance_loss == "mole" and config.granularity == "token" and len(config.loras) == 2


def test_config_errors_are_clear(tiny, tmp_path):
    model, dataset, paths = tiny
    config = train_gate.GateTrainConfig(
        base_model=str(model.folder), dataset_dir=str(dataset), loras=(str(paths[0]),), output_dir=str(tmp_path),
        output_name="x", work_dir=str(tmp_path / "w"), granularity="word", balance_loss="entropy",
    )
    message = "\n".join(config.problems())
    assert "at least 2 aspect LoRAs" in message
    assert "granularity='word'" in message and "balance_loss='entropy'" in message
    assert "not inside output_dir" in message
    assert config.output_path == tmp_path / "x.mol.safetensors"


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="kills process groups with POSIX signals")
def test_killed_run_resumes_to_the_same_gate(tiny, tmp_path):
    """Under ``accelerate launch``: a run killed part-way resumes from its last checkpoint and ends
    with the gate an uninterrupted run writes; the MoL never appears half-written."""
    from versat2i.trainer.launcher import LaunchOptions, TrainingFailed, run_training

    def launch(config_path, **kwargs):
        return run_training(["--config", str(config_path), "--resume", "latest"], program=train_gate.GATE_PROGRAM,
                            options=LaunchOptions(cpu=True), **kwargs)

    settings = dict(max_train_steps=8, checkpointing_steps=3, balance_weight=0.5)
    reference = launch(gate_config(tmp_path, tiny, "reference", **settings))
    killed_config = gate_config(tmp_path, tiny, "killed", **settings)
    started = {}

    def kill_at_step(event):
        if event["event"] == "step" and event["step"] == 5:
            os.killpg(started["child"].pgid, signal.SIGKILL)

    with pytest.raises(TrainingFailed):
        launch(killed_config, on_event=kill_at_step, on_start=lambda child: started.setdefault("child", child))
    output = Path(tiny[2][0].parent) / "killed.mol.safetensors"
    assert not output.exists()
    resumed = launch(killed_config)
    start = next(e for e in resumed.events if e["event"] == "start")
    assert start["start_step"] == 3
    a, b = load_mol(reference.done["mol_path"]).gate.state_dict(), load_mol(resumed.done["mol_path"]).gate.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
