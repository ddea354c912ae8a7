"""``versat2i generate`` and ``versat2i report``: the loop's first and last steps from a shell.

    versat2i generate --checkpoint PATH --prompts prompts.txt --k 4 --out DIR
                      [--seed 0 | --seeds 1,2,3] [--steps 30] [--guidance 7.5] [--scheduler default]
                      [--width W --height H] [--batch-size 4] [--negative-prompt TEXT]
                      [--device auto] [--dtype auto] [--save-latents] [--lora FILE[=WEIGHT] ...]
    accelerate launch -m versat2i.cli generate ...      (several GPUs: the grid is split between them)
    versat2i report --eval EVAL_DIR --out REPORT_DIR [--base base] [--resamples 2000] [--seed 0]
    versat2i loop --config loop.toml [--overwrite] [--quiet]     (--print-config [demo]: every setting, explained)
    versat2i demo [--out versat2i-demo] [--overwrite] [--quiet]

Thin wrappers: the work happens in ``loop/generate.py``, ``loop/report.py``, ``loop/run.py`` and
``loop/demo.py``. Every input is checked before a model loads; a bad one is one error line and exit
status 2. ``loop`` / ``demo`` stopped with Ctrl-C resume when run again (exit status 130).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..safe_io import folder_problem, target_problem

PRINTABLE_CONFIGS = ("example", "demo", "dit")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    generate = subparsers.add_parser(
        "generate", help="sample K candidates per prompt -> images + candidates.jsonl",
        description="Sample K candidate images for every prompt of a prompts file with a Stable Diffusion "
                    "checkpoint (SD1.x, SD2.x, SDXL; single file or diffusers folder) or a DiT model (FLUX.1, "
                    "FLUX.2-klein, Z-Image: the diffusion model with --text-encoder and --vae) and write them with "
                    "candidates.jsonl (prompt, seed, indices per image) for `versat2i score`. Under "
                    "`accelerate launch` the images are split between the processes (GPUs).",
    )
    generate.add_argument("--checkpoint", required=True, type=Path,
                          help="base model: a .safetensors checkpoint or a diffusers folder")
    generate.add_argument("--config-dir", type=Path, default=None,
                          help="diffusers configs for a single file whose shapes differ from the real models")
    generate.add_argument("--prompts", required=True, type=Path,
                          help="text file, one prompt per line (blank lines and '#' comments skipped)")
    generate.add_argument("--k", type=int, default=4, help="candidates per prompt (default 4)")
    generate.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    seeds = generate.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0,
                       help="base seed: candidate c of prompt p gets seed + p*k + c (default 0)")
    seeds.add_argument("--seeds", default=None,
                       help="explicit seeds, comma-separated: k seeds used for every prompt, or one per image")
    generate.add_argument("--text-encoder", action="append", default=[], type=Path, metavar="FILE",
                          help="a DiT diffusion model's text encoder file (repeat for FLUX.1's CLIP-L and T5-XXL)")
    generate.add_argument("--vae", type=Path, default=None, help="a DiT diffusion model's VAE file")
    generate.add_argument("--steps", type=int, default=None,
                          help="sampling steps (default: the model's; SD 30, FLUX.2-klein 4, Z-Image 9, FLUX.1-dev 28)")
    generate.add_argument("--guidance", type=float, default=None,
                          help="guidance scale (default: the model's; SD 7.5)")
    generate.add_argument("--scheduler", default="default",
                          help="sampler: default (the checkpoint's), ddim, ddpm, pndm, euler, euler_a, heun, lms, "
                               "dpmpp_2m, dpmpp_2m_karras, unipc")
    generate.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (default: native)")
    generate.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (default: native)")
    generate.add_argument("--batch-size", type=int, default=4, help="images sampled at once per process (default 4)")
    generate.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    generate.add_argument("--device", default="auto", help="auto (this process's GPU under accelerate), cpu, cuda, ...")
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                          help="model dtype (auto: float16 on CUDA, float32 elsewhere)")
    generate.add_argument("--save-latents", action="store_true",
                          help="also write <id>.latents.safetensors (the trainer reuses them)")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[=WEIGHT]",
                          help="apply a LoRA (kohya .safetensors) while sampling; repeat to merge several")
    generate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(func=run_generate)

    report = subparsers.add_parser(
        "report", help="evaluation folder -> report.html + plots + report.json",
        description="Compare every variant of an evaluation folder (base, aspect LoRAs, merge baselines, gated "
                    "mixture; one sub-folder each with its images and scores.jsonl) with the base: means, paired "
                    "differences with bootstrap CIs, win rates, the seed-to-seed spread, diversity, sample grids, "
                    "each mixture's share of each aspect LoRA's own gain, and the gate against every merge "
                    "baseline (on the test prompts when variants.json sets validation prompts aside).",
    )
    report.add_argument("--eval", required=True, type=Path, dest="eval_dir", help="evaluation folder")
    report.add_argument("--out", required=True, type=Path, help="report folder (must not exist unless --overwrite)")
    report.add_argument("--base", default=None, help="base variant name (default: variants.json's, else 'base')")
    report.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    report.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    report.add_argument("--unit", default="pairs", choices=["pairs", "prompts"],
                        help="bootstrap unit: (prompt, seed) pairs, or whole prompts (cluster bootstrap)")
    report.add_argument("--title", default=None, help="page title")
    report.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    report.set_defaults(func=run_report)

    loop = subparsers.add_parser(
        "loop", help="the whole loop: generate -> score -> filter -> train LoRAs -> gate -> evaluate -> report",
        description="Run the VersaT2I self-improvement loop described by a TOML config: sample K candidates per "
                    "prompt, score them per aspect, keep the best per prompt and aspect, train one LoRA per aspect, "
                    "train the gate that mixes them, evaluate base / LoRAs / merge baselines / mixture on held-out "
                    "prompts and seeds, and write the report. Every stage is saved as it finishes: running the same "
                    "command "
                    "again resumes where it stopped.",
    )
    loop.add_argument("--config", type=Path, help="the loop config (.toml; see --print-config)")
    loop.add_argument("--overwrite", action="store_true",
                      help="redo finished stages whose settings changed (their outputs are replaced)")
    loop.add_argument("--check", action="store_true", help="only validate the config and exit")
    loop.add_argument("--print-config", nargs="?", const="example", choices=PRINTABLE_CONFIGS,
                      metavar="example|demo|dit",
                      help="print a config with every setting and what it means, and exit: an SD1.5 example "
                           "(default), the embedded demo world's settings (demo), or a DiT example (dit: "
                           "FLUX.2-klein 4B from ComfyUI's split files)")
    loop.add_argument("--quiet", action="store_true", help="no progress bars")
    loop.set_defaults(func=run_loop_command)

    demo = subparsers.add_parser(
        "demo", help="the whole loop on the embedded demo world (CPU, offline, a few minutes)",
        description="Run the whole loop on the embedded demo world: a tiny text-to-image model of coloured "
                    "shapes, four analytic aspect rewards and real rendered images for replay. Nothing is "
                    "downloaded. Prints the report's table and the path of its HTML page.",
    )
    demo.add_argument("--out", type=Path, default=Path("versat2i-demo"),
                      help="output folder (default ./versat2i-demo); an earlier run there is resumed")
    demo.add_argument("--overwrite", action="store_true", help="delete an earlier demo run in --out and start over")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=run_demo_command)


def _refuse(problem: str | None) -> None:
    if problem:
        raise ValueError(problem)


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    seeds = []
    for token in text.replace(" ", ",").split(","):
        if not token:
            continue
        try:
            seeds.append(int(token))
        except ValueError:
            raise ValueError(f"--seeds: {token!r} is not a whole number; separate seeds with commas") from None
    if not seeds:
        raise ValueError("--seeds: no seed given")
    return seeds


def _parse_loras(specs: list[str]) -> tuple[list[Path], list[float]]:
    paths, weights = [], []
    for spec in specs:
        path, sep, weight = spec.rpartition("=") if "=" in spec else (spec, "", "")
        try:
            weights.append(float(weight) if sep else 1.0)
        except ValueError:
            raise ValueError(f"--lora {spec!r}: the weight after '=' must be a number") from None
        paths.append(Path(path))
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--lora: LoRA file {str(path)!r} not found")
    return paths, weights


def run_generate(args: argparse.Namespace) -> int:
    from ..models.pipelines import LoraAdapters, sampling_defaults
    from .generate import GenerationSettings, generate_candidates, plan_candidates, read_prompt_file

    # Every check before the model loads.
    _refuse(target_problem(args.out, what="--out"))
    defaults = {"num_inference_steps": None, "guidance_scale": None}
    if args.steps is None or args.guidance is None:
        if not args.checkpoint.exists():
            raise FileNotFoundError(f"--checkpoint {str(args.checkpoint)!r} not found")
        defaults = sampling_defaults(args.checkpoint, text_encoders=args.text_encoder, vae=args.vae,
                                     config_dir=args.config_dir)
    settings = GenerationSettings(steps=args.steps if args.steps is not None else defaults["num_inference_steps"],
                                  guidance_scale=(args.guidance if args.guidance is not None
                                                  else defaults["guidance_scale"]),
                                  scheduler=args.scheduler,
                                  width=args.width, height=args.height, batch_size=args.batch_size,
                                  negative_prompt=args.negative_prompt)
    settings.validate()
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {str(args.checkpoint)!r} not found")
    prompts = read_prompt_file(args.prompts)
    seeds = _parse_seeds(args.seeds)
    plan_candidates(prompts, k=args.k, seeds=seeds, base_seed=args.seed)
    paths, weights = _parse_loras(args.lora)
    adapters = LoraAdapters(paths, weights) if paths else None
    result = generate_candidates(
        args.checkpoint, prompts, k=args.k, seeds=seeds, base_seed=args.seed, settings=settings, out_dir=args.out,
        overwrite=args.overwrite, save_latents=args.save_latents, adapters=adapters, device=args.device,
        dtype=args.dtype, config_dir=args.config_dir, return_images=False, show_progress=not args.quiet,
        text_encoders=args.text_encoder, vae=args.vae,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(result.folder)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..safe_io import TargetExistsError
    from .report import read_report, report_from_eval_dir

    if not args.eval_dir.is_dir():
        raise FileNotFoundError(f"--eval {str(args.eval_dir)!r} is not a folder")
    if args.out.exists() and not args.overwrite:
        raise TargetExistsError(f"--out {str(args.out)!r} already exists; choose another name or pass --overwrite")
    _refuse(target_problem(args.out, what="--out"))
    options = {"resamples": args.resamples, "seed": args.seed, "level": args.level, "unit": args.unit}
    if args.base is not None:
        options["base"] = args.base
    out = report_from_eval_dir(args.eval_dir, args.out, overwrite=args.overwrite, title=args.title, **options)
    print(read_report(out)["markdown"])
    print(out / "report.html")
    return 0


def _quiet_libraries(args: argparse.Namespace) -> None:
    """Hide what the libraries print that says nothing to a loop user; ``-v`` keeps it. The
    libraries' other warnings stay visible. (diffusers' float32-cast, "no text-encoder LoRA keys"
    and peft's several-adapters warnings are avoided where they arise, in models/pipelines.py.)"""
    if getattr(args, "verbose", False):
        return
    from transformers.utils import logging as transformers_logging

    # transformers draws a "Loading weights" bar per model it loads (into log files too); the
    # loop's own progress lines say which stage is running.
    transformers_logging.disable_progress_bar()
    _hide_unused_bitsandbytes_kernel_notices()


