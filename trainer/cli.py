"""``versat2i train-lora``: train one aspect LoRA from a TOML/JSON config, from a shell.

    versat2i train-lora --config run.toml [--resume latest] [--cpu] [--accelerate-config FILE]
    versat2i train-lora --print-config > run.toml     (every setting with its default)

The run happens in a child process under ``accelerate launch`` (your accelerate config decides the
GPUs), exactly as the Train Aspect LoRA node runs it; Ctrl-C stops the whole process group and
keeps the last checkpoint, so ``--resume latest`` continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

EXAMPLE_REQUIRED = {
    "base_model": "models/checkpoints/model.safetensors",
    "dataset_dir": "output/versat2i/training_set",
    "aspect": "aesthetics",
    "output_dir": "models/loras",
    "output_name": "versat2i/aesthetics",
    "work_dir": "output/versat2i/lora_runs/aesthetics",
}


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-lora", help="train one aspect LoRA (kohya keys) from a TOML/JSON config",
        description="Train one aspect LoRA on a training set written by build-dataset / Save Training Set. "
                    "Runs under `accelerate launch`; progress is printed and logged as JSON lines in work_dir.",
    )
    parser.add_argument("--config", type=Path, help="LoraTrainConfig file (.toml or .json)")
    parser.add_argument("--resume", default=None, metavar="latest|DIR",
                        help="continue from the newest checkpoint in work_dir ('latest'; a fresh start if there is "
                             "none) or from a checkpoint folder")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--accelerate-config", default="auto", metavar="FILE",
                        help="accelerate config file (default: yours from `accelerate config`, else one process)")
    parser.add_argument("--print-config", action="store_true", help="print a config with every default and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_train_lora)


def run_train_lora(args: argparse.Namespace) -> int:
    from .config import LoraTrainConfig

    if args.print_config:
        example = {f.name: f.default for f in dataclasses.fields(LoraTrainConfig)
                   if f.default is not dataclasses.MISSING}
        print(LoraTrainConfig(**{**example, **EXAMPLE_REQUIRED}).to_toml(), end="")
        return 0
    if args.config is None:
        raise ValueError("--config: give the LoraTrainConfig file (see `versat2i train-lora --print-config`)")
    config = LoraTrainConfig.load(args.config)
    config.validate()  # a bad setting is one error line, before anything starts
    from .kohya_dataset import scan_training_set

    scan_training_set(config.dataset_dir, config.aspect)  # empty / unreadable data fails here, not in the child

    from .launcher import LaunchOptions, TrainingFailed, run_training

    script_args = ["--config", str(args.config.resolve())]
    if args.resume:
        script_args += ["--resume", args.resume]
    bar = _ProgressBar(disabled=args.quiet)
    try:
        options = LaunchOptions(accelerate_config=args.accelerate_config, cpu=args.cpu)
        result = run_training(script_args, options=options, on_event=bar.on_event)
    except TrainingFailed as exc:
        bar.close()
        print(f"versat2i train-lora: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("versat2i train-lora: stopped; continue with --resume latest", file=sys.stderr)
        return 130
    bar.close()
    print(result.lora_path)
    return 0


class _ProgressBar:
    """tqdm driven by step events."""

    def __init__(self, disabled: bool):
        self.disabled, self.bar = disabled, None

    def on_event(self, event: dict) -> None:
        if self.disabled:
            return
        from tqdm import tqdm

        if event["event"] == "start":
            self.bar = tqdm(total=event["total_steps"], initial=event["start_step"], desc="train-lora", unit="step")
        elif event["event"] == "step" and self.bar is not None:
            self.bar.n = event["step"]
            loss = event["loss"]
            self.bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "nan", lr=f"{event['lr']:.2e}")
        elif event["event"] == "checkpoint" and self.bar is not None:
            self.bar.write(f"checkpoint: {event['path']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
