"""``versat2i train-lora``, ``versat2i train-gate`` and ``versat2i mix``: the trainer from a shell.

    versat2i train-lora --config run.toml [--resume latest] [--cpu] [--accelerate-config FILE]
    versat2i train-lora --print-config > run.toml     (every setting with its default)
    versat2i train-gate --config gate.toml [--resume latest]
    versat2i mix --base-model MODEL --mol aspects.mol.safetensors --prompt "..." --out DIR

Training runs in a child process under ``accelerate launch`` (your accelerate config decides the
GPUs), exactly as the Train Aspect LoRA / Train Gate nodes run it; Ctrl-C stops the whole process
group and keeps the last checkpoint, so ``--resume latest`` continues.

Nothing heavy is imported while the parser is built (``versat2i --help`` stays fast): each
command imports torch and the trainer modules when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

LORA_EXAMPLE_REQUIRED = {
    "base_model": "models/checkpoints/model.safetensors",
    "dataset_dir": "output/versat2i/training_set",
    "aspect": "aesthetics",
    "output_dir": "models/loras",
    "output_name": "versat2i/aesthetics",
    "work_dir": "output/versat2i/lora_runs/aesthetics",
}
GATE_EXAMPLE_REQUIRED = {
    "base_model": "models/checkpoints/model.safetensors",
    "dataset_dir": "output/versat2i/training_set",
    "loras": ("models/loras/versat2i/aesthetics.safetensors", "models/loras/versat2i/geometry.safetensors"),
    "output_dir": "models/loras/versat2i",
    "output_name": "aspects",
    "work_dir": "output/versat2i/gate_runs/aspects",
}
MIX_MODES = ("bake", "dynamic", "equal")  # trainer.mix_diffusers.MODES (a test keeps them equal)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    add_train_lora_subcommand(subparsers)
    add_train_gate_subcommand(subparsers)
    add_mix_subcommand(subparsers)


def _add_training_arguments(parser: argparse.ArgumentParser, config_name: str) -> None:
    parser.add_argument("--config", type=Path, help=f"{config_name} file (.toml or .json)")
    parser.add_argument("--resume", default=None, metavar="latest|DIR",
                        help="continue from the newest checkpoint in work_dir ('latest'; a fresh start if there is "
                             "none) or from a checkpoint folder")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--accelerate-config", default="auto", metavar="FILE",
                        help="accelerate config file (default: yours from `accelerate config`, else one process)")
    parser.add_argument("--print-config", action="store_true", help="print a config with every default and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_lora_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-lora", help="train one aspect LoRA (kohya keys) from a TOML/JSON config",
        description="Train one aspect LoRA on a training set written by build-dataset / Save Training Set. "
                    "Runs under `accelerate launch`; progress is printed and logged as JSON lines in work_dir.",
    )
    _add_training_arguments(parser, "LoraTrainConfig")
    parser.set_defaults(func=run_train_lora)


def add_train_gate_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-gate", help="train a Mixture-of-LoRA gate over aspect LoRAs (writes a .mol.safetensors)",
        description="Train the gate that mixes aspect LoRAs per layer (MoLE-style, with a balancing loss). "
                    "Base model and LoRAs stay frozen. Runs under `accelerate launch`; Ctrl-C keeps the last "
                    "checkpoint for --resume latest.",
    )
    _add_training_arguments(parser, "GateTrainConfig")
    parser.set_defaults(func=run_train_gate)


def run_train_lora(args: argparse.Namespace) -> int:
    from .config import LoraTrainConfig

    return _run_training_command(args, "train-lora", LoraTrainConfig, LORA_EXAMPLE_REQUIRED,
                                 program=None, aspect_of=lambda config: config.aspect,
                                 result_path=lambda result: result.lora_path)


def run_train_gate(args: argparse.Namespace) -> int:
    from .train_gate import GATE_PROGRAM, GateTrainConfig

    return _run_training_command(args, "train-gate", GateTrainConfig, GATE_EXAMPLE_REQUIRED,
                                 program=GATE_PROGRAM, aspect_of=lambda config: "",
                                 result_path=lambda result: result.done["mol_path"])


def _run_training_command(args, command, config_class, example_required, *, program, aspect_of, result_path) -> int:
    if args.print_config:
        example = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
        print(config_class(**{**example, **example_required}).to_toml(), end="")
        return 0
    if args.config is None:
        raise ValueError(f"--config: give the {config_class.__name__} file (see `versat2i {command} --print-config`)")
    config = config_class.load_checked(args.config)  # every problem at once, before anything starts
    from ..training_set.folders import scan_training_set

    scan_training_set(config.dataset_dir, aspect_of(config))  # empty / unreadable data fails here, not in the child
    from .memory import check_training_memory, launcher_device

    device = launcher_device(args.cpu)
    if device is not None:  # else the training process checks its GPU itself, before loading the model
        check_training_memory(config, device=device, cpu=True if device == "cpu" else None)

    from .launcher import LaunchOptions, TrainingFailed, run_training

    script_args = ["--config", str(args.config.resolve())]
    if args.resume:
        script_args += ["--resume", args.resume]
    bar = _ProgressBar(command, disabled=args.quiet)
    program_kwargs = {"program": program} if program else {}
    try:
        options = LaunchOptions(accelerate_config=args.accelerate_config, cpu=args.cpu)
        result = run_training(script_args, options=options, on_event=bar.on_event, **program_kwargs)
    except TrainingFailed as exc:
        print(f"versat2i {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"versat2i {command}: stopped; continue with --resume latest", file=sys.stderr)
        return 130
    finally:
        bar.close()
    print(result_path(result))
    return 0


class _ProgressBar:
    """A progress bar (plain log lines when not on a terminal) driven by the trainer's step events;
    gate runs also show each LoRA's gate mass."""

    def __init__(self, description: str, disabled: bool):
        self.description, self.disabled, self.bar = description, disabled, None

    def on_event(self, event: dict) -> None:
        if event["event"] == "sample":  # preview paths are printed even without a bar
            lines = [f"previews at step {event['step']}:", *(f"  {path}" for path in event["paths"])]
            (self.bar.write if self.bar is not None else print)("\n".join(lines))
            return
        if self.disabled:
            return
        from ..progress import Progress

        if event["event"] == "start":
            self.bar = Progress(event["total_steps"], self.description, unit="step", initial=event["start_step"])
        elif event["event"] == "step" and self.bar is not None:
            loss = event["loss"]
            postfix = {"loss": f"{loss:.4f}" if loss is not None else "nan", "lr": f"{event['lr']:.2e}"}
            if event.get("gate_mass"):
                postfix["mass"] = "/".join(f"{m:.2f}" for m in event["gate_mass"])
            self.bar.set_postfix(**postfix)
            self.bar.set(event["step"])
        elif event["event"] == "checkpoint" and self.bar is not None:
            self.bar.write(f"checkpoint: {event['path']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_mix_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mix", help="generate images with a MoL file (gated aspect LoRAs) on a diffusers pipeline",
        description="Apply a Mixture-of-LoRA file to a base model and generate images outside ComfyUI.",
    )
    parser.add_argument("--base-model", required=True,
                        help="diffusers folder or single-file checkpoint (a DiT family: its diffusion model file)")
    parser.add_argument("--text-encoder", action="append", default=[],
                        help="a DiT family's text encoder file (repeat for FLUX.1's CLIP-L and T5)")
    parser.add_argument("--vae", default=None, help="a DiT family's VAE file")
    parser.add_argument("--model-config-dir", default=None, help="diffusers configs for a single-file checkpoint")
    parser.add_argument("--mol", required=True, type=Path, help="the .mol.safetensors file (its LoRAs next to it)")
    parser.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for several images)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--mode", default="dynamic", choices=MIX_MODES,
                        help="dynamic: gate at run time; bake: gate evaluated once per prompt (prompt gates), the "
                             "learned weights (layer gates) or the training mean (token gates) and merged (timestep "
                             "gates change every step: they run dynamically); equal: every LoRA at 1/N")
    parser.add_argument("--disable-aspects", default="", help="comma-separated aspects to switch off")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="default: 30; a DiT family: its variant's (klein 4)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="guidance scale; default: 7; a DiT family: its variant's (FLUX.1-dev 3.5, klein 1)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native resolution)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default="euler",
                        help="sampler: euler (default), default (the checkpoint's), ddim, ddpm, pndm, euler_a, heun, "
                             "lms, dpmpp_2m, dpmpp_2m_karras, unipc (as `versat2i generate`)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1...")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <index>.png")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run_mix)


