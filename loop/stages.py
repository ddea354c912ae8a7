"""The work of each loop stage, as plain functions over folders (``loop/run.py`` orders them,
skips finished ones and records what each made).

    generate  ->  score  ->  filter  ->  train  ->  gate  ->  evaluate  ->  report
    candidates/   scores.jsonl  training_set/  loras/<aspect>.safetensors  loras/mixture[-<variant>].mol.safetensors
                                                                   eval/<variant>/   report/
                                                                   eval/uniform_search/ (the weight chosen
                                                                   on the validation prompts)

Every function writes its output under a temporary name and renames it when complete (through the
library it calls: ``generate_candidates``, ``ScoreTable.save``, ``safe_io.atomic_dir``, the
trainers' atomic saves), so a stage interrupted at any point leaves either nothing or its whole
output under the final name. Each function loads the base model it needs from disk: an evaluation
variant never inherits rounding left in the weights by an earlier variant's fused LoRA, so every
output depends only on its own inputs (what makes a resumed run equal an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..image_files import load_image_file
from ..models.loading import load_base_model
from ..models.pipelines import LoraAdapters, equal_weight_merge, resolve_device, resolve_dtype, single_lora
from ..progress import Progress
from ..rewards.base import score_aspects
from ..rewards.registry import get_scorer
from ..rewards.score_table import ScoreTable, image_fingerprints
from ..rewards.selection import JOINT, select_best_per_prompt, with_joint_scores
from ..safe_io import atomic_dir, atomic_write_text
from ..trainer.launcher import LaunchOptions
from ..trainer.lora_job import train_or_reuse
from ..trainer.lora_merges import MERGE_METHODS, MergedLoRAs
from ..trainer.mix_diffusers import MixtureAdapters
from ..trainer.mol_file import MOL_SUFFIX
from ..trainer.train_gate import train_gate_or_reuse
from ..training_set.folders import scan_replay_dir
from ..training_set.manifest import describe_empty, empty_aspects
from ..training_set.writer import write_training_set as write_kohya_set
from .config import mixture_name, replay_count
from .evaluate import aspect_scales, grid_from_tables, normalised_change
from .generate import generate_candidates, read_candidates
from .report import MERGE_KINDS, Variant, read_report, report_from_eval_dir, write_variants_file

logger = logging.getLogger(__name__)

REPLAY_INDEX = "replay.jsonl"
REPLAY_PREFIX = "replay_"

ProgressCallback = Callable[[int, int], None]  # (done, total)
TrainEventCallback = Callable[[str, dict], None]  # (job name, trainer event)


# -- folders of one round ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundPaths:
    """Where round ``number`` of a loop writes (``<output_dir>/round-<number>/``)."""

    root: Path

    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    @property
    def scores(self) -> Path:
        return self.root / "scores.jsonl"

    @property
    def training_set(self) -> Path:
        return self.root / "training_set"

    @property
    def gate_set(self) -> Path:
        """The gate's own training set (``[dataset] gate_data = "joint"``): the jointly best images."""
        return self.root / "gate_set"

    @property
    def loras(self) -> Path:
        return self.root / "loras"

    def lora(self, aspect: str) -> Path:
        return self.loras / f"{aspect}.safetensors"

    @property
    def mixture(self) -> Path:
        return self.gate_file()

    def gate_file(self, variant: str | None = None) -> Path:
        """The [gate] mixture's MoL file, or that of ``[gate_variants.<variant>]``."""
        return self.loras / f"{mixture_name(variant)}{MOL_SUFFIX}"

    @property
    def runs(self) -> Path:
        """Training work folders (checkpoints, logs): ``runs/<name>-<fingerprint>/``."""
        return self.root / "runs"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def uniform_search(self) -> Path:
        """The uniform merge weights sampled on the validation prompts, and the one chosen."""
        return self.eval / "uniform_search"

    @property
    def report(self) -> Path:
        return self.root / "report"


# -- models and adapters ---------------------------------------------------------------------------------

def load_model(config, *, compute_hash: bool = False):
    """A fresh ``BaseModel`` of the config's checkpoint in the generation dtype."""

    dtype = resolve_dtype(config.dtype, resolve_device(config.device))
    model = config.model
    return load_base_model(model.base_model, arch=model.arch, prediction_type=model.prediction_type,
                           config_dir=model.model_config_dir or None, torch_dtype=dtype, compute_hash=compute_hash,
                           text_encoders=model.text_encoders, vae=model.vae or None)