def _hide_unused_bitsandbytes_kernel_notices() -> None:
    """bitsandbytes (pulled in by the optional pyiqa extra) is imported by diffusers whenever it is
    installed; on import, on a CPU with AVX512-BF16, it asks the kernels library for a 4-bit matmul
    kernel on the Hugging Face Hub. Offline that logs "Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes'" (kernels) and "Failed to load CPU
    gemm_4bit_forward" (bitsandbytes). The pack never runs 4-bit layers: those two loggers show
    errors only."""
    for name in ("kernels", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run_stoppable(start) -> int:
    """Run a loop, turning Ctrl-C and a failed training process into a message and an exit status."""
    import sys

    from ..trainer.launcher import TrainingFailed

    try:
        result = start()
    except KeyboardInterrupt:
        print("stopped; run the same command again to resume", file=sys.stderr)
        return 130
    except TrainingFailed as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return 1
    from .run import summary_text

    print(summary_text(result))
    return 0


def run_loop_command(args: argparse.Namespace) -> int:
    from .config import LoopConfig
    from .run import run_loop

    if args.print_config == "demo":
        from .demo import printable_demo_config

        config, header = printable_demo_config()
        print(config.commented_toml(header), end="")
        return 0
    if args.print_config == "dit":
        print(example_dit_config().commented_toml(DIT_EXAMPLE_HEADER), end="")
        return 0
    if args.print_config:
        print(example_config().commented_toml(EXAMPLE_HEADER), end="")
        return 0
    if args.config is None:
        raise ValueError("--config: give the loop config (.toml); `versat2i loop --print-config` prints an example")
    config = LoopConfig.load_checked(args.config)  # every problem at once, before anything is written
    if args.check:
        print(f"{args.config}: valid")
        return 0
    _quiet_libraries(args)
    return _run_stoppable(lambda: run_loop(config, overwrite=args.overwrite, show_progress=not args.quiet))


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _refuse(folder_problem(args.out, what="--out"))
    _quiet_libraries(args)
    return _run_stoppable(lambda: run_demo(args.out, overwrite=args.overwrite, show_progress=not args.quiet))


EXAMPLE_HEADER = (
    "A versat2i loop config: every setting, each under what it means (defaults unless the example changed it).",
    "Edit the paths, then: versat2i loop --config loop.toml --check   (validates it), and without --check to run.",
    "Relative paths are relative to this file's folder.",
    "The embedded demo's settings: versat2i loop --print-config demo",
)


def example_config():
    """The config ``--print-config`` prints: SD1.5 with the default learned scorers."""
    from .config import (
        EvaluationSection,
        GenerationConfig,
        LoopConfig,
        ModelSection,
        PromptsSection,
        ScoringSection,
    )

    return LoopConfig(
        name="my-loop", output_dir="runs/my-loop",
        model=ModelSection(base_model="models/checkpoints/v1-5-pruned-emaonly.safetensors"),
        prompts=PromptsSection(train_file="prompts.txt", held_out_file="held_out_prompts.txt",
                               candidates_per_prompt=8),
        generation=GenerationConfig(width=512, height=512),
        aspects={"aesthetics": "laion-aesthetic-v2", "alignment": "clip-score", "lowlevel": "clip-iqa"},
        thresholds={"aesthetics": "none", "alignment": "none", "lowlevel": "p25"},
        lora={"rank": 16, "max_train_steps": 500, "learning_rate": 1e-4, "resolution": 512},
        gate={"max_train_steps": 200},
        scoring=ScoringSection(models_dir=("models/versat2i",)),
        evaluation=EvaluationSection(seeds_per_prompt=8),
    )


DIT_EXAMPLE_HEADER = (
    "A versat2i loop config for a DiT family: FLUX.2-klein 4B from the files ComfyUI's Load Diffusion Model,",
    "Load CLIP and Load VAE nodes read (FLUX.1: text_encoders = [clip_l, t5xxl]; Z-Image: its Qwen3 and FLUX.1's",
    "ae.safetensors).",
    "Generation follows the distilled model (4 steps, guidance 1); sizes are multiples of 16. LoRAs are written in",
    "diffusers' keys (ComfyUI and diffusers load them); the gate mixes them over the double- and single-stream blocks.",
    "Relative paths are relative to this file's folder. Check it: versat2i loop --config loop.toml --check",
)


def example_dit_config():
    """The config ``--print-config dit`` prints: FLUX.2-klein 4B from ComfyUI's split files."""
    from .config import EvaluationSection, GenerationConfig, ModelSection

    sd = example_config()
    return sd.replace(
        name="my-klein-loop", output_dir="runs/my-klein-loop",
        model=ModelSection(base_model="models/diffusion_models/flux-2-klein-4b.safetensors",
                           text_encoders=("models/text_encoders/qwen_3_4b.safetensors",),
                           vae="models/vae/flux2-vae.safetensors"),
        generation=GenerationConfig(width=1024, height=1024, steps=4, guidance_scale=1.0, batch_size=1),
        lora={"rank": 16, "max_train_steps": 500, "learning_rate": 1e-4, "resolution": 1024, "bucket_step": 64,
              "train_feed_forward": True, "mixed_precision": "bf16", "memory_saving": "auto"},
        gate={"max_train_steps": 200, "mixed_precision": "bf16"},
        evaluation=EvaluationSection(seeds_per_prompt=4),
    )