def run_mix(args: argparse.Namespace) -> int:
    import inspect

    import torch

    from ..models.loading import load_base_model
    from ..models.pipelines import build_pipeline, resolve_device
    from ..safe_io import atomic_file, folder_problem
    from .mix_diffusers import load_mixture, prompt_context
    from .mol_file import read_mol

    problem = folder_problem(args.out, what="--out")
    if problem:
        raise ValueError(problem)
    # the aspects first (a header read): a misspelt name fails before the base model loads
    aspects = read_mol(args.mol).aspects
    disabled = [a.strip() for a in args.disable_aspects.split(",") if a.strip()]
    unknown = sorted(set(disabled) - set(aspects))
    if unknown:
        raise ValueError(f"--disable-aspects: {', '.join(unknown)} not in {args.mol.name}; its aspects are "
                         f"{', '.join(aspects)}")
    enabled = [a for a in aspects if a not in disabled] if disabled else None
    if enabled == []:
        raise ValueError(f"--disable-aspects: every aspect of {args.mol.name} is switched off; keep at least one")
    base = load_base_model(args.base_model, config_dir=args.model_config_dir, compute_hash=False,
                           text_encoders=args.text_encoder, vae=args.vae)
    device = resolve_device(args.device)
    pipe = build_pipeline(base, scheduler=args.scheduler, device=device)
    sampling = dict(base.variant.sampling) if base.variant is not None else {}
    steps = args.steps or sampling.get("num_inference_steps", 30)
    cfg = args.cfg if args.cfg is not None else sampling.get("guidance_scale", 7.0)
    negative = {}
    if "negative_prompt" in inspect.signature(pipe.__call__).parameters:
        negative["negative_prompt"] = args.negative_prompt or None
    elif args.negative_prompt:
        raise ValueError(f"--negative-prompt: {type(pipe).__name__} takes no negative prompt; leave it out")
    mol, mixture = load_mixture(base, args.mol, strength=args.strength)
    mixture.mask = mol.gate.expert_mask(enabled)
    size = args.size or base.resolution
    for index, prompt in enumerate(args.prompt):
        # bake: a prompt gate on this prompt's context through the mixed text encoder (as dynamic mode and
        # training see it); a token or layer gate on its merge weights; a timestep gate runs dynamically
        mixture.apply(args.mode, encode=lambda prompt=prompt: prompt_context(base, prompt, device))
        generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
        image = pipe(prompt, **negative, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size,
                     generator=generator).images[0]
        mixture.remove()
        final = args.out / f"{index:04d}.png"
        with atomic_file(final, overwrite=args.overwrite, what="image") as temp:
            image.save(temp, format="PNG")
        print(final)
    return 0
