"""Aspect LoRAs and a MoL gate over them for the tiny DiT models (tiny_models/dit.py), written with
the pack's own code: LoRA files by ``save_lora`` (the trainer's writer) from peft adapters with random
factors on every Linear the family's targets name (MLPs included), the gate by ``gate_for_layers``
over ``mixture_layers`` of those files, with random weights, saved by ``save_mol``. Used by
tests/comfy/test_gated_loader_dit.py and tests/server/test_workflows.py (the Z-Image workflows).
"""

from __future__ import annotations

import torch

from tiny_models.dit import MODELS, tiny_transformer

# The tiny models' last layers are small (weights N(0, 0.02)): LoRA factors at peft's Linear init times
# this change the sampled latents by ~1e-2.
LORA_B_SCALE = 5.0


def write_lora(name: str, tiny, path, seed: int, *, b_scale: float = LORA_B_SCALE):
    """A LoRA of random factors on every Linear the family's LoRA targets name (train_feed_forward on),
    saved by the pack's ``save_lora`` (the trainer's own writer)."""
    from peft import LoraConfig

    from versat2i.models.architectures import architecture
    from versat2i.models.lora_files import save_lora
    from versat2i.trainer.train_lora import lora_targets

    entry = architecture(MODELS[name][0])
    transformer = tiny_transformer(name)
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=lora_targets(entry, True)))
    with torch.no_grad():
        for parameter_name, parameter in transformer.named_parameters():
            if "lora_B" in parameter_name:
                parameter.mul_(b_scale)
    save_lora(path, architecture=entry, denoiser=transformer, metadata={"versat2i_aspect": path.stem})
    return path


def write_mixture(name: str, tiny, loras_dir, aspects, granularity: str, *, kind="softmax", seed=0,
                  b_scale: float = LORA_B_SCALE, tag: str | None = None):
    """LoRA files of ``aspects`` and a MoL file over them with random gate weights; returns its name."""
    from versat2i.models.loading import load_base_model
    from versat2i.models.lora_files import load_kohya_lora
    from versat2i.trainer.mix_diffusers import gate_for_layers, gate_form, mixture_layers
    from versat2i.trainer.mol_file import expert_record, save_mol

    tag = tag or f"{granularity}-{len(aspects)}"
    folder = loras_dir / "versat2i" / tag
    folder.mkdir(parents=True)
    paths = [write_lora(name, tiny, folder / f"{aspect}.safetensors", seed=10 + index, b_scale=b_scale)
             for index, aspect in enumerate(aspects)]
    base = load_base_model(tiny.diffusion_model, text_encoders=tiny.text_encoders, vae=tiny.vae, compute_hash=False)
    loaded = [load_kohya_lora(p) for p in paths]
    layers = mixture_layers(base, [s for s, _ in loaded], [m for _, m in loaded])
    gate = gate_for_layers(aspects, layers, granularity, base.architecture.gate_prompt_features(base.denoiser.config),
                           kind=kind, **gate_form(base.architecture))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in gate.named_parameters():
            if "temperature" not in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    gate.calibrated = [True] * len(gate.layers)
    save_mol(folder / "mix.mol.safetensors", gate, [expert_record(a, p, folder) for a, p in zip(aspects, paths)])
    return f"versat2i/{tag}/mix.mol.safetensors", [f"versat2i/{tag}/{p.name}" for p in paths]
