"""``run_loop(config)``: the whole VersaT2I loop, resumable stage by stage.

One round::

    generate -> score -> filter -> train (one LoRA per aspect) -> gate -> evaluate -> report

``LoopRound.run`` below is that list, in that order, except that with ``[training] parallel_jobs`` > 1
the train, gate and evaluate steps run side by side where their inputs allow (the base's evaluation
next to the LoRA trainings, the other evaluations while the gate trains: ``train_gate_and_evaluate``);
each step is the same either way. Each stage's work is a function in ``loop/stages.py``.
Round 1 samples its candidates with the base model. Round r > 1 samples them
with round r-1's gated mixture (its LoRA when there is one aspect) and fresh seeds, keeps the best
per prompt and aspect again, and trains new aspect LoRAs *on the base model* from those better
candidates: every round's LoRAs and mixture stay plain add-ons of the user's checkpoint (stock
LoRA loaders load them), and each round's report compares that round's variants with the base.

Resuming: every step (a stage, or one unit of it: one aspect's LoRA, one evaluation variant)
publishes its output atomically and then writes a marker ``markers/round-<r>/<step>.json`` with the
fingerprint of its inputs: its settings (``stage_settings``) plus the identity (relative path,
size, mtime) of the files it read (the upstream outputs, the base model and its config folder, the
scorers' weight folders). A re-run skips a step
whose marker matches and whose outputs exist, and redoes every other step: an unfinished step
starts over (a LoRA or gate training resumes from its last checkpoint through ``train_or_reuse`` /
``train_gate_or_reuse``), and a changed input (settings, a curated training set) redoes that step
and, through the fingerprints, everything after it. Files of a step that was interrupted by a kill
(hidden ``.<name>.tmp-*`` folders) are removed when the step runs again.

Safety: one loop per folder at a time (a lock on ``loop.lock``). ``output_dir`` must be empty,
new or a loop folder (it holds ``loop.toml``). Re-running with
changed settings that would redo finished steps (and replace their outputs) needs
``overwrite=True``; the check runs before anything is written, together with ``LoopConfig.validate``
and the scorers' loading.

Record: ``loop_log.jsonl`` gets a line per step start / finish / skip (with timings), and
``summary.json`` the last run's step table and report paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..models.loading import model_source_paths
from ..progress import Progress
from ..safe_io import WriteFailedError, atomic_write_text, describe_os_error
from ..trainer.lora_merges import MERGE_METHODS
from ..trainer.training_loop import tree_identity
from .config import LoopConfig
from .stages import (
    UNIFORM_SEARCH_FILE,
    EvalVariant,
    RoundPaths,
    build_scorers,
    evaluate_variant,
    evaluated_before_uniform,
    evaluation_variants,
    generate_images,
    round_adapters,
    run_parallel,
    score_folder,
    search_uniform_weight,
    torch_threads,
    train_gate,
    train_lora,
    trained_aspects,
    write_gate_set,
    write_report,
    write_training_set,
    write_variants,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "loop.toml"
LOG_FILE = "loop_log.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "loop.lock"
MARKERS_DIR = "markers"
MARKER_FORMAT = "versat2i-loop-step"
MARKER_VERSION = 1
STAGES = ("generate", "score", "filter", "train", "gate", "evaluate", "report")


@dataclass(frozen=True)
class LoopEvent:
    """What ``run_loop``'s ``on_event`` callback receives. ``kind``: start | skip | done | progress
    (``done`` of ``total`` images) | train (``data`` = the trainer's event, e.g. step / checkpoint).
    Raising from the callback stops the loop there (finished steps stay finished)."""

    step: str
    kind: str
    done: int | None = None
    total: int | None = None
    data: dict[str, Any] | None = None


EventCallback = Callable[[LoopEvent], None]


@dataclass
class StepRecord:
    step: str
    status: str  # "ran" | "skipped"
    seconds: float  # this run (0 for a skipped step)
    made_in_seconds: float  # how long the step took when its output was made
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundResult:
    number: int
    paths: RoundPaths
    report: dict[str, Any]  # {"markdown", "html"}


@dataclass
class LoopResult:
    output_dir: Path
    rounds: list[RoundResult]
    steps: list[StepRecord]
    seconds: float

    @property
    def report_dir(self) -> Path:
        return self.rounds[-1].paths.report

    @property
    def markdown(self) -> str:
        return self.rounds[-1].report["markdown"]

    def timing_table(self) -> str:
        """Seconds per step, this run and when its output was made; the sums of step times and this
        run's wall time are labelled apart (parallel steps make the sum exceed the wall time)."""
        lines = ["| step | this run | when made |", "|---|---:|---:|"]
        for record in self.steps:
            now = "skipped" if record.status == "skipped" else f"{record.seconds:.1f} s"
            lines.append(f"| {record.step} | {now} | {record.made_in_seconds:.1f} s |")
        ran = sum(r.seconds for r in self.steps)
        made = sum(r.made_in_seconds for r in self.steps)
        lines.append(f"| sum of step times | {ran:.1f} s | {made:.1f} s |")
        lines.append(f"| **wall time of this run** | **{self.seconds:.1f} s** | |")
        return "\n".join(lines) + (
            "\n\nthis run: each step's time in this run (skipped: finished by an earlier run); when made: its time in "
            "the run that made its output. Steps run side by side ([training] parallel_jobs) overlap, so their sum can "
            "exceed the wall time; the wall time also counts what no step does (checking the config and the folder, "
            "loading the scorers).")


# -- fingerprints ------------------------------------------------------------------------------------------

def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def identity(*paths: Path) -> list:
    """What a step read: (relative path, size, mtime) rows of each file or folder (hidden files of
    unfinished writers left out). Cheap enough to compute on every run, even for big checkpoints."""

    return [[path.name, tree_identity(path)] for path in paths]


def model_identity(config: LoopConfig) -> list:
    """The identity of what loading the base model reads: the checkpoint and, for a single file, the
    config folder in effect (``model_config_dir`` or a ``<stem>.configs/`` sidecar)."""

    model = config.model
    return identity(*model_source_paths(model.base_model, model.model_config_dir or None),
                    *(Path(path) for path in (*model.text_encoders, *([model.vae] if model.vae else []))))


def scorer_weights_identity(config: LoopConfig) -> list:
    """The identity of the folders the scorers load their weights from: a weight file replaced under
    the same name changes the scores, so the steps that score are redone."""
    return identity(*(Path(folder) for folder in config.scoring.models_dir))


def stage_settings(config: LoopConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's output depends on (its part of the fingerprint). Paths, labels and
    speed settings (parallel jobs, threads, scoring batch size) are left out."""
    # (the model files' identity is model_identity's)
    model = {k: v for k, v in config.model.to_dict().items() if k not in ("base_model", "text_encoders", "vae")}
    generation = {"generation": config.generation.to_dict(), "dtype": config.dtype, "model": model}
    if stage == "generate":
        return {**generation, "prompts": config.train_prompts(), "k": config.prompts.candidates_per_prompt,
                "seed": config.prompts.seed, "save_latents": config.dataset.save_latents}
    if stage == "score":
        return {"aspects": config.resolved_aspects()}
    if stage == "filter":
        return {"thresholds": {a: config.thresholds.get(a, "none") for a in config.aspects},
                "dataset": {k: v for k, v in config.dataset.to_dict().items() if k not in ("replay_dir", "gate_data")},
                "aspects": list(config.aspects)}
    if stage == "train":
        return {"lora": dict(config.lora), "model": model}
    if stage == "gate":
        return {"gate": dict(config.gate), "lora": dict(config.lora), "model": model}
    if stage == "evaluate":
        evaluation = config.evaluation
        return {**generation, "prompts": config.evaluation_prompts(), "seeds": config.evaluation_seeds(),
                "gate_mode": evaluation.gate_mode, "aspects": config.resolved_aspects()}
    if stage == "report":
        return {k: v for k, v in config.evaluation.to_dict().items()
                if k in ("resamples", "bootstrap_seed", "level", "unit")} | {"title": config.name}
    raise ValueError(f"unknown stage {stage!r}")


# -- the ledger: markers, the run log, skip / run decisions --------------------------------------------------

class Ledger:
    """Markers and the run log of one output folder; ``run`` does a step or skips it."""

    def __init__(self, output_dir: Path, *, on_event: EventCallback | None = None):
        self.output_dir = output_dir
        self.on_event = on_event
        self.records: list[StepRecord] = []
        self._log_lock = threading.Lock()

    def marker_file(self, step: str) -> Path:
        return self.output_dir / MARKERS_DIR / f"{step}.json"

    def read_marker(self, step: str) -> dict[str, Any] | None:
        file = self.marker_file(step)
        try:
            marker = json.loads(file.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return marker if marker.get("format") == MARKER_FORMAT else None

    def existing_markers(self) -> dict[str, dict[str, Any]]:
        folder = self.output_dir / MARKERS_DIR
        found = {}
        for file in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
            step = file.relative_to(folder).with_suffix("").as_posix()
            marker = self.read_marker(step)
            if marker is not None:
                found[step] = marker
        return found

    def log(self, step: str, event: str, **fields: Any) -> None:
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "step": step,
                "event": event, **fields}
        with self._log_lock, open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, default=str) + "\n")

    def emit(self, event: LoopEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def run(self, step: str, *, settings: Mapping[str, Any], inputs: list, outputs: Sequence[Path],
            work: Callable[[], dict[str, Any] | None]) -> StepRecord:
        """Skip ``step`` when its marker matches (settings + inputs) and its outputs exist; else
        clear what an interrupted attempt left, run ``work()`` and write the marker."""

        config_fingerprint = _digest({"step": _stage_of(step), "settings": settings})
        fingerprint = _digest({"config": config_fingerprint, "inputs": inputs})
        marker = self.read_marker(step)
        if marker is not None and marker.get("fingerprint") == fingerprint and all(p.exists() for p in outputs):
            record = StepRecord(step, "skipped", 0.0, float(marker.get("seconds", 0.0)), marker.get("info") or {})
            logger.info("%s: finished in an earlier run (%.1f s then); skipped", step, record.made_in_seconds)
            self.log(step, "skip", fingerprint=fingerprint)
            self.emit(LoopEvent(step, "skip"))
            self.records.append(record)
            return record
        if marker is not None:
            self.marker_file(step).unlink()  # from now on the step counts as unfinished
        for output in outputs:
            remove_unfinished_writes(output)
        logger.info("%s: started", step)
        self.log(step, "start", fingerprint=fingerprint)
        started = time.monotonic()
        try:
            self.emit(LoopEvent(step, "start"))
            info = work() or {}
        except BaseException as exc:
            self.log(step, "stopped", error=f"{type(exc).__name__}: {exc}"[:500],
                     seconds=round(time.monotonic() - started, 3))
            raise
        seconds = time.monotonic() - started
        marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "step": step, "fingerprint": fingerprint,
                  "config_fingerprint": config_fingerprint, "seconds": round(seconds, 3),
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "outputs": [str(p.relative_to(self.output_dir)) for p in outputs], "info": info}
        atomic_write_text(self.marker_file(step), json.dumps(marker, indent=1, default=str), overwrite=True,
                          what="step marker")
        logger.info("%s: done in %.1f s", step, seconds)
        self.log(step, "done", fingerprint=fingerprint, seconds=round(seconds, 3))
        self.emit(LoopEvent(step, "done", data=info))
        record = StepRecord(step, "ran", seconds, seconds, info)
        self.records.append(record)
        return record


def _stage_of(step: str) -> str:
    parts = step.split("/")
    return parts[1] if len(parts) > 1 else parts[0]


def remove_unfinished_writes(output: Path) -> None:
    """Delete the hidden ``.<name>.tmp-*`` / ``.old-*`` siblings ``safe_io`` leaves when a process is
    killed mid-write (a normal failure removes them itself)."""
    import shutil

    if not output.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(tmp|old)-[0-9a-f]{{8}}$")
    for sibling in output.parent.iterdir():
        if pattern.match(sibling.name):
            logger.info("removing %s (left by an interrupted run)", sibling)
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


# -- one round ---------------------------------------------------------------------------------------------------

class LoopRound:
    """The stages of round ``number``, in order (``run``). Each method runs (or skips) its step(s)
    through the ledger; stages hand their results to the next through the round's folders
    (``RoundPaths``), so a resumed run reads exactly what an uninterrupted one would."""

    def __init__(self, config: LoopConfig, number: int, ledger: Ledger, *, scorers, previous: RoundPaths | None,
                 show_progress: bool = True):
        self.config, self.number, self.ledger = config, number, ledger
        self.paths = RoundPaths(Path(config.output_dir) / f"round-{number}")
        self.previous = previous
        self.scorers = scorers
        self.show_progress = show_progress
        self.aspects = list(config.aspects)
        self._bars: dict[str, Any] = {}
        self._bars_lock = threading.Lock()

    def run(self) -> RoundResult:
        self.generate()
        self.score()
        self.filter()
        self.train_gate_and_evaluate()
        report = self.report()
        return RoundResult(self.number, self.paths, report)

    def train_gate_and_evaluate(self) -> None:
        """The train, gate and evaluate stages, ``[training] parallel_jobs`` steps at a time where their
        inputs allow: the base's evaluation joins the LoRA trainings (it needs none of them), the gate
        trains while the variants that don't need it are evaluated, and the weight search and the
        uniform merge (which read the base's and the other merges' images) are evaluated next to the
        gated variants. Each step is the one the stages run in order would make (same settings, same
        inputs, same images), so a resumed run skips the same steps."""
        # The variants follow from the aspects the training set kept images for (lora:<aspect> for each),
        # known before any training.
        variants = evaluation_variants(self.config, self.trained())
        base = [v for v in variants if v.kind == "base"]
        gated = [v for v in variants if v.kind == "gated"]
        late = [v for v in variants if v.kind == "uniform"]
        early = [v for v in variants if v not in (*base, *gated, *late)]
        self.train(then=[self._evaluate_job(v) for v in base])
        self.evaluate(early, gate=True)
        self.evaluate([*late, *gated])
        self.finish_evaluation(variants)

    def step(self, name: str) -> str:
        return f"round-{self.number}/{name}"

    def trained(self) -> list[str]:
        """The aspects that kept images in this round's training set (after ``filter``): each gets a
        LoRA; an aspect that kept none is left out of training, the gate and the evaluation, and the
        report names it."""
        return trained_aspects(self.config, self.paths.training_set)

    def _progress(self, step: str, cancelled: threading.Event | None = None) -> Callable[[int, int], None]:
        """Progress events of ``step``; ``cancelled``: a job beside it failed (or Ctrl-C): stop after this batch."""
        def progress(done: int, total: int) -> None:
            if cancelled is not None and cancelled.is_set():
                raise RuntimeError(f"{step}: cancelled (a step running beside it failed or was interrupted)")
            self.ledger.emit(LoopEvent(step, "progress", done, total))
        return progress

    # -- stages ------------------------------------------------------------------------------------------
    def generate(self) -> None:
        config, paths, step = self.config, self.paths, self.step("generate")
        prompts = config.train_prompts()
        k = config.prompts.candidates_per_prompt
        inputs = model_identity(config)
        adapters_for = None
        if self.previous is not None:  # sample with the previous round's mixture
            previous_trained = trained_aspects(config, self.previous.training_set)
            previous_loras = [self.previous.lora(a) for a in previous_trained]
            mixture = self.previous.mixture if len(previous_trained) > 1 else None
            adapters_for = round_adapters("gated", loras=previous_loras, mixture=mixture,
                                          gate_mode=config.evaluation.gate_mode)
            inputs += identity(*previous_loras, *([mixture] if mixture else []))
        base_seed = config.candidate_base_seed(self.number)
        self.ledger.run(step, settings={**stage_settings(config, "generate"), "base_seed": base_seed}, inputs=inputs,
                        outputs=[paths.candidates], work=lambda: generate_images(
                            config, paths.candidates, prompts, k=k, base_seed=base_seed, adapters_for=adapters_for,
                            save_latents=config.dataset.save_latents, progress=self._progress(step),
                            show_progress=self.show_progress, workers=config.training.parallel_jobs))

    def score(self) -> None:
        config, paths, step = self.config, self.paths, self.step("score")

        def work():
            table = score_folder(paths.candidates, self.scorers(), paths.scores, batch_size=config.scoring.batch_size,
                                 progress=self._progress(step), show_progress=self.show_progress)
            return {"images": len(table), "mean": {a: sum(v) / len(v) for a, v in table.scores.items()}}

        self.ledger.run(step, settings=stage_settings(config, "score"),
                        inputs=identity(paths.candidates) + scorer_weights_identity(config),
                        outputs=[paths.scores], work=work)

    def filter(self) -> None:
        config, paths, step = self.config, self.paths, self.step("filter")
        inputs = identity(paths.scores, paths.candidates)
        if config.dataset.replay_dir:
            inputs += identity(Path(config.dataset.replay_dir))
        self.ledger.run(step, settings=stage_settings(config, "filter"), inputs=inputs, outputs=[paths.training_set],
                        work=lambda: write_training_set(config, paths.scores, paths.candidates, paths.training_set,
                                                        progress=self._progress(step),
                                                        show_progress=self.show_progress))
        if config.dataset.gate_data == "joint" and config.needs_gate:  # the gate's own set: its own step
            self.ledger.run(self.step("filter/gate_set"), settings=gate_set_settings(config), inputs=inputs,
                            outputs=[paths.gate_set],
                            work=lambda: write_gate_set(config, paths.scores, paths.candidates, paths.gate_set))

    def train(self, then: Sequence[tuple[str, Callable[[threading.Event], Any]]] = ()) -> None:
        """One LoRA per aspect, ``[training] parallel_jobs`` at a time (each job is its own step);
        ``then``: more (name, job) pairs for the same pool, started as the trainings leave room."""
        config, paths = self.config, self.paths
        settings = stage_settings(config, "train")
        inputs = identity(paths.training_set) + model_identity(config)

        def job(aspect: str):
            def run(cancelled: threading.Event):
                return self.ledger.run(
                    self.step(f"train/{aspect}"), settings=lora_settings(config, aspect, settings), inputs=inputs,
                    outputs=[paths.lora(aspect)],
                    work=lambda: train_lora(config, aspect, paths, on_event=self._train_event, cancelled=cancelled))
            return aspect, run

        self._run_jobs([job(a) for a in self.trained()] + list(then))

    def _run_jobs(self, jobs: Sequence[tuple[str, Callable[[threading.Event], Any]]]) -> None:
        """``jobs`` on ``[training] parallel_jobs`` workers; while several run, the evaluations in this
        process sample with their share of its torch threads (the training processes have their own)."""
        import torch

        workers = min(self.config.training.parallel_jobs, len(jobs))
        threads = torch.get_num_threads() // workers if workers > 1 else torch.get_num_threads()
        try:
            with torch_threads(threads):
                run_parallel(jobs, workers)
        finally:
            self._close_bars()

    def _gate_job(self) -> tuple[str, Callable[[threading.Event], Any]] | None:
        """The [gate] mixture, then one per [gate_variants] entry (each its own step), as one job."""
        config, paths = self.config, self.paths
        trained = self.trained()
        if not config.needs_gate or len(trained) < 2:  # one LoRA left: it is the round's whole model
            return None
        loras = {a: paths.lora(a) for a in trained}
        dataset = paths.gate_set if config.dataset.gate_data == "joint" else paths.training_set
        inputs = identity(dataset) + model_identity(config) + identity(*loras.values())

        def run(cancelled: threading.Event):
            for variant in (None, *config.gate_variants):
                step = self.step("gate" if variant is None else f"gate/{variant}")
                self.ledger.run(step, settings=gate_settings(config, variant), inputs=inputs,
                                outputs=[paths.gate_file(variant)],
                                work=lambda v=variant: train_gate(config, paths, loras, on_event=self._train_event,
                                                                  variant=v, cancelled=cancelled))
        return "gate", run

    def evaluate(self, variants: Sequence[EvalVariant], *, gate: bool = False) -> None:
        """``variants`` on the evaluation grid (one step each, ``uniform`` after its weight search),
        side by side; ``gate``: train the gate(s) meanwhile, as the first job."""
        jobs = [self._evaluate_job(v) for v in variants]
        gate_job = self._gate_job() if gate else None
        self._run_jobs([gate_job, *jobs] if gate_job is not None else jobs)

    def _evaluate_job(self, variant: EvalVariant) -> tuple[str, Callable[[threading.Event], Any]]:
        config, paths = self.config, self.paths
        settings = stage_settings(config, "evaluate")
        read_by_every_variant = model_identity(config) + scorer_weights_identity(config)

        def run(cancelled: threading.Event):
            trained = self.trained()
            if variant.kind == "uniform":
                self._search_uniform_weight(settings, read_by_every_variant, cancelled)
            step = self.step(f"evaluate/{variant.dir}")
            self.ledger.run(step, settings={**settings, **variant_settings(config, variant)},
                            inputs=read_by_every_variant + identity(*self._variant_files(variant)),
                            outputs=[paths.eval / variant.dir],
                            work=lambda: evaluate_variant(
                                config, variant, paths, self.scorers(), trained=trained,
                                progress=self._progress(step, cancelled), show_progress=self.show_progress))
        return f"evaluate {variant.name}", run

    def finish_evaluation(self, variants: Sequence[EvalVariant]) -> None:
        """``variants.json``: the variants evaluated, in report order."""
        config, paths = self.config, self.paths
        settings = stage_settings(config, "evaluate")
        # The settings list the config's variants (what preflight compares); the inputs, the ones made.
        self.ledger.run(self.step("evaluate"),
                        settings={**settings, **variants_file_settings(config, evaluation_variants(config))},
                        inputs=identity(paths.training_set / "dataset.json", *(paths.eval / v.dir for v in variants)),
                        outputs=[paths.eval / "variants.json"],
                        work=lambda: {"variants.json": str(write_variants(config, paths, self.number))})

    def report(self) -> dict[str, Any]:
        config, paths = self.config, self.paths
        record = self.ledger.run(self.step("report"), settings=stage_settings(config, "report"),
                                 inputs=identity(paths.eval), outputs=[paths.report],
                                 work=lambda: write_report(config, paths, self.number))
        return record.info

    def _search_uniform_weight(self, settings: Mapping[str, Any], read_by_every_variant: list,
                               cancelled: threading.Event | None = None) -> None:
        """The uniform merge weight, chosen on the validation prompts (needs the base's images)."""
        config, paths, step = self.config, self.paths, self.step("evaluate/uniform_search")
        sampled = [paths.eval / "base", *(paths.eval / kind for kind in evaluated_before_uniform(config))]
        self.ledger.run(step, settings={**settings, **uniform_search_settings(config)},
                        inputs=read_by_every_variant + identity(*sampled, *self._lora_files()),
                        outputs=[paths.uniform_search],
                        work=lambda: search_uniform_weight(config, paths, self.scorers(),
                                                           progress=self._progress(step, cancelled),
                                                           show_progress=self.show_progress))

    # -- helpers ------------------------------------------------------------------------------------------
    def _lora_files(self) -> list[Path]:
        return [self.paths.lora(a) for a in self.trained()]

    def _variant_files(self, variant: EvalVariant) -> list[Path]:
        if variant.kind == "lora":
            return [self.paths.lora(variant.aspect)]
        trained = self.trained()
        files = self._lora_files() if variant.kind not in ("base", "lora") else []
        if variant.kind == "gated" and len(trained) > 1:
            files.append(self.paths.gate_file(variant.gate_variant))
        if variant.kind == "uniform":
            files.append(self.paths.uniform_search / UNIFORM_SEARCH_FILE)
        return files

    def _train_event(self, job: str, event: dict) -> None:
        """Trainer events -> the caller's callback and one progress bar per training job."""
        gate_job = job == "gate" or job.startswith("gate-")  # train_gate's jobs: gate, gate-<variant>
        step = "gate" + (f"/{job[len('gate-'):]}" if job != "gate" else "") if gate_job else f"train/{job}"
        self.ledger.emit(LoopEvent(self.step(step), "train", data=event))
        if not self.show_progress:
            return
        with self._bars_lock:
            if event["event"] == "start":
                label = "train gate" if job == "gate" else f"train LoRA {job}"
                self._bars[job] = Progress(event["total_steps"], label, unit="step", initial=event["start_step"],
                                           position=len(self._bars), leave=False)
            elif event["event"] == "step" and job in self._bars:
                bar = self._bars[job]
                if event.get("loss") is not None:
                    bar.set_postfix(loss=f"{event['loss']:.4f}")
                bar.set(event["step"])
            elif event["event"] == "done" and job in self._bars:
                self._bars.pop(job).close()

    def _close_bars(self) -> None:
        with self._bars_lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()


# -- the loop ------------------------------------------------------------------------------------------------------

def preflight(config: LoopConfig, *, overwrite: bool = False) -> Ledger:
    """Every check that needs no work: the config, the output folder, settings changed since the
    finished steps of an earlier run. Raises one ValueError listing what is wrong; writes nothing."""
    config.validate()
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    ledger = Ledger(output_dir)
    changed = []
    for step, marker in ledger.existing_markers().items():
        match = re.fullmatch(r"round-(\d+)/(.+)", step)
        if match is None or int(match.group(1)) > config.rounds:
            continue
        stage = _stage_of(step)
        settings = _expected_settings(config, step) if stage in STAGES else None
        if settings is None:  # a step this config no longer has (a dropped aspect or variant)
            continue
        expected = _digest({"step": stage, "settings": settings})
        if marker.get("config_fingerprint") != expected:
            changed.append(step)
    if changed and not overwrite:
        raise ValueError(
            f"output_dir {str(output_dir)!r} holds a run made with other settings: finished step(s) "
            f"{', '.join(changed)} would be redone and their outputs replaced. Re-run with overwrite "
            "(--overwrite) to do that, or choose another output_dir.")
    return ledger


def check_output_dir(output_dir: Path) -> None:
    """A loop writes only into a new or empty folder, or into a loop folder of its own."""
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / CONFIG_FILE).is_file():
        raise ValueError(f"output_dir {str(output_dir)!r} is not empty and holds no {CONFIG_FILE} (not a loop folder); "
                         "choose a new or empty folder so nothing of yours is replaced")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is not a folder; choose another output_dir")


def _expected_settings(config: LoopConfig, step: str) -> dict[str, Any] | None:
    """What ``LoopRound`` passes as ``settings`` for ``step`` (kept in step with it); None for a
    step this config does not have."""
    number, rest = re.fullmatch(r"round-(\d+)/(.+)", step).groups()
    stage = _stage_of(step)
    settings = stage_settings(config, stage)
    if stage == "generate":
        settings = {**settings, "base_seed": config.candidate_base_seed(int(number))}
    elif stage == "train":
        aspect = rest.split("/", 1)[1] if "/" in rest else None
        if aspect not in config.aspects:
            return None
        settings = lora_settings(config, aspect, settings)
    elif stage == "filter" and rest == "filter/gate_set":
        if config.dataset.gate_data != "joint" or not config.needs_gate:
            return None
        settings = gate_set_settings(config)
    elif stage == "gate":
        variant = rest.split("/", 1)[1] if "/" in rest else None
        if not config.needs_gate or (variant is not None and variant not in config.gate_variants):
            return None
        settings = gate_settings(config, variant)
    elif stage == "evaluate":
        variants = evaluation_variants(config)
        if rest == "evaluate/uniform_search":
            if not any(v.kind == "uniform" for v in variants):
                return None
            settings = {**settings, **uniform_search_settings(config)}
        elif "/" in rest:
            variant = {v.dir: v for v in variants}.get(rest.split("/", 1)[1])
            if variant is None:
                return None
            settings = {**settings, **variant_settings(config, variant)}
        else:
            settings = {**settings, **variants_file_settings(config, variants)}
    return settings


def lora_settings(config: LoopConfig, aspect: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """One aspect's LoRA step: the train stage's settings, the aspect, its [lora_aspects] overrides."""
    overrides = config.lora_aspects.get(aspect)
    return {**settings, "aspect": aspect, **({"lora_aspect": dict(overrides)} if overrides else {})}


def gate_set_settings(config: LoopConfig) -> dict[str, Any]:
    """The gate's own training set depends on the filter settings and its selection rule."""
    return {**stage_settings(config, "filter"), "gate_data": config.dataset.gate_data}


def gate_settings(config: LoopConfig, variant: str | None) -> dict[str, Any]:
    """The settings of the [gate] step, or of a [gate_variants.<variant>] one."""
    settings = stage_settings(config, "gate")
    if variant is None:
        return settings
    return {**settings, "gate": {**config.gate, **config.gate_variants[variant]}, "variant": variant}


def variant_settings(config: LoopConfig, variant: EvalVariant) -> dict[str, Any]:
    """What one evaluation variant's images depend on beyond the evaluate stage's settings."""
    settings: dict[str, Any] = {"variant": variant.name}
    if variant.kind in MERGE_METHODS:
        settings.update(merge_weight=config.evaluation.merge_weight, merge_density=config.evaluation.merge_density)
    return settings


def uniform_search_settings(config: LoopConfig) -> dict[str, Any]:
    return {"uniform_weights": list(config.evaluation.uniform_weights),
            "validation_prompts": config.validation_prompts()}


def variants_file_settings(config: LoopConfig, variants: Sequence[EvalVariant]) -> dict[str, Any]:
    """What variants.json records: the variants and the validation split the report uses."""
    return {"variants": [v.name for v in variants], "validation_prompts": config.validation_prompts()}


def run_loop(config: LoopConfig, *, overwrite: bool = False, show_progress: bool = True,
             on_event: EventCallback | None = None) -> LoopResult:
    """Run (or resume) the loop of ``config``; returns every round's report and the step table.

    ``overwrite``: redo finished steps whose settings changed (their outputs are replaced).
    ``on_event``: called with a ``LoopEvent`` at each step's start / skip / end, on progress and for
    every trainer event; raising from it stops the loop (what finished stays finished).
    """

    started = time.monotonic()
    config = config.resolve_paths(Path.cwd())  # the training processes get absolute paths
    ledger = preflight(config, overwrite=overwrite)
    ledger.on_event = on_event
    scorer_cache: dict[str, Any] = {}
    scorer_lock = threading.Lock()  # evaluation steps run side by side: the scorers are loaded once

    def scorers():
        with scorer_lock:
            if "scorers" not in scorer_cache:
                scorer_cache["scorers"] = build_scorers(config)
            return scorer_cache["scorers"]

    if _has_unfinished_scoring(config, ledger):
        scorers()  # a missing weight file or extra is reported now, before any work
    output_dir = Path(config.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. inside /proc, or a disk that went read-only since the check
        raise WriteFailedError(exc.errno, describe_os_error(exc, what="output_dir", path=output_dir,
                                                            action="cannot be created"), output_dir) from None
    with _folder_lock(output_dir):
        atomic_write_text(output_dir / CONFIG_FILE, config.to_toml(), overwrite=True, what="loop config copy")
        ledger.log("loop", "start", rounds=config.rounds)
        rounds: list[RoundResult] = []
        previous = None
        for number in range(1, config.rounds + 1):
            round_ = LoopRound(config, number, ledger, scorers=scorers, previous=previous, show_progress=show_progress)
            rounds.append(round_.run())
            previous = round_.paths
    result = LoopResult(output_dir, rounds, ledger.records, time.monotonic() - started)
    ledger.log("loop", "done", seconds=round(result.seconds, 3))
    summary = {"config": str(output_dir / CONFIG_FILE), "seconds": round(result.seconds, 3),
               "reports": [{"round": r.number, **r.report} for r in rounds],
               "steps": [{"step": s.step, "status": s.status, "seconds": round(s.seconds, 3),
                          "made_in_seconds": round(s.made_in_seconds, 3)} for s in result.steps]}
    atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1), overwrite=True, what="loop summary")
    return result


@contextlib.contextmanager
def _folder_lock(output_dir: Path) -> Iterator[None]:
    """One loop per folder at a time: an exclusive ``flock`` on ``loop.lock`` (released by the
    kernel when the process ends, however it ends). Where ``fcntl`` is missing (Windows) the lock
    is skipped."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(output_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another versat2i loop is running in {str(output_dir)!r}; wait for it to end "
                             "(or stop it), then run this again") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _has_unfinished_scoring(config: LoopConfig, ledger: Ledger) -> bool:
    """True unless every scoring step (candidates, each evaluation variant) has a marker."""
    markers = ledger.existing_markers()
    for number in range(1, config.rounds + 1):
        training_set = RoundPaths(Path(config.output_dir) / f"round-{number}").training_set
        trained = trained_aspects(config, training_set) if training_set.is_dir() else None
        steps = [f"round-{number}/score"] + [f"round-{number}/evaluate/{v.dir}"
                                             for v in evaluation_variants(config, trained)]
        if any(step not in markers for step in steps):
            return True
    return False


def summary_text(result: LoopResult) -> str:
    """What the CLI prints at the end: the report table, where the report is, the step timings."""
    last = result.rounds[-1]
    return "\n".join([
        last.report["markdown"], "",
        f"Report: {last.report['html']}", "",
        f"Steps ({result.output_dir}):", result.timing_table(),
    ])