MERGE_LABELS = {"merge": "equal-weight merge (1/N)", "sum": "sum (each LoRA at weight 1)",
                "uniform": "best uniform weight", "ties": "TIES merge", "dare_linear": "DARE merge",
                "dare_ties": "DARE-TIES merge"}
assert set(MERGE_LABELS) == set(MERGE_KINDS) and set(MERGE_METHODS) < set(MERGE_KINDS)


def round_adapters(kind: str, *, loras: Sequence[Path], mixture: Path | None, gate_mode: str = "dynamic",
                   weight: float = 1.0, density: float = 0.5):
    """``adapters_for(base)`` for a variant kind: None (base), one LoRA, a merge baseline (``weight``:
    each LoRA's weight in ``uniform`` and the peft merges, whose ``density`` is the share of each
    delta kept) or the gated mixture."""

    if kind == "base":
        return lambda base: None
    if kind == "lora":
        (path,) = loras
        return lambda base: single_lora(path)
    if kind == "merge":
        return lambda base: equal_weight_merge(list(loras))
    if kind in ("sum", "uniform"):
        every = 1.0 if kind == "sum" else weight
        return lambda base: LoraAdapters(list(loras), [every] * len(loras), label=f"{kind} {every:g}")
    if kind in MERGE_METHODS:
        return lambda base: MergedLoRAs(list(loras), base, method=kind, weights=[weight] * len(loras),
                                        density=density)
    if kind == "gated":
        if len(loras) == 1 and mixture is None:  # one aspect: its LoRA is the round's whole model
            return lambda base: single_lora(loras[0])

        return lambda base: MixtureAdapters(mixture, base, mode=gate_mode)
    raise ValueError(f"unknown variant kind {kind!r}")


# Loading the model and applying and removing adapters, one variant at a time: evaluation variants are
# sampled side by side in threads (loop/run.py), and these steps touch process-wide state: transformers'
# loading sets up weights on the meta device (two loads at once failed: "Unsupported device type
# 'meta'"), the DARE merges draw their masks from torch's global generator (seeded and restored around
# the draw, as peft's LoRA layer set-up draws from it too), and the LoRA loaders change the warnings
# filters for a moment. Sampling and scoring run unlocked.
_SHARED_STATE_LOCK = threading.RLock()


def serialised(adapters):
    """``adapters`` (``prepare(pipe) -> context manager``) whose entry and exit hold ``_SHARED_STATE_LOCK``."""
    if adapters is None:
        return None

    @contextlib.contextmanager
    def prepare(pipe):
        with _SHARED_STATE_LOCK:
            context = adapters(pipe)
            value = context.__enter__()
        try:
            yield value
        except BaseException:
            with _SHARED_STATE_LOCK:
                if not context.__exit__(*sys.exc_info()):
                    raise
        else:
            with _SHARED_STATE_LOCK:
                context.__exit__(None, None, None)

    if hasattr(adapters, "describe"):  # generation.json records what was applied
        prepare.describe = adapters.describe
    return prepare


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch's intra-op threads set to ``count`` (at least 1) for the block, restored after: while
    ``count`` jobs share the cores, each samples with its share of the threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- generate --------------------------------------------------------------------------------------------

def generate_images(config, out_dir: Path, prompts: Sequence[str], *, k: int | None = None,
                    seeds: Sequence[int] | None = None, base_seed: int = 0, adapters_for=None,
                    save_latents: bool = False, progress: ProgressCallback | None = None,
                    show_progress: bool = True, progress_label: str = "generate", workers: int = 1) -> dict[str, Any]:
    """Sample ``prompts`` x seeds into ``out_dir`` (replacing an unfinished earlier attempt);
    ``workers``: batches at once (``generate_candidates``)."""

    with _SHARED_STATE_LOCK:
        base = load_model(config, compute_hash=save_latents)
        adapters = serialised(adapters_for(base)) if adapters_for is not None else None
    result = generate_candidates(
        base, prompts, k=k, seeds=seeds, base_seed=base_seed, settings=config.generation, out_dir=out_dir,
        overwrite=True, save_latents=save_latents, adapters=adapters, device=config.device, dtype=config.dtype,
        return_images=False, progress=progress, show_progress=show_progress, progress_label=progress_label,
        workers=workers)
    return {"images": len(result.records), "prompts": len(prompts)}


