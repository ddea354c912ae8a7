"""``versat2i demo``: the whole loop on the embedded demo world, offline, in a few minutes on a CPU.

    versat2i demo [--out versat2i-demo] [--overwrite]        (``make demo``)

The demo world (``demo/``): a tiny text-to-image model of coloured shapes on plain backgrounds
(shipped in ``demo/weights/``), four analytic aspect rewards (``demo:<aspect>`` scorers) and a
renderer of real images. The loop runs with the settings ``demo/settings.py`` chose by measurement,
and with replay: real rendered images of the loop's prompts mixed into every aspect's training set.

Folder::

    <out>/real_images/     rendered real images + captions (the replay folder)
    <out>/run/             the loop's folder (loop.toml, round-1/..., report: round-1/report/)

Running it again resumes (or, when finished, only prints the report); ``--overwrite`` deletes an
earlier demo run in ``<out>`` and starts over.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..demo import rewards as demo_rewards
from ..demo import settings, world
from ..image_files import save_png, to_uint8
from ..safe_io import atomic_dir
from .config import (
    DatasetSection,
    EvaluationSection,
    GenerationConfig,
    LoopConfig,
    ModelSection,
    PromptsSection,
    TrainingSection,
)
from .run import CONFIG_FILE, check_output_dir, run_loop

logger = logging.getLogger(__name__)

DEFAULT_OUT = "versat2i-demo"
REPLAY_DIR = "real_images"
RUN_DIR = "run"
# Real images rendered for replay: one per loop prompt (replay_fraction x kept images are used).
REPLAY_PER_PROMPT = 1
GENERATION_BATCH = 64  # images sampled at once (the demo model is tiny; larger batches are faster)
# Two training processes of one thread each beat one of two threads on these tiny models
# (measured on 2 cores: 5.5 vs 4.3 steps/s), and the demo targets 2 cores. The evaluation uses the
# same two slots (loop/run.py): the base's evaluation joins the trainings, the gate trains while the
# other variants are evaluated, each sampling with one thread.
PARALLEL_TRAINING_JOBS = 2
THREADS_PER_TRAINING_JOB = 1
# Evaluation: the 15 held-out and the 39 loop prompts, 4 seeds each, every (prompt, seed) its own
# noise (loop/config.py): 54 x 4 = 216 images per variant, 11 variants. The seed range is
# demo/settings.py's EVAL_SEED, far from every candidate seed.
EVAL_SEEDS_PER_PROMPT = 4


def demo_config(out: str | Path) -> LoopConfig:
    """The demo's loop config (``demo/settings.py``'s measured settings), writing under ``out``."""
    demo_rewards.register_scorers()  # the config names demo:<aspect> scorers

    out = Path(out).resolve()
    sampler = settings.SAMPLER
    return LoopConfig(
        name="demo-world",
        output_dir=str(out / RUN_DIR),
        rounds=1,
        device="cpu",
        dtype="float32",
        model=ModelSection(base_model=str(settings.BASE_MODEL_DIR)),
        prompts=PromptsSection(train=tuple(settings.loop_prompts()), held_out=tuple(settings.held_out_prompts()),
                               candidates_per_prompt=settings.CANDIDATES_PER_PROMPT, seed=settings.CANDIDATE_SEED),
        generation=GenerationConfig(steps=sampler["num_inference_steps"], guidance_scale=sampler["guidance_scale"],
                                    width=sampler["width"], height=sampler["height"], batch_size=GENERATION_BATCH),
        aspects=dict(settings.SCORERS),
        dataset=DatasetSection(repeats=1, replay_dir=str(out / REPLAY_DIR), replay_fraction=settings.REPLAY_FRACTION,
                               gate_data=settings.GATE_DATA),
        lora=dict(settings.LORA),
        lora_aspects={aspect: dict(overrides) for aspect, overrides in settings.LORA_ASPECTS.items()},
        gate=dict(settings.GATE),
        training=TrainingSection(parallel_jobs=PARALLEL_TRAINING_JOBS, threads_per_job=THREADS_PER_TRAINING_JOB,
                                 cpu=True),
        evaluation=EvaluationSection(seeds_per_prompt=EVAL_SEEDS_PER_PROMPT, seed=settings.EVAL_SEED,
                                     include_train_prompts=True, variants=settings.EVALUATION_VARIANTS,
                                     gate_mode=settings.GATE_MODE),
    )


def printable_demo_config() -> tuple[LoopConfig, list[str]]:
    """The demo's config as ``versat2i loop --print-config demo`` prints it, and its header: the
    demo's settings, with paths relative to the folder the file is saved in (``versat2i demo``
    renders the replay images first; the loop writes to its own folder next to the demo's run)."""
    config = demo_config(DEFAULT_OUT)
    config = config.replace(output_dir=f"{DEFAULT_OUT}/my-loop",
                            dataset=config.dataset.replace(replay_dir=f"{DEFAULT_OUT}/{REPLAY_DIR}"))
    header = [
        "The embedded demo world's loop (what `versat2i demo` runs), every setting under what it means.",
        f"Run `versat2i demo` once first: it renders the real images [dataset] replay_dir names ({DEFAULT_OUT}/"
        f"{REPLAY_DIR}).",
        "Then save this file in the same folder and run: versat2i loop --config demo.toml   (relative paths are",
        "relative to the file's folder; the demo scorers demo:<aspect> exist in the versat2i command only).",
    ]
    return config, header


def write_replay_images(folder: Path, prompts: list[str], count: int) -> Path:
    """Render ``count`` real images of ``prompts`` (``demo.world.replay_images``) with their captions
    into ``folder``, atomically. An existing complete folder is kept as is: rendering is
    deterministic, and keeping it keeps the files' identity (so a resumed run redoes nothing)."""

    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return folder
    images, captions = world.replay_images(prompts, count)
    with atomic_dir(folder, overwrite=True, what="replay images") as temp:
        for index, (image, caption) in enumerate(zip(images, captions)):
            save_png(to_uint8(image), temp / f"real_{index:04d}.png")
            (temp / f"real_{index:04d}.txt").write_text(caption, encoding="utf-8")
    return folder


def run_demo(out: str | Path = DEFAULT_OUT, *, overwrite: bool = False, show_progress: bool = True):
    """Run (or resume) the demo loop under ``out``; returns ``loop.run.LoopResult``."""

    out = Path(out)
    config = demo_config(out)
    config.validate(check_paths=False)  # everything but the replay folder, which is made below
    run_dir = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if not overwrite:
        check_output_dir(run_dir)  # before the replay images are written: a wrong --out gets nothing
    if overwrite and run_dir.exists():
        if not (run_dir / CONFIG_FILE).is_file():
            raise ValueError(f"--overwrite: {str(run_dir)!r} is not a loop folder (no {CONFIG_FILE}); "
                             "remove it yourself or choose another --out")
        logger.info("--overwrite: removing the earlier demo run %s", run_dir)
        shutil.rmtree(run_dir)
    prompts = list(config.train_prompts())
    write_replay_images(Path(config.dataset.replay_dir), prompts, REPLAY_PER_PROMPT * len(prompts))
    return run_loop(config, overwrite=overwrite, show_progress=show_progress)
