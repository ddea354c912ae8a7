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

from versat2i.aspects import ASPECTS
from versat2i.trainer import train_gate
from versat2i.trainer.gate import GateUsage
from versat2i.trainer.mol_file import load_mol

GATE_TEST_ASPECTS = ("aesthetics", "geometry", "lowlevel")  # one trained LoRA, two opposed
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
    dataset = make_kohya_dataset(root / "dataset", aspects={a: 1 for a in GATE_TEST_ASPECTS}, images_per_aspect=2)
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
        cache_text_embeddings=True, granularity="token", gate_kind="softmax",  # MoLE's gate: what these tests measure
    )
    settings.update(overrides)
    config = train_gate.GateTrainConfig(**settings)
    return config.save(tmp / f"{name}.toml")


def measure_mass(tiny, mol_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean gate value per LoRA over every gated layer and token ([N]), and per layer ([L, N]), on
    the training images at a few noise levels (the gate applied through the trainer's hooks)."""
    from versat2i.models.loading import encode_prompts, load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.trainer.kohya_dataset import KohyaDataset
    from versat2i.trainer.mix_diffusers import DiffusersMixture, mixture_layers
    from versat2i.training_set.folders import scan_training_set

    model, dataset_dir, _ = tiny
    mol = load_mol(mol_path)
    base = load_base_model(model.folder, compute_hash=False)
    layers = mixture_layers(base, [load_kohya_lora(p)[0] for p in mol.lora_paths])
    gate = mol.gate.eval()
    mixture = DiffusersMixture(gate, layers, denoiser=base.denoiser).attach(train=True)
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
            base.denoiser(noisy, torch.full((len(images),), timestep), hidden)
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
    print(f"layers with an expert below {LAYER_FLOOR}: {collapsed_without:.2f} without, "
          f"{collapsed_switch:.2f} with switch")
    assert collapsed_without > 0.5 and collapsed_switch < collapsed_without / 2
    # the result is a loadable, hash-checked MoL file next to the LoRAs, with its training record
    mol = load_mol(balanced)
    assert balanced.parent == tiny[2][0].parent and balanced.name == "balanced.mol.safetensors"
    assert mol.aspects == GATE_TEST_ASPECTS and mol.training["steps"] == 25 and mol.training["balance_weight"] == 1.0
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
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import load_mixture, prompt_context

    base = load_base_model(tiny[0].folder, compute_hash=False)
    _, mixture = load_mixture(base, prompt_mol, enabled=["aesthetics", "lowlevel"], strength=0.8)
    text = "a picture of shape number 1"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = prompt_context(base, text, "cpu")
        plain = base.denoiser(latents, 500, context).sample
        mixture.attach()
        dynamic = base.denoiser(latents, 500, prompt_context(base, text, "cpu")).sample
        mixture.remove()
        baked_context = mixture.bake_on_prompt(lambda: prompt_context(base, text, "cpu"))
        baked = base.denoiser(latents, 500, baked_context).sample
        mixture.remove()
        restored = base.denoiser(latents, 500, context).sample
    assert (dynamic - plain).abs().max() > 1e-3
    torch.testing.assert_close(baked, dynamic, rtol=1e-4, atol=1e-5)
    assert torch.equal(restored, plain)  # remove() undoes the merge exactly


# -- LoRAs that adapt the text encoder and the 1x1-conv proj_in / proj_out, unequal ranks -------------

MIXED_RANKS = (2, 4, 4, 8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny SD1.5 model, four random kohya LoRAs on the UNet attention, proj_in / proj_out (1x1
    Conv2d) and the text encoder, ranks 2/4/4/8 (geometry skips every attn1 layer), and a random
    token and prompt MoL file over them."""
    from tiny_models.sd import make_kohya_lora

    from versat2i.models.loading import load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.trainer.mix_diffusers import gate_for_layers, mixture_layers
    from versat2i.trainer.mol_file import expert_record, save_mol

    root = tmp_path_factory.mktemp("mixed")
    model = build_tiny_sd15(root)
    folder = root / "loras"
    folder.mkdir()
    paths = [make_kohya_lora("sd15", folder / f"{aspect}.safetensors", seed=20 + i, rank=rank, alpha=rank / 2,
                             exclude=("attn1",) if aspect == "geometry" else ())
             for i, (aspect, rank) in enumerate(zip(ASPECTS, MIXED_RANKS))]
    base = load_base_model(model.folder, compute_hash=False)
    layers = mixture_layers(base, [load_kohya_lora(p)[0] for p in paths])
    mols = {}
    for seed, granularity in enumerate(("token", "prompt")):
        prompt_features = base.architecture.gate_prompt_features(base.denoiser.config)
        gate = gate_for_layers(ASPECTS, layers, granularity, prompt_features)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in gate.named_parameters():
                if "temperature" not in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=g) * 2.0)
            gate.prior.copy_(torch.softmax(torch.randn(gate.prior.shape, generator=g), -1))
            gate.input_scale.copy_(torch.rand(gate.input_scale.shape, generator=g) * 4 + 0.5)
        records = [expert_record(a, p, folder) for a, p in zip(ASPECTS, paths)]
        mols[granularity] = save_mol(folder / f"{granularity}.mol.safetensors", gate, records)
    return model, paths, mols, layers


def test_mixed_loras_cover_convs_and_the_text_encoder(mixed):
    _, _, _, layers = mixed
    convs = [layer for layer in layers if layer.channels_first]
    assert convs and all(tuple(layer.module.kernel_size) == (1, 1) for layer in convs)
    assert any(layer.on_text_encoder for layer in layers)
    skipped = [layer for layer in layers if layer.experts[2] is None]
    assert skipped and all("attn1" in layer.key for layer in skipped)
    assert {e.rank for layer in layers for e in layer.experts if e is not None} == set(MIXED_RANKS)


def test_diffusers_bake_on_prompt_equals_dynamic_when_the_loras_adapt_the_text_encoder(mixed):
    """Dynamic mode (and training) evaluates the prompt gate on the context the *mixed* text
    encoder makes; bake_on_prompt must do the same. Baking on the base text encoder's context
    (what `versat2i mix --mode bake` did) gives another gate."""
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import load_mixture, prompt_context

    model, _, mols, _ = mixed
    base = load_base_model(model.folder, compute_hash=False)
    mol, mixture = load_mixture(base, mols["prompt"], enabled=["aesthetics", "geometry", "lowlevel"], strength=0.8)
    text = "a red disc on a blue ground"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_context = prompt_context(base, text, "cpu")
        mixture.attach()
        dynamic_context = prompt_context(base, text, "cpu")  # through the gated text-encoder layers
        dynamic = base.denoiser(latents, 500, dynamic_context).sample
        mixture.remove()
        assert (dynamic_context - base_context).abs().max() > 1e-3  # the LoRAs adapt the text encoder
        baked_context = mixture.bake_on_prompt(lambda: prompt_context(base, text, "cpu"))
        baked = base.denoiser(latents, 500, baked_context).sample
        mixture.remove()
        torch.testing.assert_close(baked_context, dynamic_context, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(baked, dynamic, rtol=1e-4, atol=1e-5)
        # the old way: the gate evaluated on the base encoder's context
        mixture.bake(mol.gate.merge_weights(base_context, mixture.mask))
        old_way = base.denoiser(latents, 500, prompt_context(base, text, "cpu")).sample
        mixture.remove()
    assert (old_way - dynamic).abs().max() > 1e-3


def test_diffusers_fused_token_gates_equal_the_training_path(mixed):
    """The inference hooks (gate folded into the stacked A) against the trainer's differentiable
    path (separate gate, mixture_delta), on Linear and 1x1-conv layers with unequal ranks."""
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import load_mixture, prompt_context

    model, _, mols, _ = mixed
    base = load_base_model(model.folder, compute_hash=False)
    mol, mixture = load_mixture(base, mols["token"], enabled=["aesthetics", "alignment", "geometry"], strength=0.7)
    mol.gate.eval()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outputs = {}
    with torch.no_grad():
        plain = base.denoiser(latents, 300, prompt_context(base, "a disc", "cpu").expand(2, -1, -1)).sample
        for train in (False, True):
            mixture.attach(train=train)
            context = prompt_context(base, "a disc", "cpu").expand(2, -1, -1)
            outputs[train] = base.denoiser(latents, 300, context).sample
            mixture.remove()
    assert (outputs[False] - plain).abs().max() > 1e-3
    torch.testing.assert_close(outputs[False], outputs[True], rtol=1e-4, atol=1e-5)


def test_diffusers_dynamic_with_one_lora_equals_diffusers_lora_loading(mixed):
    """One LoRA (text encoder, attention, 1x1 convs) under a one-expert gate (fixed at 1) against
    diffusers' own load_lora_weights at the same weight."""
    from versat2i.models.loading import load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.models.pipelines import LoraAdapters, build_pipeline
    from versat2i.trainer.gate import MixtureGate
    from versat2i.trainer.mix_diffusers import DiffusersMixture, mixture_layers, prompt_context

    model, paths, _, _ = mixed
    base = load_base_model(model.folder, compute_hash=False)
    pipe = build_pipeline(base, device="cpu")
    layers = mixture_layers(base, [load_kohya_lora(paths[3])[0]])
    gate = MixtureGate(["only"], [layer.name for layer in layers], [layer.in_features for layer in layers], "token")
    with torch.no_grad():
        for weight in gate.weights:
            weight.normal_()
    mixture = DiffusersMixture(gate, layers, denoiser=base.denoiser, strength=0.7)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    text = "a green square"
    with torch.no_grad():
        plain = base.denoiser(latents, 400, prompt_context(base, text, "cpu")).sample
        mixture.attach()
        context = prompt_context(base, text, "cpu")
        dynamic = base.denoiser(latents, 400, context).sample
        mixture.remove()
        with LoraAdapters([paths[3]], weights=[0.7], fuse=False)(pipe):
            stock_context = prompt_context(base, text, "cpu")
            stock = base.denoiser(latents, 400, stock_context).sample
    torch.testing.assert_close(context, stock_context, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dynamic, stock, rtol=1e-4, atol=1e-5)
    assert (dynamic - plain).abs().max() > 1e-3


FREE_FORMS = {"token-softmax_n-t3": ("token", {"kind": "softmax_n", "timestep_knots": 3}),
              "prompt-scaled": ("prompt", {"kind": "scaled_softmax"}),
              "layer-sigmoid-t4": ("layer", {"kind": "sigmoid", "timestep_knots": 4})}


@pytest.fixture(scope="module")
def free_gates(mixed, tmp_path_factory):
    """Random gates of the free-to-combine kinds (with and without timestep input) over the mixed LoRAs."""
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import gate_for_layers
    from versat2i.trainer.mol_file import expert_record, save_mol

    model, paths, _, layers = mixed
    base = load_base_model(model.folder, compute_hash=False)
    folder = paths[0].parent
    mols = {}
    for seed, (name, (granularity, form)) in enumerate(FREE_FORMS.items()):
        gate = gate_for_layers(ASPECTS, layers, granularity,
                               base.architecture.gate_prompt_features(base.denoiser.config), **form)
        g = torch.Generator().manual_seed(40 + seed)
        with torch.no_grad():
            for parameter_name, parameter in gate.named_parameters():
                if "temperature" not in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=g))
            gate.input_scale.copy_(torch.rand(gate.input_scale.shape, generator=g) * 4 + 0.5)
        records = [expert_record(a, p, folder) for a, p in zip(ASPECTS, paths)]
        mols[name] = save_mol(folder / f"{name}.mol.safetensors", gate, records)
    return mols


@pytest.mark.parametrize("name", list(FREE_FORMS))
def test_diffusers_free_gates_equal_the_training_path_at_every_timestep(mixed, free_gates, name):
    """The inference hooks and the trainer's differentiable path agree for every gate kind and
    granularity, with the timestep read from the denoiser's call; a timestep gate's output
    changes with the timestep beyond what the base model's does."""
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import load_mixture, prompt_context

    model = mixed[0]
    base = load_base_model(model.folder, compute_hash=False)
    mol, mixture = load_mixture(base, free_gates[name], enabled=["aesthetics", "geometry", "lowlevel"], strength=0.8)
    mol.gate.eval()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    outputs = {}
    with torch.no_grad():
        for train in (False, True):
            mixture.attach(train=train)
            context = prompt_context(base, "a disc", "cpu").expand(2, -1, -1)
            outputs[train] = [base.denoiser(latents, timestep, context).sample for timestep in (100, 800)]
            mixture.remove()
        plain = [base.denoiser(latents, timestep, prompt_context(base, "a disc", "cpu").expand(2, -1, -1)).sample
                 for timestep in (100, 800)]
    for fused, trained, reference in zip(outputs[False], outputs[True], plain):
        assert (fused - reference).abs().max() > 1e-3
        torch.testing.assert_close(fused, trained, rtol=1e-4, atol=1e-5)


def test_a_timestep_gate_asked_to_bake_runs_dynamically(mixed, free_gates, caplog):
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import load_mixture, prompt_context

    base = load_base_model(mixed[0].folder, compute_hash=False)
    mol, mixture = load_mixture(base, free_gates["layer-sigmoid-t4"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixture.apply("dynamic")
        dynamic = base.denoiser(latents, 250, prompt_context(base, "a disc", "cpu")).sample
        mixture.remove()
        with caplog.at_level("WARNING"):
            mixture.apply("bake")
        baked = base.denoiser(latents, 250, prompt_context(base, "a disc", "cpu")).sample
        mixture.remove()
    assert "changes with the timestep" in caplog.text
    torch.testing.assert_close(baked, dynamic)


def test_a_layer_gate_bakes_to_exactly_its_dynamic_output(mixed, tmp_path):
    """A layer gate without timestep input reads nothing at run time: bake merges the same weights."""
    from versat2i.models.loading import load_base_model
    from versat2i.trainer.mix_diffusers import gate_for_layers, load_mixture, prompt_context
    from versat2i.trainer.mol_file import expert_record, save_mol

    model, paths, _, layers = mixed
    base = load_base_model(model.folder, compute_hash=False)
    gate = gate_for_layers(ASPECTS, layers, "layer", 32, kind="scaled_softmax")
    with torch.no_grad():
        gate.bias.normal_(generator=torch.Generator().manual_seed(5))
        gate.log_scale.normal_(generator=torch.Generator().manual_seed(6))
    mol_path = save_mol(paths[0].parent / "layer.mol.safetensors", gate,
                        [expert_record(a, p, paths[0].parent) for a, p in zip(ASPECTS, paths)])
    _, mixture = load_mixture(base, mol_path, enabled=["aesthetics", "alignment"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mixture.apply("dynamic")
        dynamic = base.denoiser(latents, 600, prompt_context(base, "a disc", "cpu")).sample
        mixture.remove()
        mixture.apply("bake")
        baked = base.denoiser(latents, 600, prompt_context(base, "a disc", "cpu")).sample
        mixture.remove()
    torch.testing.assert_close(baked, dynamic, rtol=1e-4, atol=1e-5)


# -- merge baselines (peft's TIES / DARE on the LoRA deltas) ------------------------------------------

def test_merge_baselines_add_peft_merged_deltas_and_restore_the_weights(mixed):
    """MergedLoRAs adds, per adapted weight, exactly peft's merge of the LoRAs' deltas; DARE's random
    drops are the same on every run (seeded) and differ between seeds; everything is undone on exit.
    dare_linear keeping every entry (density 1) is the plain weighted sum, which diffusers'
    set_adapters also computes: the two agree."""
    from peft.utils import merge_utils

    from versat2i.models.loading import load_base_model
    from versat2i.models.pipelines import LoraAdapters, build_pipeline
    from versat2i.trainer.lora_merges import MergedLoRAs
    from versat2i.trainer.mix_diffusers import prompt_context

    model, paths, _, _ = mixed
    base = load_base_model(model.folder, compute_hash=False)
    pipe = build_pipeline(base, device="cpu")
    layer = next(x for x in mixed[3] if not x.on_text_encoder and x.experts[2] is None)  # one LoRA skips it
    module = base.denoiser.get_submodule(layer.key.split(".", 1)[1])
    original = module.weight.detach().clone()
    deltas = [torch.zeros_like(original) if e is None
              else (e.scale * e.up.float() @ e.down.float()).reshape(original.shape)
              for e in layer.experts]
    weights = torch.tensor([0.5, 1.0, 1.5, 1.0])

    with MergedLoRAs(paths, base, method="ties", weights=weights.tolist(), density=0.3)(pipe):
        merged = module.weight.detach() - original
    torch.testing.assert_close(merged, merge_utils.ties(deltas, weights, 0.3), rtol=1e-5, atol=1e-6)
    assert torch.equal(module.weight, original)

    def dare(seed):
        with MergedLoRAs(paths, base, method="dare_ties", weights=weights.tolist(), density=0.5, seed=seed)(pipe):
            return module.weight.detach() - original

    assert torch.equal(dare(1), dare(1)) and not torch.equal(dare(1), dare(2))
    assert torch.equal(module.weight, original)

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with MergedLoRAs(paths, base, method="dare_linear", weights=weights.tolist(), density=1.0)(pipe):
            merged_out = base.denoiser(latents, 400, prompt_context(base, "a disc", "cpu")).sample
        with LoraAdapters(paths, weights=weights.tolist(), fuse=False)(pipe):
            summed_out = base.denoiser(latents, 400, prompt_context(base, "a disc", "cpu")).sample
    torch.testing.assert_close(merged_out, summed_out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="merge method 'svd'"):
        MergedLoRAs(paths, base, method="svd")
    with pytest.raises(ValueError, match="density"):
        MergedLoRAs(paths, base, method="ties", density=0.0)


def mix_args(parser, model, mol, out, *extra):
    return parser.parse_args(["mix", "--base-model", str(model.folder), "--mol", str(mol), "--prompt", "a disc",
                              "--steps", "2", "--device", "cpu", "--out", str(out), *extra])


def test_mix_command_writes_images(mixed, tmp_path):
    import argparse

    import numpy as np
    from PIL import Image

    from versat2i.models.loading import load_base_model
    from versat2i.models.pipelines import build_pipeline
    from versat2i.trainer.cli import MIX_MODES, add_mix_subcommand
    from versat2i.trainer.mix_diffusers import MODES

    assert MIX_MODES == MODES  # the CLI's choices (kept torch-free) follow the library's modes
    model, _, mols, _ = mixed
    parser = argparse.ArgumentParser()
    add_mix_subcommand(parser.add_subparsers(dest="command"))

    def mix(name, *extra, mol=mols["prompt"]):
        args = mix_args(parser, model, mol, tmp_path / name, *extra)
        assert args.func(args) == 0
        return np.asarray(Image.open(tmp_path / name / "0000.png"), dtype=np.int16)

    base = load_base_model(model.folder, compute_hash=False)  # the same call as the command's, no mixture
    pipe = build_pipeline(base, scheduler="euler", device="cpu")
    plain = np.asarray(pipe("a disc", negative_prompt=None, num_inference_steps=2, guidance_scale=7.0,
                            height=base.resolution, width=base.resolution,
                            generator=torch.Generator(device="cpu").manual_seed(0)).images[0], dtype=np.int16)
    for mode in MIX_MODES:
        mixed_image = mix(mode, "--mode", mode, "--disable-aspects", "geometry")
        off = mix(f"{mode}-off", "--mode", mode, "--disable-aspects", "geometry", "--strength", "0")
        assert np.array_equal(off, plain), mode  # strength 0 is the base model
        assert np.abs(mixed_image - off).max() > 2, mode  # the mixture changes the image
    # cfg 1 (no uncond): a prompt gate baked on the prompt gives dynamic mode's image
    baked = mix("bake-cfg1", "--mode", "bake", "--cfg", "1")
    dynamic = mix("dynamic-cfg1", "--mode", "dynamic", "--cfg", "1")
    assert np.abs(baked - dynamic).max() <= 1
    with pytest.raises(ValueError, match="already exists"):
        mix("bake-cfg1", "--mode", "bake", "--cfg", "1")
    with pytest.raises(ValueError, match="--disable-aspects: geometri not in prompt.mol.safetensors") as excinfo:
        mix("typo", "--disable-aspects", "geometri")
    assert ", ".join(ASPECTS) in str(excinfo.value)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(ValueError, match="keep at least one"):
        mix("none", "--disable-aspects", ",".join(ASPECTS))


# -- several processes ----------------------------------------------------------------------------------

DISTRIBUTED_SCRIPT = """
import os, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
import versat2i.trainer.mix_diffusers as mix_diffusers
from versat2i.trainer import train_gate

made = []
build = mix_diffusers.gate_for_layers
def capture(*args, **kwargs):  # the gate _train builds, to read its buffers at the end
    made.append(build(*args, **kwargs))
    return made[-1]
train_gate.gate_for_layers = capture
train_gate.main(train_gate.parse_args(["--config", sys.argv[1]]))
gate = made[0]
# One file per process (the main process's gate is what the MoL file holds).
save_file({"input_scale": gate.input_scale.detach().cpu().contiguous(),
           "prior": gate.prior.detach().cpu().contiguous()},
          f"{sys.argv[2]}.rank{os.environ['RANK']}.safetensors")
"""


@pytest.mark.slow
def test_two_processes_train_one_gate(mixed, tmp_path):
    """Under torch.distributed (2 CPU processes, gloo) each process sees its own share of the data;
    the gate's calibrated input scales and its prior (the mean gate bake merges) must still end
    the same in both, since only the main process's are saved."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    model, paths, _, _ = mixed
    dataset = make_kohya_dataset(tmp_path / "dataset", aspects={a: 1 for a in ASPECTS}, images_per_aspect=2)
    config = train_gate.GateTrainConfig(
        base_model=str(model.folder), dataset_dir=str(dataset), loras=tuple(str(p) for p in paths),
        output_dir=str(paths[0].parent), output_name="two-processes", work_dir=str(tmp_path / "run"),
        resolution=TINY_SIZE, bucket_step=TINY_SIZE, train_batch_size=2, max_train_steps=3, learning_rate=0.1,
        checkpointing_steps=100, mixed_precision="no", seed=3, cache_latents=True, cache_text_embeddings=False,
        granularity="token", gate_kind="softmax", overwrite=True,
    ).save(tmp_path / "gate.toml")
    script = tmp_path / "train.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    # ACCELERATE_USE_CPU: what `accelerate launch --cpu` sets; accelerate then runs gloo on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(config), str(tmp_path / "buffers")],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"buffers.rank{rank}.safetensors")) for rank in (0, 1)]
    assert (ranks[0]["input_scale"] != 1.0).all()  # calibrated
    assert not torch.allclose(ranks[0]["prior"], torch.full_like(ranks[0]["prior"], 0.25))  # updated
    for name in ("input_scale", "prior"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    saved = load_mol(paths[0].parent / "two-processes.mol.safetensors").gate
    assert torch.equal(saved.input_scale, ranks[0]["input_scale"]) and torch.equal(saved.prior, ranks[0]["prior"])


def test_print_config_round_trips(capsys):
    import argparse

    from versat2i.trainer.cli import add_train_gate_subcommand

    parser = argparse.ArgumentParser()
    add_train_gate_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-gate", "--print-config"])
    assert args.func(args) == 0
    config = train_gate.GateTrainConfig.from_toml(capsys.readouterr().out)
    assert config.balance_loss == "mole" and (config.granularity, config.gate_kind) == ("layer", "sigmoid")
    assert config.objective == "denoise" and config.timestep_knots == 0 and len(config.loras) == 2


def test_config_errors_are_clear(tiny, tmp_path):
    model, dataset, paths = tiny
    config = train_gate.GateTrainConfig(
        base_model=str(model.folder), dataset_dir=str(dataset), loras=(str(paths[0]),), output_dir=str(tmp_path),
        output_name="x", work_dir=str(tmp_path / "w"), granularity="word", balance_loss="entropy",
        gate_kind="argmax", objective="reward", timestep_knots=1,
    )
    message = "\n".join(config.problems())
    assert "at least 2 aspect LoRAs" in message
    assert "granularity='word'" in message and "balance_loss='entropy'" in message
    assert "gate_kind='argmax'" in message and "objective='reward'" in message and "timestep_knots=1" in message
    assert "not inside output_dir" in message
    assert config.output_path == tmp_path / "x.mol.safetensors"


def test_gate_fingerprint_uses_the_resolved_precision(tiny, tmp_path, monkeypatch):
    """As the LoRA's: 'auto' on the CPU is the same run as 'no'; on a bf16 GPU another run."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    auto = train_gate.GateTrainConfig.load(gate_config(tmp_path, tiny, "fp", mixed_precision="auto"))
    fingerprint = train_gate.gate_run_fingerprint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = fingerprint(auto)
    assert on_cpu == fingerprint(auto.replace(mixed_precision="no")) == fingerprint(auto, cpu=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert fingerprint(auto) == fingerprint(auto.replace(mixed_precision="bf16")) != on_cpu
    assert fingerprint(auto, cpu=True) == on_cpu  # ComfyUI --cpu on a machine with a GPU


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


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_free_timestep_gates_and_merges_on_every_family(arch, tmp_path):
    """The other families of the table (SD2's OpenCLIP and linear projections, SDXL's two text
    encoders and added conditioning): a token softmax_n gate with timestep input through the
    inference hooks equals the training path, and a TIES merge changes and restores the weights."""
    from tiny_models.sd import build_tiny_model, make_kohya_lora

    from versat2i.models.loading import encode_prompts, load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.models.pipelines import build_pipeline
    from versat2i.trainer.lora_merges import MergedLoRAs
    from versat2i.trainer.mix_diffusers import DiffusersMixture, gate_for_layers, mixture_layers

    model = build_tiny_model(arch, tmp_path / "model")
    paths = [make_kohya_lora(arch, tmp_path / f"{a}.safetensors", seed=60 + i, rank=2) for i, a in enumerate("ab")]
    base = load_base_model(model.folder, compute_hash=False)
    layers = mixture_layers(base, [load_kohya_lora(p)[0] for p in paths])
    gate = gate_for_layers(["a", "b"], layers, "token", base.architecture.gate_prompt_features(base.denoiser.config),
                           kind="softmax_n", timestep_knots=3, timestep_range=base.architecture.gate_timestep_range)
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.normal_(generator=torch.Generator().manual_seed(9))
    gate.calibrated = [True] * len(gate.layers)  # as loaded from a MoL file: the training path keeps scale 1
    gate.eval()
    mixture = DiffusersMixture(gate, layers, denoiser=base.denoiser)
    size = base.denoiser.config.sample_size
    latents = torch.randn(2, base.denoiser.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden, added = encode_prompts(base, ["a red disc", "a blue square"], "cpu")
        if base.architecture.size_conditioning:
            added = {**added, "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=hidden.dtype)}

        def denoise(timestep):
            return base.denoiser(latents, torch.tensor([timestep, timestep]), hidden, added_cond_kwargs=added).sample

        plain = denoise(700)
        outputs = {}
        for train in (False, True):
            mixture.attach(train=train)
            outputs[train] = [denoise(100), denoise(700)]
            mixture.remove()
        assert torch.equal(denoise(700), plain)
        pipe = build_pipeline(base, device="cpu")
        with MergedLoRAs(paths, base, method="ties", density=0.5)(pipe):
            merged = denoise(700)
        assert torch.equal(denoise(700), plain)
    torch.testing.assert_close(outputs[False][0], outputs[True][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[False][1], outputs[True][1], rtol=1e-4, atol=1e-5)
    assert (outputs[False][1] - plain).abs().max() > 1e-3 and (merged - plain).abs().max() > 1e-4


def test_group_balanced_mean_weighs_every_group_the_same():
    values = torch.tensor([1.0, 1.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1])  # three images of one aspect, one of another
    assert train_gate.group_balanced_mean(values, groups).item() == pytest.approx(3.0)  # (1 + 5) / 2, not 2
    assert train_gate.group_balanced_mean(values, torch.zeros(4, dtype=torch.long)).item() == pytest.approx(2.0)


def test_a_free_timestep_gate_trains_with_the_aspect_balanced_objective(tiny, tmp_path):
    """The trainer with the new options: a layer gate of sigmoid weights with timestep input, trained
    on the aspect-balanced loss; the MoL file records its form and training settings, and training
    moved the gate off its start (every LoRA at full weight, no timestep offset)."""
    mol_path = run(gate_config(tmp_path, tiny, "free", granularity="layer", gate_kind="sigmoid", timestep_knots=2,
                               objective="aspect_balanced", max_train_steps=4))
    mol = load_mol(mol_path)
    assert (mol.gate.granularity, mol.gate.kind, mol.gate.timestep_knots) == ("layer", "sigmoid", 2)
    assert mol.training["objective"] == "aspect_balanced" and mol.training["gate_kind"] == "sigmoid"
    assert mol.gate.timestep_weight.abs().sum() > 0 and mol.gate.bias.abs().sum() > 0
    assert not mol.gate.can_bake