# -- score -----------------------------------------------------------------------------------------------

def build_scorers(config) -> dict[str, Any]:
    """{aspect: Scorer}. Errors (missing weights, a missing extra, a bad option) for every aspect are
    collected into one message."""

    device = str(resolve_device(config.device))
    scorers, problems = {}, []
    for aspect, name in config.resolved_aspects().items():
        try:
            scorers[aspect] = get_scorer(name, search_dirs=config.scoring.models_dir, device=device)
        except (ValueError, FileNotFoundError, ImportError) as exc:
            problems.append(f"[aspects] {aspect} = {name!r}: {exc}")
    if problems:
        raise ValueError("the scorers can't be loaded:\n  - " + "\n  - ".join(problems))
    return scorers


def score_folder(folder: Path, scorers: Mapping[str, Any], out_file: Path, *, batch_size: int = 64,
                 progress: ProgressCallback | None = None, show_progress: bool = True, desc: str = "score"):
    """Score every image of a candidates folder (read back from its PNGs, so scores are reproducible
    from disk) and save the ScoreTable to ``out_file``."""
    import torch


    records, _summary = read_candidates(folder)
    columns: dict[str, list[torch.Tensor]] = {aspect: [] for aspect in scorers}
    judged: dict[str, list[torch.Tensor]] = {aspect: [] for aspect in scorers}
    fingerprints: list[str] = []
    bar = Progress(len(records), desc, unit="img", enabled=show_progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = torch.stack([torch.from_numpy(load_image_file(folder / r.file)).float() / 255.0 for r in chunk])
        scores = score_aspects(scorers, images, [r.prompt for r in chunk])
        for aspect, values in scores.items():
            columns[aspect].append(values)
            judged[aspect].append(scores.judged[aspect])
        fingerprints += image_fingerprints(images)
        done = min(start + batch_size, len(records))
        bar.update(len(chunk))
        if progress is not None:
            progress(done, len(records))
    bar.close()
    table = ScoreTable.from_scores(
        {aspect: torch.cat(parts) for aspect, parts in columns.items()}, dict(scorers),
        [r.prompt for r in records], seeds=[r.seed for r in records],
        prompt_indices=[r.prompt_index for r in records], candidate_indices=[r.candidate_index for r in records],
        image_ids=[r.file for r in records], judged={aspect: torch.cat(parts) for aspect, parts in judged.items()},
        fingerprints=fingerprints)
    table.save(out_file, overwrite=True)
    return table


# -- filter -----------------------------------------------------------------------------------------------

def write_training_set(config, scores_file: Path, candidates: Path, out_dir: Path, *,
                       progress: ProgressCallback | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Best image per prompt and aspect (above the aspect's threshold) -> a kohya training set, plus
    the replay images (real captioned images, ``replay_fraction`` per selected image) in every
    aspect's folder, listed in ``replay.jsonl``."""
    table = ScoreTable.load(scores_file)
    thresholds = {aspect: config.thresholds.get(aspect, "none") for aspect in config.aspects}
    selection = select_best_per_prompt(table, thresholds, aspects=list(config.aspects))
    for aspect, chosen in selection.aspects.items():
        if not chosen.kept:  # recorded in the set's dataset.json; the later stages leave the aspect out
            logger.warning("aspect %r: no candidate passed its threshold (or its scorer judged none): no LoRA is "
                           "trained for it, the gate mixes the other aspects", aspect)
    info = _write_selection(config, table, selection, candidates, out_dir, progress=progress,
                            show_progress=show_progress)
    info["mean_score"] = {a: sum(v) / len(v) for a, v in table.scores.items()}
    info["not_trained"] = sorted(a for a, c in selection.aspects.items() if not c.kept)
    return info


def write_gate_set(config, scores_file: Path, candidates: Path, out_dir: Path) -> dict[str, Any]:
    """The gate's own training set (``[dataset] gate_data = "joint"``): the jointly best image of each
    prompt (``rewards.selection.with_joint_scores``, no threshold) in one folder ``<repeats>_joint``,
    with its replay images."""
    table = with_joint_scores(ScoreTable.load(scores_file), list(config.aspects))
    selection = select_best_per_prompt(table, "none", aspects=[JOINT])
    return _write_selection(config, table, selection, candidates, out_dir, show_progress=False)


def _write_selection(config, table: ScoreTable, selection, candidates: Path, out_dir: Path, *,
                     progress: ProgressCallback | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Write the selected candidates and the replay images as the training set ``out_dir``."""
    from safetensors.torch import load_file

    images = [candidates / image_id for image_id in table.image_ids]
    latents, metadata = None, None
    if config.dataset.save_latents:
        records, summary = read_candidates(candidates)
        by_file = {r.file: r.latents for r in records}
        kept = {row for chosen in selection.aspects.values() for row in chosen.kept}
        latents = [load_file(str(candidates / by_file[image_id]))["latents"] if row in kept and by_file.get(image_id)
                   else None for row, image_id in enumerate(table.image_ids)]
        metadata = {"vae_sha256": summary.get("vae_sha256") or ""}
    replay = scan_replay_dir(config.dataset.replay_dir) if config.dataset.replay_fraction > 0 else []
    bar = Progress(sum(len(chosen.kept) for chosen in selection.aspects.values()), "write training set", unit="img",
                   enabled=show_progress)

    def written_so_far(done: int, total: int) -> None:
        bar.set(done)
        if progress is not None:
            progress(done, total)

    with bar, atomic_dir(out_dir, overwrite=True, what="training set") as temp:
        # training_set.writer publishes its own folder atomically; it is written inside this
        # temporary folder and its contents moved up, so the replay images join it before the whole
        # set appears under its final name.
        written = write_kohya_set(temp, "selected", table, selection, images, repeats=config.dataset.repeats,
                                  latents=latents, latents_metadata=metadata, progress=written_so_far,
                                  extra_summary={"replay_fraction": config.dataset.replay_fraction})
        for child in list(written.path.iterdir()):
            os.rename(child, temp / child.name)
        written.path.rmdir()
        rows = []
        for aspect, chosen in selection.aspects.items():
            if not chosen.kept:  # no folder: replay alone would teach the aspect nothing
                continue
            folder = temp / f"{config.dataset.repeats}_{aspect}"
            for path, caption in replay[:replay_count(config.dataset.replay_fraction, len(chosen.kept))]:
                name = f"{REPLAY_PREFIX}{path.stem}"
                shutil.copyfile(path, folder / f"{name}{path.suffix.lower()}")
                (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
                rows.append({"aspect": aspect, "file": f"{folder.name}/{name}{path.suffix.lower()}",
                             "caption": caption, "source": str(path)})
        (temp / REPLAY_INDEX).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
    kept = {aspect: len(chosen.kept) for aspect, chosen in selection.aspects.items()}
    replayed = {aspect: sum(1 for r in rows if r["aspect"] == aspect) for aspect in selection.aspects}
    logger.info("training set %s: kept %s, replay %s", out_dir.name, kept, replayed)
    return {"kept": kept, "replay": replayed,
            "mean_kept_score": {a: sum(table.scores[a][r] for r in c.kept) / len(c.kept) if c.kept else None
                                for a, c in selection.aspects.items()},
            }


def trained_aspects(config, training_set: Path) -> list[str]:
    """The config's aspects that kept images in ``training_set`` (in config order): the ones a LoRA
    is trained for. The others are recorded in its dataset.json with no image (``empty_aspects``)."""
    empty = empty_aspects(training_set)
    return [aspect for aspect in config.aspects if aspect not in empty]


def untrained_aspects(config, training_set: Path) -> dict[str, str]:
    """``{aspect: why it has no LoRA}`` for the config's aspects that kept no image."""
    empty = empty_aspects(training_set)
    return {aspect: describe_empty(aspect, empty[aspect]) for aspect in config.aspects if aspect in empty}


# -- train ------------------------------------------------------------------------------------------------

def training_environment(config) -> dict[str, str] | None:
    """The training processes' environment: this one, with ``threads_per_job`` threads if set."""
    threads = config.training.threads_per_job
    if not threads:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def launch_options(config):
    cpu = config.training.cpu or resolve_device(config.device).type == "cpu"
    return LaunchOptions(accelerate_config=config.training.accelerate_config or "auto", cpu=cpu)


def train_lora(config, aspect: str, paths: RoundPaths, *, on_event: TrainEventCallback | None = None,
               cancelled: threading.Event | None = None) -> dict[str, Any]:
    """One aspect's LoRA (``train_or_reuse``: a finished LoRA with the same inputs is reused, an
    interrupted one resumes from its last checkpoint)."""

    lora_config = config.lora_config(aspect=aspect, dataset_dir=str(paths.training_set), output_dir=str(paths.loras),
                                     work_dir=str(paths.runs / aspect), overwrite=True)
    result = train_or_reuse(
        lora_config, runs_root=paths.runs, options=launch_options(config), env=training_environment(config),
        on_event=(lambda event: on_event(aspect, event)) if on_event is not None else None,
        check_cancel=(lambda: cancelled.is_set()) if cancelled is not None else None)
    final_loss = result.loss_curve[-1][1] if result.loss_curve else None
    return {"lora": str(result.lora_path), "reused": result.reused, "final_loss": final_loss}


def run_parallel(jobs: Sequence[tuple[str, Callable[[threading.Event], Any]]], workers: int) -> dict[str, Any]:
    """Run ``job(cancelled)`` for every (name, job), ``workers`` at a time. The first failure (or a
    Ctrl-C here) sets ``cancelled`` so the other jobs stop their training processes, and is re-raised
    once every job has returned."""
    cancelled = threading.Event()
    if workers <= 1 or len(jobs) <= 1:
        return {name: job(cancelled) for name, job in jobs}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="versat2i-train") as pool:
        futures = {name: pool.submit(_unless_cancelled, job, cancelled) for name, job in jobs}
        try:
            done, _pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C while waiting: stop every job, then re-raise
            cancelled.set()
            raise
        failed = [f for f in futures.values() if f in done and f.exception() is not None]
        if failed:
            cancelled.set()
            wait(futures.values())
            raise failed[0].exception()  # the cause, not the other jobs' "cancelled"
    return {name: future.result() for name, future in futures.items()}


def _unless_cancelled(job, cancelled: threading.Event):
    if cancelled.is_set():
        raise RuntimeError("cancelled: another training job failed")
    return job(cancelled)


def train_gate(config, paths: RoundPaths, loras: Mapping[str, Path], *, on_event: TrainEventCallback | None = None,
               variant: str | None = None, cancelled: threading.Event | None = None) -> dict[str, Any]:
    """The Mixture-of-LoRA gate over this round's aspect LoRAs (``train_gate_or_reuse``): [gate], or
    ``[gate_variants.<variant>]``."""

    job = "gate" if variant is None else f"gate-{variant}"
    dataset = paths.gate_set if config.dataset.gate_data == "joint" else paths.training_set
    gate_config = config.gate_config(loras=[str(p) for p in loras.values()], aspects=list(loras),
                                     dataset_dir=str(dataset), output_dir=str(paths.loras),
                                     work_dir=str(paths.runs / job), overwrite=True, variant=variant)
    result = train_gate_or_reuse(
        gate_config, runs_root=paths.runs, options=launch_options(config), env=training_environment(config),
        on_event=(lambda event: on_event(job, event)) if on_event is not None else None,
        check_cancel=(lambda: cancelled.is_set()) if cancelled is not None else None)
    final_loss = result.loss_curve[-1][1] if result.loss_curve else None
    return {"mol": str(result.mol_path), "reused": result.reused, "final_loss": final_loss}


# -- evaluate ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalVariant:
    """One evaluated model: what ``loop/report.py`` calls a Variant, plus how to build it."""

    name: str  # "base", "lora:<aspect>", a merge kind, "gated", "gated:<gate variant>"
    dir: str
    kind: str
    aspect: str | None = None
    label: str | None = None
    gate_variant: str | None = None  # gated: the [gate_variants] entry (None: [gate])

    def report_variant(self):
        return Variant(name=self.name, dir=self.dir, kind=self.kind, aspect=self.aspect, label=self.label)


def evaluation_variants(config, trained: Sequence[str] | None = None) -> list[EvalVariant]:
    """The variants of ``[evaluation] variants`` in report order (the base first, one LoRA variant per
    aspect, one gated variant per gate; ``trained``: only those aspects' LoRAs, when some kept no
    image)."""
    variants = [EvalVariant("base", "base", "base", label="base model")]
    for kind in config.evaluation_variant_kinds():
        if kind == "lora":
            variants += [EvalVariant(f"lora:{a}", f"lora_{a}", "lora", a, f"LoRA {a}") for a in config.aspects
                         if trained is None or a in trained]
        elif kind in MERGE_KINDS:
            variants.append(EvalVariant(kind, kind, kind, label=MERGE_LABELS[kind]))
        elif kind == "gated":
            variants.append(EvalVariant("gated", "gated", "gated", label="gated mixture"))
            variants += [EvalVariant(f"gated:{name}", f"gated_{name}", "gated", label=f"gated mixture ({name})",
                                     gate_variant=name) for name in config.gate_variants]
    return variants


def variant_weight(config, variant: EvalVariant, paths: RoundPaths) -> float:
    """Each LoRA's weight in a weighted merge baseline: the uniform weight chosen on the validation
    prompts, else ``[evaluation] merge_weight`` (the peft merges)."""
    if variant.kind == "uniform":
        return float(json.loads((paths.uniform_search / UNIFORM_SEARCH_FILE).read_text(encoding="utf-8"))["chosen"])
    return config.evaluation.merge_weight


def evaluate_variant(config, variant: EvalVariant, paths: RoundPaths, scorers: Mapping[str, Any], *,
                     trained: Sequence[str] | None = None, progress: ProgressCallback | None = None,
                     show_progress: bool = True) -> dict[str, Any]:
    """Sample the evaluation grid with one variant and score it: ``eval/<dir>/`` with the images,
    candidates.jsonl and scores.jsonl (the folder ``versat2i report`` reads). ``trained``: the aspects
    with a LoRA (default: all), which the merges and the mixtures are made of."""
    trained = list(config.aspects) if trained is None else list(trained)
    loras = [paths.lora(variant.aspect)] if variant.kind == "lora" else [paths.lora(a) for a in trained]
    mixture = paths.gate_file(variant.gate_variant) if variant.kind == "gated" and len(trained) > 1 else None
    weight = variant_weight(config, variant, paths) if variant.kind in MERGE_KINDS else 1.0
    adapters_for = round_adapters(variant.kind, loras=loras, mixture=mixture, gate_mode=config.evaluation.gate_mode,
                                  weight=weight, density=config.evaluation.merge_density)
    folder = paths.eval / variant.dir
    info = sample_and_score(config, folder, config.evaluation_prompts(), adapters_for, scorers, progress=progress,
                            show_progress=show_progress, label=f"evaluate {variant.name}")
    if variant.kind in ("uniform", *MERGE_METHODS):
        info["weight"] = weight
    return info


def sample_and_score(config, folder: Path, prompts: Sequence[str], adapters_for, scorers: Mapping[str, Any], *,
                     progress: ProgressCallback | None = None, show_progress: bool = True,
                     label: str = "evaluate") -> dict[str, Any]:
    """``prompts`` on their evaluation seeds into ``folder``, scored into ``folder/scores.jsonl``."""
    info = generate_images(config, folder, prompts, k=config.evaluation.seeds_per_prompt,
                           seeds=config.evaluation_seeds(prompts), adapters_for=adapters_for, progress=progress,
                           show_progress=show_progress, progress_label=f"{label}: generate")
    table = score_folder(folder, scorers, folder / "scores.jsonl", batch_size=config.scoring.batch_size,
                         show_progress=show_progress, desc=f"{label}: score")
    info["mean"] = {aspect: sum(v) / len(v) for aspect, v in table.scores.items()}
    return info


UNIFORM_SEARCH_FILE = "search.json"


def search_uniform_weight(config, paths: RoundPaths, scorers: Mapping[str, Any], *,
                          progress: ProgressCallback | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Sample the validation prompts with every LoRA at each of ``[evaluation] uniform_weights`` and
    keep the weight with the best normalised score against the base (``loop/evaluate.py``; the
    base's images must be in ``eval/base``): ``eval/uniform_search/`` with a folder per weight and
    ``search.json`` (the scores and the chosen weight)."""
    prompts = config.validation_prompts()
    base = grid_from_tables({"base": ScoreTable.load(paths.eval / "base" / "scores.jsonl")})
    scales = aspect_scales(base.scores["base"])
    loras = [paths.lora(a) for a in trained_aspects(config, paths.training_set)]
    scores: dict[str, float] = {}
    reused: dict[str, str] = {}
    with atomic_dir(paths.uniform_search, overwrite=True, what="uniform weight search") as temp:
        for weight in config.evaluation.uniform_weights:
            evaluated = same_weights_variant(config, paths, weight)
            if evaluated is not None:  # that merge was sampled on every prompt already: its validation rows
                grid = grid_from_tables({"base": ScoreTable.load(paths.eval / evaluated / "scores.jsonl")})
                sampled = grid.subset([grid.prompts.index(p) for p in prompts])
                reused[f"{weight:g}"] = evaluated
            else:
                folder = temp / f"weight_{weight:g}"
                sample_and_score(config, folder, prompts, round_adapters("uniform", loras=loras, mixture=None,
                                                                         weight=weight), scorers,
                                 progress=progress, show_progress=show_progress)
                sampled = grid_from_tables({"base": ScoreTable.load(folder / "scores.jsonl")})
            scores[f"{weight:g}"] = normalised_change(base, sampled, scales)
        chosen = max(config.evaluation.uniform_weights, key=lambda w: scores[f"{w:g}"])
        result = {"validation_prompts": prompts, "scores": scores, "chosen": chosen, "reused": reused,
                  "score": "normalised change vs base on the validation prompts (loop/evaluate.py)"}
        atomic_write_text(temp / UNIFORM_SEARCH_FILE, json.dumps(result, indent=1), what="uniform search result")
    logger.info("uniform merge weight: %g (validation scores %s)", chosen, scores)
    return {"chosen": chosen, "scores": scores}


def evaluated_before_uniform(config) -> list[str]:
    """The uniform merges among the variants evaluated before ``uniform`` (``merge``: every LoRA at
    1/N, ``sum``: at 1), whose images the weight search reuses."""
    kinds = list(config.evaluation_variant_kinds())
    return [k for k in ("merge",
                        "sum") if k in kinds and "uniform" in kinds and kinds.index(k) < kinds.index("uniform")]


def same_weights_variant(config, paths: RoundPaths, weight: float) -> str | None:
    """The variant evaluated before ``uniform`` that is the uniform merge at ``weight`` (its folder
    name), else None."""
    weights = {"merge": 1.0 / len(trained_aspects(config, paths.training_set)), "sum": 1.0}
    return next((kind for kind in evaluated_before_uniform(config) if math.isclose(weight, weights[kind])), None)


def write_variants(config, paths: RoundPaths, round_number: int) -> Path:
    trained = trained_aspects(config, paths.training_set)
    return write_variants_file(
        paths.eval, [v.report_variant() for v in evaluation_variants(config, trained)], base="base",
        config={"round": round_number, "aspects": config.resolved_aspects(),
                "not_trained": untrained_aspects(config, paths.training_set),
                "evaluation_prompts": len(config.evaluation_prompts()),
                # the report evaluates each set apart and leads with the held-out prompts
                "prompt_sets": {"held_out": config.held_out_prompts(),
                                "train": config.train_prompts() if config.evaluation.include_train_prompts else []},
                "validation_prompts": config.validation_prompts(),
                "seeds_per_prompt": config.evaluation.seeds_per_prompt,
                "include_train_prompts": config.evaluation.include_train_prompts,
                "gate_mode": config.evaluation.gate_mode},
        overwrite=True)


# -- report -----------------------------------------------------------------------------------------------

def write_report(config, paths: RoundPaths, round_number: int) -> dict[str, Any]:
    title = f"VersaT2I loop {config.name!r}, round {round_number}"
    evaluation = config.evaluation
    report_from_eval_dir(paths.eval, paths.report, overwrite=True, title=title,
                         config={"loop_config": config.to_dict()}, resamples=evaluation.resamples,
                         seed=evaluation.bootstrap_seed, level=evaluation.level, unit=evaluation.unit)
    return {"markdown": read_report(paths.report)["markdown"], "html": str(paths.report / "report.html")}

