"""``LoopConfig``: everything one run of the VersaT2I loop needs, as one TOML file.

    versat2i loop --config loop.toml          (``versat2i loop --print-config [demo]`` prints every setting)

A frozen dataclass made of sections; every section is a ``trainer.config.ConfigFile`` (the same
strict parsing, unknown-key hints and fingerprints as the trainer's configs), and the LoRA / gate
sections are overrides of ``LoraTrainConfig`` / ``GateTrainConfig`` fields, checked with those
classes' own ``problems()``::

    name = "my-loop"                 # a label (report title)
    output_dir = "runs/my-loop"      # every stage's output, markers and the run log
    rounds = 1                       # round r > 1 samples its candidates with round r-1's mixture
    device = "auto"                  # generation / scoring device (auto: the GPU when there is one)
    dtype = "auto"                   # generation dtype (auto: float16 on CUDA, float32 elsewhere)

    [model]        base_model (file or diffusers folder), arch, prediction_type, model_config_dir
    [prompts]      train = [...] or train_file; held_out = [...] or held_out_file;
                   candidates_per_prompt (K >= 2), seed
    [generation]   loop.generate.GenerationSettings: steps, guidance_scale, scheduler, width, height,
                   batch_size, negative_prompt
    [aspects]      aspect = "scorer name" (any rewards.registry scorer; "" = the aspect's default)
    [thresholds]   aspect = "none" | 5.5 | "p75"   (rewards.selection.Threshold)
    [scoring]      models_dir = [folders with scorer weights], batch_size
    [dataset]      repeats, save_latents, replay_dir + replay_fraction (real captioned images mixed
                   into every aspect's training set, like kohya's regularisation images), gate_data
    [lora]         any LoraTrainConfig field (rank, max_train_steps, learning_rate, resolution...)
    [lora_aspects.<aspect>]  one aspect's overrides of [lora] (e.g. a longer schedule for a weak signal)
    [gate]         any GateTrainConfig field (granularity, gate_kind, timestep_knots, balance_weight...)
    [gate_variants.<name>]  further gates to train and evaluate next to [gate] (each: GateTrainConfig
                   overrides on top of [gate]), e.g. to compare gate forms; variant ``gated:<name>``
    [training]     parallel_jobs, threads_per_job, accelerate_config, cpu
    [evaluation]   seeds_per_prompt, seed, include_train_prompts, variants (base, lora, the merge
                   baselines merge / sum / uniform / ties / dare_linear / dare_ties, gated),
                   validation_fraction, uniform_weights, merge_weight, merge_density, gate_mode,
                   bootstrap

Relative paths in a file are relative to that file's folder. ``problems()`` lists every mistake
(each naming the setting and the fix) without touching the disk beyond reading; ``validate()``
raises them as one ``ValueError``. The loop validates before it creates anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..aspects import ASPECT_NAME_MAX_LENGTH, ASPECT_NAME_RULE, aspect_name_problem
from ..config_file import ConfigFile, dump_flat_toml, field_comments, toml_value
from ..rewards.registry import DEFAULT_SCORERS, SCORERS, list_scorers, split_name
from ..rewards.selection import JOINT, Threshold
from ..safe_io import folder_problem, path_problem
from ..trainer.config import ARCH_CHOICES, PREDICTION_TYPES, LoraTrainConfig
from ..trainer.train_gate import GateTrainConfig
from ..training_set.folders import scan_replay_dir
from .evaluate import validation_prompts
from .generate import GenerationSettings, check_prompts, read_prompt_file
from .report import MERGE_KINDS

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - python 3.10
    pass

VARIANT_KINDS = ("base", "lora", *MERGE_KINDS, "gated")
GATE_MODES = ("dynamic", "bake")
GATE_DATA = ("union", "joint")
BOOTSTRAP_UNITS = ("pairs", "prompts")
# LoRA / gate fields the loop sets itself for every job (a value in [lora] / [gate] would be ignored).
LOOP_OWNED_TRAINING_FIELDS = frozenset({
    "base_model", "arch", "prediction_type", "model_config_dir", "dataset_dir", "output_dir", "output_name",
    "work_dir", "overwrite", "aspect", "loras", "aspects"})


# -- sections --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection(ConfigFile):
    """The checkpoint the loop improves (every LoRA and the mixture are add-ons of it)."""

    base_model: str = ""  # single-file checkpoint (.safetensors) or diffusers folder; a DiT family: its diffusion model
    text_encoders: tuple[str, ...] = ()  # a DiT family's text encoder file(s), as ComfyUI's Load CLIP reads them
    vae: str = ""  # a DiT family's VAE file, as ComfyUI's Load VAE reads it
    arch: str = "auto"  # auto (detect) or a family of models/architectures.py
    prediction_type: str = "auto"  # auto | epsilon | v_prediction | sample
    model_config_dir: str = ""  # diffusers configs for a single file whose shapes differ from the real models


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptsSection(ConfigFile):
    """The loop's prompts, the held-out prompts it never trains on, and K candidates per prompt."""

    train: tuple[str, ...] = ()  # the loop's prompts ...
    train_file: str = ""  # ... or a text file, one per line ('#' comments and blank lines skipped)
    held_out: tuple[str, ...] = ()  # evaluation-only prompts ...
    held_out_file: str = ""  # ... or a file
    candidates_per_prompt: int = 4  # K: images sampled per prompt, the best one per aspect is kept
    seed: int = 0  # candidate c of prompt p in round r gets seed + (r - 1) * N * K + p * K + c


@dataclasses.dataclass(frozen=True)
class GenerationConfig(GenerationSettings, ConfigFile):
    """How every candidate and evaluation image is sampled.

    ``loop.generate.GenerationSettings`` with the config-file methods (it *is* one)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoringSection(ConfigFile):
    """Where the scorers find their weight files (docs/scorers.md names each file)."""

    models_dir: tuple[str, ...] = ()  # folders searched for scorer weights (clip/, aesthetic/, hps/...)
    batch_size: int = 64  # images loaded and scored at once (bounds memory, never changes a score)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSection(ConfigFile):
    """The training set written from the best candidates (kohya layout), and replay of real images."""

    repeats: int = 1  # kohya repeats: folder <repeats>_<aspect>
    save_latents: bool = False  # keep generation latents next to the images (the trainer reuses them)
    replay_dir: str = ""  # real captioned images (<name>.png + <name>.txt) ...
    replay_fraction: float = 0.0  # ... this many per selected image, added to every aspect's set
    # What the gate trains on: "union" (every aspect's set, as MoLE) or "joint" (one more set, the image
    # of each prompt best at all aspects at once: the mixture's goal; rewards.selection.with_joint_scores)
    gate_data: str = "joint"  # "joint" (the jointly best images, their own set) | "union" (MoLE's data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSection(ConfigFile):
    """How the training processes run (speed only: never changes what they learn)."""

    parallel_jobs: int = 1  # LoRA trainings at once (own processes); evaluation variants run beside them and the gate
    threads_per_job: int = 0  # OMP/torch threads of each training process (0 = inherit the environment)
    accelerate_config: str = "auto"  # "auto" (the user's default accelerate config, else 1 process) or a file
    cpu: bool = False  # train on the CPU even when a GPU is present


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationSection(ConfigFile):
    """Every variant sampled on the same prompts and seeds, compared with the base model."""

    seeds_per_prompt: int = 8  # S seeds per evaluation prompt, the same for every variant
    # Evaluation prompt p gets seeds seed + p*S .. seed + p*S + S - 1: every (prompt, seed) pair has
    # its own noise, so pairs are independent draws (what the bootstrap CIs and the seed-to-seed
    # spread assume; with one seed list shared by every prompt, a lucky noise draw would lift all
    # prompts at once and both would understate the run-to-run spread).
    seed: int = 1_000_000_000  # first evaluation seed (far from the candidates' seeds)
    include_train_prompts: bool = False  # also evaluate the loop's prompts (with the evaluation seeds)
    variants: tuple[str, ...] = ()  # of VARIANT_KINDS (lora: one per aspect); () = every one that applies
    # Share of the evaluation prompts set aside to choose settings on (the uniform merge weight; the gate
    # form when comparing [gate_variants]); the report's figures come from the other prompts.
    validation_fraction: float = 0.25  # share of the evaluation prompts set aside to choose settings on
    uniform_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # "uniform": the best of these on validation
    merge_weight: float = 1.0  # each LoRA's weight in the ties / dare merges (1: full strength, as "sum")
    merge_density: float = 0.5  # ties / dare: the share of each LoRA's weight changes kept
    gate_mode: str = "dynamic"  # dynamic: the gate runs per token; bake: its mean merged once
    resamples: int = 2000  # bootstrap resamples
    bootstrap_seed: int = 0  # seed of the bootstrap resamples
    level: float = 0.95  # confidence level of the intervals and of the seed-to-seed spread
    unit: str = "pairs"  # bootstrap unit: (prompt, seed) pairs or whole prompts


SECTIONS: dict[str, type[ConfigFile]] = {
    "model": ModelSection, "prompts": PromptsSection, "generation": GenerationConfig, "scoring": ScoringSection,
    "dataset": DatasetSection, "training": TrainingSection, "evaluation": EvaluationSection,
}
MAPPING_SECTIONS = ("aspects", "thresholds", "lora", "lora_aspects", "gate", "gate_variants")
NESTED_SECTIONS = ("lora_aspects", "gate_variants")  # tables of tables: [<section>.<name>]
# What the tables keyed by aspect or by trainer setting hold (their keys have no field comments).
MAPPING_SECTION_NOTES = {
    "aspects": 'The quality aspects, each with its scorer: aspect = "scorer" ("" = the aspect\'s default; '
               "docs/scorers.md)",
    "thresholds": 'Per aspect, what a prompt\'s best image must score to be kept: "none" (always kept), a score, '
                  'or "p75" (a percentile of all candidates)',
    "lora": "Training of each aspect LoRA (trainer/config.py LoraTrainConfig; the loop sets the model, the data and "
            "the output paths)",
    "gate": "Training of the gate that mixes the aspect LoRAs (trainer/train_gate.py GateTrainConfig); settings "
            "shown commented out take the [lora] value unless set here",
    "lora_aspects": "One aspect's overrides of [lora], a table [lora_aspects.<aspect>] each (e.g. a longer schedule "
                    "for a weak signal)",
    "gate_variants": "Further gates to train and evaluate next to [gate], a table [gate_variants.<name>] of [gate] "
                     "overrides each (evaluated as gated:<name>)",
}
# The order ``commented_toml`` prints the sections in: the loop's own order.
PRINT_ORDER = ("model", "prompts", "generation", "aspects", "thresholds", "scoring", "dataset", "lora",
               "lora_aspects", "gate", "gate_variants", "training", "evaluation")
TOP_LEVEL = ("name", "output_dir", "rounds", "device", "dtype")
# Paths resolved against the config file's folder: (section or None, field).
PATH_FIELDS = ((None, "output_dir"), ("model", "base_model"), ("model", "model_config_dir"), ("model", "vae"),
               ("prompts", "train_file"), ("prompts", "held_out_file"), ("dataset", "replay_dir"),
               ("training", "accelerate_config"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig(ConfigFile):
    """One loop run. Build it from TOML (``load``), a dict (``from_dict``) or keywords."""

    name: str = "versat2i-loop"  # a label (report title)
    output_dir: str = ""  # every stage's output, markers and the run log
    rounds: int = 1  # round r > 1 samples its candidates with round r-1's mixture
    device: str = "auto"  # generation / scoring device (auto: the GPU when there is one)
    dtype: str = "auto"  # generation dtype (auto: float16 on CUDA, float32 elsewhere)
    model: ModelSection = ModelSection()
    prompts: PromptsSection = PromptsSection()
    generation: GenerationConfig = GenerationConfig()
    aspects: Mapping[str, str] = dataclasses.field(default_factory=dict)
    thresholds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    scoring: ScoringSection = ScoringSection()
    dataset: DatasetSection = DatasetSection()
    lora: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lora_aspects: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    gate: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gate_variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"name", "output_dir"})

    # -- dict / TOML ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in TOP_LEVEL}
        for name in SECTIONS:
            data[name] = getattr(self, name).to_dict()
        for name in MAPPING_SECTIONS:
            data[name] = dict(getattr(self, name))
        for name in NESTED_SECTIONS:
            data[name] = {key: dict(overrides) for key, overrides in getattr(self, name).items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "loop config") -> LoopConfig:
        """Strict: unknown keys (with a did-you-mean), wrong types and bad section shapes are one
        ``ValueError`` listing each. Aspects may be a table {aspect: scorer} or a list of aspects
        (each with its default scorer)."""
        values, failures = cls.parse_settings(data)
        if failures:
            raise ValueError(f"{source}:\n  - " + "\n  - ".join(failures.values()))
        return cls(**values)

    @classmethod
    def parse_settings(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """(what parses, {setting: its problem}); a setting is ``name`` or ``[section] name``. A
        section with bad settings is built from its good ones (``load_checked`` validates them too)."""
        if not isinstance(data, Mapping):
            raise ValueError("expected a table of settings")  # noqa: TRY004 -- a user error
        known = [*TOP_LEVEL, *SECTIONS, *MAPPING_SECTIONS]
        failures = {key: _unknown(key, known, "") for key in data if key not in known}
        values: dict[str, Any] = {}
        for name in TOP_LEVEL:
            if name in data:
                hint = {"rounds": int}.get(name, str)
                value = data[name]
                if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
                    failures[name] = f"{name}: expected a whole number, got {value!r}"
                elif hint is str and not isinstance(value, (str, os.PathLike)):
                    failures[name] = f"{name}: expected text, got {value!r}"
                else:
                    values[name] = os.fspath(value) if isinstance(value, os.PathLike) else value
        for name, section in SECTIONS.items():
            if name not in data:
                continue
            table = data[name]
            if isinstance(table, ConfigFile):
                values[name] = table
                continue
            if not isinstance(table, Mapping):
                failures[name] = f"[{name}]: expected a table of settings, got {table!r}"
                continue
            good, bad = section.parse_settings(dict(table))
            failures.update({f"[{name}] {key}": f"[{name}] {problem}" for key, problem in bad.items()})
            values[name] = section(**good)
        if "aspects" in data:
            aspects = data["aspects"]
            if isinstance(aspects, (list, tuple)):
                aspects = {str(a): "" for a in aspects}
            if not isinstance(aspects, Mapping) or not all(isinstance(v, str) for v in aspects.values()):
                failures["aspects"] = ('[aspects]: expected a table aspect = "scorer name" (or a list of aspects), '
                                       f"got {data['aspects']!r}")
            else:
                values["aspects"] = {str(k): v for k, v in aspects.items()}
        if "thresholds" in data:
            thresholds = data["thresholds"]
            if not isinstance(thresholds, Mapping):
                failures["thresholds"] = '[thresholds]: expected a table aspect = "none" | number | "p75"'
            else:
                values["thresholds"] = {str(k): (v if isinstance(v, str) else _threshold_text(v))
                                        for k, v in thresholds.items()}
        for name in ("lora", "gate"):
            if name in data:
                if not isinstance(data[name], Mapping):
                    failures[name] = f"[{name}]: expected a table of settings"
                else:
                    values[name] = dict(data[name])
        for name in NESTED_SECTIONS:
            if name in data:
                tables = data[name]
                if not isinstance(tables, Mapping) or not all(isinstance(v, Mapping) for v in tables.values()):
                    failures[name] = f"[{name}]: expected tables [{name}.<name>] of settings"
                else:
                    values[name] = {str(k): dict(v) for k, v in tables.items()}
        return values, failures

    @classmethod
    def load_checked(cls, path: str | os.PathLike, *, check_paths: bool = True) -> LoopConfig:
        """``load`` and ``validate`` in one, every problem at once: the settings that do not parse
        (left at their defaults) and ``problems()`` of the rest, each naming the setting."""
        path = Path(path)
        values, failures = cls.parse_settings(cls.read_settings(path))
        config = cls(**values).resolve_paths(path.resolve().parent)

        def about_a_failed_setting(problem: str) -> bool:  # already reported as not parsing
            for key in failures:
                if key.startswith("["):
                    section, _, name = key.rpartition(" ")
                    if problem.startswith(section) and (f"{name}=" in problem or f"{name}:" in problem):
                        return True
                elif problem.startswith((f"{key}=", f"{key}:")):
                    return True
            return False

        problems = list(failures.values()) + [
            problem for problem in config.problems(check_paths=check_paths) if not about_a_failed_setting(problem)]
        if problems:
            raise ValueError(f"invalid loop config: {path}\n  - " + "\n  - ".join(problems))
        return config

    def to_toml(self) -> str:
        data = self.to_dict()
        parts = [dump_flat_toml({name: data[name] for name in TOP_LEVEL})]
        for name in (*SECTIONS, *MAPPING_SECTIONS):
            if name in NESTED_SECTIONS:  # a table of tables: [<section>.<name>]
                for variant, overrides in data[name].items():
                    table = {k: v for k, v in overrides.items() if v is not None}
                    parts.append(f"\n[{name}.{variant}]\n" + (dump_flat_toml(table) if table else ""))
                continue
            table = {k: v for k, v in data[name].items() if v is not None}
            parts.append(f"\n[{name}]\n" + (dump_flat_toml(table) if table else ""))
        return "".join(parts)

    def commented_toml(self, header: Sequence[str] = ()) -> str:
        """This config as TOML with every setting the loop accepts, each under a one-line comment
        (the field comments of the config classes, ``config_file.field_comments``), each section
        under what it is for; ``header`` lines go on top as comments. Blocks are separated by
        blank lines: the header, the top-level settings, then one block per section. ``from_dict``
        reads it back to the same settings."""
        lines = [f"# {line}".rstrip() for line in header] + ([""] if header else [])
        notes = field_comments(LoopConfig)
        for name in TOP_LEVEL:
            lines += _commented_setting(name, getattr(self, name), notes.get(name, ""))
        for section in PRINT_ORDER:
            if section in SECTIONS:
                cls = SECTIONS[section]
                lines += ["", f"# {cls.__doc__.strip().splitlines()[0]}", f"[{section}]"]
                notes = field_comments(cls)
                for field in dataclasses.fields(cls):
                    value = getattr(getattr(self, section), field.name)
                    lines += _commented_setting(field.name, value, notes.get(field.name, ""))
            elif section in NESTED_SECTIONS:  # [<section>.<name>] tables; none set: the note alone
                notes = field_comments(LoraTrainConfig if section == "lora_aspects" else GateTrainConfig)
                tables = getattr(self, section)
                lines += ["", f"# {MAPPING_SECTION_NOTES[section]}" + ("" if tables else ": none set")]
                for number, (name, overrides) in enumerate(tables.items()):
                    lines += ([] if number == 0 else ["", f"# {MAPPING_SECTION_NOTES[section]}"])
                    lines.append(f"[{section}.{name}]")
                    for key, value in overrides.items():
                        lines += _commented_setting(key, value, notes.get(key, ""))
            else:
                lines += ["", f"# {MAPPING_SECTION_NOTES[section]}", f"[{section}]"]
                for key, value, note, inherited in self._mapping_settings(section):
                    lines += _commented_setting(key, value, note, commented_out=inherited)
        return "\n".join(lines) + "\n"

    def _mapping_settings(self, section: str) -> list[tuple[str, Any, str, bool]]:
        """(key, value, comment, shown commented out) for every key of [aspects], [thresholds],
        [lora] or [gate]: every aspect, and every trainer setting the loop passes on (its default
        unless set; gate data settings not set in [gate] come from [lora], so they are shown
        commented out)."""
        if section == "aspects":
            rows = []
            for aspect, scorer in self.resolved_aspects().items():
                entry = SCORERS.get(split_name(scorer)[0]) if scorer else None
                rows.append((aspect, self.aspects[aspect], entry.summary if entry else "", False))
            return rows
        if section == "thresholds":
            rows = []
            for aspect in self.aspects:
                threshold = self.thresholds.get(aspect, "none")
                rows.append((aspect, threshold, _threshold_meaning(threshold), False))
            return rows
        cls = LoraTrainConfig if section == "lora" else GateTrainConfig
        notes = field_comments(cls)
        given = dict(getattr(self, section))
        rows = []
        for field in dataclasses.fields(cls):
            if field.name in LOOP_OWNED_TRAINING_FIELDS:
                continue
            inherited = section == "gate" and field.name in GATE_INHERITS_FROM_LORA and field.name not in given
            value = given.get(field.name, self.lora.get(field.name, field.default) if inherited else field.default)
            rows.append((field.name, value, notes.get(field.name, ""), inherited))
        return rows

    @classmethod
    def load(cls, path: str | os.PathLike) -> LoopConfig:
        """Read a ``.toml`` / ``.json`` file; relative paths in it are taken relative to its folder."""
        path = Path(path)
        config = super().load(path)
        return config.resolve_paths(path.resolve().parent)

    def resolve_paths(self, root: str | os.PathLike) -> LoopConfig:
        """A copy with every relative path made absolute against ``root``; ``~`` expanded."""
        root = Path(root)

        def absolute(value: str) -> str:
            if not value or (value == "auto"):
                return value
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else (root / path).resolve())

        changes: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        for section, field in PATH_FIELDS:
            if section is None:
                changes[field] = absolute(getattr(self, field))
            else:
                sections.setdefault(section, {})[field] = absolute(getattr(getattr(self, section), field))
        for section, fields in sections.items():
            changes[section] = getattr(self, section).replace(**fields)
        changes["scoring"] = changes.get("scoring", self.scoring).replace(
            models_dir=tuple(absolute(d) for d in self.scoring.models_dir))
        changes["model"] = changes.get("model", self.model).replace(
            text_encoders=tuple(absolute(f) for f in self.model.text_encoders))
        return self.replace(**changes)

    # -- derived values --------------------------------------------------------------------------------
    def resolved_aspects(self) -> dict[str, str]:
        """{aspect: scorer name}, the aspect's default scorer where none is named."""

        return {aspect: (scorer.strip() or DEFAULT_SCORERS.get(aspect, "")) for aspect, scorer in self.aspects.items()}

    def train_prompts(self) -> list[str]:
        return _prompt_list(self.prompts.train, self.prompts.train_file, "train")

    def held_out_prompts(self) -> list[str]:
        if not self.prompts.held_out and not self.prompts.held_out_file:
            return []
        return _prompt_list(self.prompts.held_out, self.prompts.held_out_file, "held_out")

    def evaluation_prompts(self) -> list[str]:
        prompts = self.held_out_prompts()
        return prompts + self.train_prompts() if self.evaluation.include_train_prompts else prompts

    def candidate_base_seed(self, round_number: int) -> int:
        """Seed of round ``round_number``'s first candidate: every round samples with new seeds."""
        return self.prompts.seed + (round_number - 1) * len(self.train_prompts()) * self.prompts.candidates_per_prompt

    def evaluation_seeds(self, prompts: Sequence[str] | None = None) -> list[int]:
        """One seed per evaluation image, prompt-major (``EvaluationSection.seed``); for ``prompts`` (a
        subset of the evaluation prompts) the seeds those prompts have on the whole grid."""
        every = self.evaluation_prompts()
        per_prompt = self.evaluation.seeds_per_prompt
        rows = range(len(every)) if prompts is None else [every.index(p) for p in prompts]
        return [self.evaluation.seed + row * per_prompt + s for row in rows for s in range(per_prompt)]

    def validation_prompts(self) -> list[str]:
        """The evaluation prompts set aside to choose settings on (``loop.evaluate.validation_prompts``)."""
        return validation_prompts(self.evaluation_prompts(), self.evaluation.validation_fraction)

    def lora_config(self, *, aspect: str, dataset_dir: str, output_dir: str, work_dir: str,
                    overwrite: bool = False) -> LoraTrainConfig:
        """The trainer's config for one aspect's LoRA: [lora] (and [lora_aspects.<aspect>]) overrides +
        what the loop decides."""
        overrides = self.lora_aspects.get(aspect, {})
        return LoraTrainConfig.from_dict({
            **self.lora, **overrides, **self._model_fields(), "dataset_dir": dataset_dir, "aspect": aspect,
            "output_dir": output_dir, "output_name": aspect, "work_dir": work_dir, "overwrite": overwrite,
        }, source=f"[lora_aspects.{aspect}]" if overrides else "[lora]")

    def gate_config(self, *, loras: Sequence[str], aspects: Sequence[str], dataset_dir: str, output_dir: str,
                    work_dir: str, overwrite: bool = False, variant: str | None = None):
        """The gate trainer's config: [gate] (plus [gate_variants.<variant>]) over the LoRA data settings."""
        inherited = {k: v for k, v in self.lora.items() if k in GATE_INHERITS_FROM_LORA}
        overrides = {**self.gate, **(self.gate_variants[variant] if variant is not None else {})}
        return GateTrainConfig.from_dict({
            **inherited, **overrides, **self._model_fields(), "dataset_dir": dataset_dir,
            "loras": [str(p) for p in loras], "aspects": list(aspects), "output_dir": output_dir,
            "output_name": mixture_name(variant), "work_dir": work_dir, "overwrite": overwrite,
        }, source="[gate]" if variant is None else f"[gate_variants.{variant}]")

    def _model_fields(self) -> dict[str, str]:
        return {"base_model": self.model.base_model, "text_encoders": list(self.model.text_encoders),
                "vae": self.model.vae, "arch": self.model.arch, "prediction_type": self.model.prediction_type,
                "model_config_dir": self.model.model_config_dir}

    def evaluation_variant_kinds(self) -> tuple[str, ...]:
        """``[evaluation] variants``, or when empty: base and the aspect LoRAs, plus the merge baselines
        and the gated mixture when there are >= 2 aspects (``uniform`` only when there are validation
        prompts to choose its weight on)."""
        if self.evaluation.variants:
            return tuple(self.evaluation.variants)
        if len(self.aspects) < 2:
            return ("base", "lora")
        try:
            chosen_on = self.validation_prompts()
        except (ValueError, FileNotFoundError):  # reported by validate()
            chosen_on = []
        return tuple(kind for kind in VARIANT_KINDS if kind != "uniform" or chosen_on)

    @property
    def needs_gate(self) -> bool:
        """The gate is trained when there are >= 2 aspects and something uses it (the gated
        variant, or a later round that samples with it)."""
        return len(self.aspects) >= 2 and ("gated" in self.evaluation_variant_kinds() or self.rounds > 1)

    # -- validation ----------------------------------------------------------------------------------
    def problems(self, *, check_paths: bool = True) -> list[str]:
        """Every problem with the config, each naming the setting and the fix (empty = valid)."""
        p: list[str] = []
        if not self.name.strip():
            p.append('name: is empty; give the run a label such as "my-loop"')
        if not self.output_dir.strip():
            p.append('output_dir: is empty; give a folder for the run such as "runs/my-loop"')
        elif path_problem(self.output_dir, what="output_dir"):  # a name too long (before the disk is asked)
            p.append(path_problem(self.output_dir, what="output_dir"))
        elif check_paths and os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            p.append(f"output_dir={self.output_dir!r}: exists and is not a folder")
        elif check_paths and folder_problem(self.output_dir, what="output_dir"):  # below a file, read-only...
            p.append(folder_problem(self.output_dir, what="output_dir"))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            p.append(f"rounds={self.rounds!r}: must be a whole number >= 1")
        p += _device_problems(self.device)
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            p.append(f"dtype={self.dtype!r}: use auto, float32, float16 or bfloat16")
        p += self._model_problems(check_paths)
        p += self._prompt_problems(check_paths)
        try:
            self.generation.validate()
        except ValueError as exc:
            p.append(f"[generation] {exc}")
        p += self._aspect_problems()
        p += self._dataset_problems(check_paths)
        p += self._training_problems(check_paths)
        p += self._evaluation_problems()
        return p

    def validate(self, *, check_paths: bool = True) -> LoopConfig:
        problems = self.problems(check_paths=check_paths)
        if problems:
            raise ValueError("invalid loop config:\n  - " + "\n  - ".join(problems))
        return self

    def _model_problems(self, check_paths: bool) -> list[str]:
        p = []
        model = self.model
        if not model.base_model.strip():
            p.append("[model] base_model: is empty; give a checkpoint file (.safetensors) or a diffusers folder")
        elif check_paths and not os.path.exists(model.base_model):
            p.append(f"[model] base_model={model.base_model!r}: no such file or folder; give a checkpoint file "
                     "(.safetensors) or a diffusers model folder")
        if model.arch not in ARCH_CHOICES:
            p.append(f"[model] arch={model.arch!r}: use one of {', '.join(ARCH_CHOICES)}")
        if model.prediction_type not in PREDICTION_TYPES:
            p.append(f"[model] prediction_type={model.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
        if model.model_config_dir and check_paths and not os.path.isdir(model.model_config_dir):
            p.append(f"[model] model_config_dir={model.model_config_dir!r}: no such folder")
        for index, path in enumerate(model.text_encoders):
            if check_paths and not os.path.isfile(path):
                p.append(f"[model] text_encoders[{index}]={path!r}: no such file; give the text encoder file ComfyUI's "
                         "Load CLIP node reads (models/text_encoders)")
        if model.vae and check_paths and not os.path.isfile(model.vae):
            p.append(f"[model] vae={model.vae!r}: no such file; give the VAE file ComfyUI's Load VAE node reads "
                     "(models/vae)")
        return p

    def _prompt_problems(self, check_paths: bool) -> list[str]:
        p = []
        prompts = self.prompts
        train: list[str] = []
        held_out: list[str] = []
        for name, listed, file in (("train", prompts.train, prompts.train_file),
                                   ("held_out", prompts.held_out, prompts.held_out_file)):
            if listed and file:
                p.append(f"[prompts] {name} and {name}_file: give one of them, not both")
                continue
            if file and not check_paths:
                continue
            if name == "held_out" and not listed and not file:
                continue
            try:
                (train if name == "train" else held_out).extend(_prompt_list(listed, file, name))
            except (ValueError, FileNotFoundError) as exc:
                p.append(f"[prompts] {exc}")
        overlap = sorted(set(train) & set(held_out))
        if overlap:
            p.append(f"[prompts] held_out: {len(overlap)} prompt(s) are also training prompts (e.g. {overlap[0]!r}); "
                     "held-out prompts must be ones the loop never trains on")
        k = prompts.candidates_per_prompt
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            p.append(f"[prompts] candidates_per_prompt={k!r}: must be >= 2 (the loop keeps the best of K "
                     "candidates per prompt; 4-16 is usual)")
        elif prompts.seed < 0:
            p.append(f"[prompts] seed={prompts.seed}: must be >= 0")
        evaluation = self.evaluation
        if not held_out and not evaluation.include_train_prompts and not (prompts.held_out or prompts.held_out_file):
            p.append("[prompts] held_out: no held-out prompt; give held_out / held_out_file, or set "
                     "[evaluation] include_train_prompts = true to evaluate on the training prompts with new seeds")
        if train and isinstance(k, int) and k >= 2 and evaluation.include_train_prompts:
            first, last = prompts.seed, prompts.seed + self.rounds * len(train) * k - 1
            evaluated = len(train) + len(held_out)
            eval_first, eval_last = evaluation.seed, evaluation.seed + evaluated * evaluation.seeds_per_prompt - 1
            if eval_first <= last and first <= eval_last:
                p.append(f"[evaluation] seed={evaluation.seed}: evaluation seeds {eval_first}..{eval_last} overlap the "
                         f"candidate seeds {first}..{last}; evaluation must use seeds the loop never trained on")
        return p

    def _aspect_problems(self) -> list[str]:
        p = []
        if not self.aspects:
            p.append('[aspects]: no aspect; name at least one, e.g. aesthetics = "laion-aesthetic-v2"')
        for aspect, scorer in self.aspects.items():
            problem = aspect_name_problem(aspect, what="[aspects]")
            if problem:
                p.append(problem)
                continue
            name = scorer.strip()
            if not name:
                if aspect not in DEFAULT_SCORERS:
                    p.append(f"[aspects] unknown aspect {aspect!r} with no scorer: the aspects with a default scorer "
                             f"are {', '.join(DEFAULT_SCORERS)}; for another aspect name its scorer "
                             f'({aspect} = "analytic:sharpness", ...)')
                continue
            scorer_id, variant = split_name(name)
            entry = SCORERS.get(scorer_id)
            if entry is None:
                close = difflib.get_close_matches(name, list_scorers(), n=1)
                p.append(f"[aspects] {aspect} = {name!r}: unknown scorer"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; known scorers: {', '.join(list_scorers())}")
            elif entry.variants and scorer_id != "pyiqa" and variant not in entry.variants:
                p.append(f"[aspects] {aspect} = {name!r}: unknown scorer variant; use one of "
                         + ", ".join(f"{scorer_id}:{v}" for v in entry.variants))
        for aspect, spec in self.thresholds.items():
            if aspect not in self.aspects:
                p.append(f"[thresholds] {aspect!r}: unknown aspect; the aspects are "
                         f"{', '.join(self.aspects) or 'none'}")
            try:
                Threshold.parse(spec)
            except ValueError as exc:
                p.append(f"[thresholds] {aspect}: {exc}")
        scoring = self.scoring
        if scoring.batch_size < 1:
            p.append(f"[scoring] batch_size={scoring.batch_size}: must be >= 1")
        return p

    def _dataset_problems(self, check_paths: bool) -> list[str]:
        p = []
        dataset = self.dataset
        if dataset.repeats < 1:
            p.append(f"[dataset] repeats={dataset.repeats}: must be >= 1")
        if dataset.gate_data not in GATE_DATA:
            p.append(f"[dataset] gate_data={dataset.gate_data!r}: use one of {', '.join(GATE_DATA)}")
        elif dataset.gate_data == "joint" and JOINT in self.aspects:
            p.append(f"[aspects] {JOINT!r}: the name of the jointly-best set gate_data = \"joint\" writes; rename "
                     "that aspect")
        fraction = dataset.replay_fraction
        if not math.isfinite(fraction) or fraction < 0:
            p.append(f"[dataset] replay_fraction={fraction}: must be >= 0 (0 = no replay; 0.5 = one real image per "
                     "two selected ones)")
        elif fraction > 0 and not dataset.replay_dir:
            p.append("[dataset] replay_fraction > 0 needs replay_dir: a folder of real images with captions "
                     "(<name>.png + <name>.txt)")
        elif dataset.replay_dir and fraction == 0:
            p.append("[dataset] replay_dir is set but replay_fraction = 0; set a fraction (e.g. 0.5) or drop "
                     "replay_dir")
        elif dataset.replay_dir and check_paths:
            if not os.path.isdir(dataset.replay_dir):
                p.append(f"[dataset] replay_dir={dataset.replay_dir!r}: no such folder")
            else:
                try:
                    found = len(scan_replay_dir(dataset.replay_dir))
                except ValueError as exc:
                    p.append(f"[dataset] {exc}")
                else:
                    try:
                        needed = replay_count(fraction, len(self.train_prompts()))
                    except (ValueError, FileNotFoundError):
                        needed = 0  # reported with the prompts
                    if found < needed:
                        p.append(f"[dataset] replay_dir={dataset.replay_dir!r}: {found} captioned image(s); "
                                 f"replay_fraction {fraction:g} needs up to {needed} (one per prompt kept x fraction)")
        return p

    def _training_problems(self, check_paths: bool) -> list[str]:
        p = []
        training = self.training
        if training.parallel_jobs < 1:
            p.append(f"[training] parallel_jobs={training.parallel_jobs}: must be >= 1")
        if training.threads_per_job < 0:
            p.append(f"[training] threads_per_job={training.threads_per_job}: must be >= 0 (0 = inherit)")
        if training.accelerate_config not in ("", "auto") and check_paths and \
                not os.path.isfile(training.accelerate_config):
            p.append(f"[training] accelerate_config={training.accelerate_config!r}: no such file "
                     "(or \"auto\")")
        aspects = list(self.aspects) or ["aspect"]
        placeholders = {"base_model": "base", "dataset_dir": "dataset", "output_dir": "out", "work_dir": "work"}
        for section, cls in (("lora", LoraTrainConfig), ("gate", GateTrainConfig)):
            overrides = dict(getattr(self, section))
            owned = sorted(set(overrides) & LOOP_OWNED_TRAINING_FIELDS)
            if owned:
                p.append(f"[{section}] {', '.join(owned)}: set by the loop for every job (from [model] and the run "
                         "folder); remove them")
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = [k for k in overrides if k not in fields]
            p += [f"[{section}] {_unknown(k, sorted(fields - LOOP_OWNED_TRAINING_FIELDS), '')}" for k in unknown]
            if owned or unknown:
                continue
            if section == "gate" and not self.needs_gate:
                continue
            try:
                if section == "lora":
                    config = self.lora_config(aspect=aspects[0], dataset_dir="dataset", output_dir="out",
                                              work_dir="work")
                else:
                    config = self.gate_config(loras=[f"{a}.safetensors" for a in aspects], aspects=aspects,
                                              dataset_dir="dataset", output_dir="out", work_dir="work")
            except ValueError as exc:
                p.append(str(exc).replace("\n  - ", "; "))
                continue
            for problem in config.problems(check_paths=False):
                if not any(problem.startswith(name) for name in placeholders):
                    p.append(f"[{section}] {problem}")
        p += self._gate_variant_problems(aspects, placeholders)
        p += self._lora_aspect_problems(placeholders)
        return p

    def _lora_aspect_problems(self, placeholders: Mapping[str, str]) -> list[str]:
        p = []
        for aspect, overrides in self.lora_aspects.items():
            where = f"[lora_aspects.{aspect}]"
            if aspect not in self.aspects:
                p.append(f"{where}: {aspect!r} is not an aspect of [aspects] ({', '.join(self.aspects) or 'none'})")
                continue
            p += _override_problems(where, overrides, LoraTrainConfig, placeholders, lambda a=aspect: self.lora_config(
                aspect=a, dataset_dir="dataset", output_dir="out", work_dir="work"))
        return p

    def _gate_variant_problems(self, aspects: list[str], placeholders: Mapping[str, str]) -> list[str]:
        p = []
        if self.gate_variants and "gated" not in self.evaluation_variant_kinds():
            p.append("[gate_variants]: they are evaluated as variants gated:<name>; add \"gated\" to [evaluation] "
                     "variants or drop [gate_variants]")
        if self.gate_variants and len(self.aspects) < 2:
            p.append("[gate_variants]: a gate needs >= 2 aspects")
            return p
        for name, overrides in self.gate_variants.items():
            if aspect_name_problem(name):  # the aspects' rule: the name becomes part of file and folder names
                p.append(f"[gate_variants] {name!r}: a variant name uses {ASPECT_NAME_RULE}, at most "
                         f"{ASPECT_NAME_MAX_LENGTH} characters (it becomes part of file and folder names)")
                continue
            p += _override_problems(f"[gate_variants.{name}]", overrides, GateTrainConfig, placeholders,
                                    lambda v=name: self.gate_config(
                                        loras=[f"{a}.safetensors" for a in aspects], aspects=aspects,
                                        dataset_dir="dataset", output_dir="out", work_dir="work", variant=v))
        return p

    def _evaluation_problems(self) -> list[str]:
        p = []
        evaluation = self.evaluation
        if evaluation.seeds_per_prompt < 2:
            p.append(f"[evaluation] seeds_per_prompt={evaluation.seeds_per_prompt}: must be >= 2 (the seed-to-seed "
                     "spread is measured by splitting each prompt's seeds in halves; 8 is usual)")
        if evaluation.seed < 0:
            p.append(f"[evaluation] seed={evaluation.seed}: must be >= 0")
        unknown = [v for v in evaluation.variants if v not in VARIANT_KINDS]
        if unknown:
            p.append(f"[evaluation] variants {unknown}: use any of {', '.join(VARIANT_KINDS)}")
        if evaluation.variants and "base" not in evaluation.variants:
            p.append("[evaluation] variants: must include \"base\" (every variant is compared with it)")
        if len(set(evaluation.variants)) != len(evaluation.variants):
            p.append(f"[evaluation] variants {list(evaluation.variants)}: each at most once")
        if len(self.aspects) < 2:
            mixed = [v for v in (*MERGE_KINDS, "gated") if v in evaluation.variants]
            if mixed:
                p.append(f"[evaluation] variants {mixed}: a merge or mixture needs >= 2 aspects; drop them or add "
                         "an aspect")
        fraction = evaluation.validation_fraction
        if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
            p.append(f"[evaluation] validation_fraction={fraction}: must be in [0, 1) (0.25 sets a quarter of the "
                     "evaluation prompts aside to choose settings on)")
        elif "uniform" in self.evaluation_variant_kinds() and len(self.aspects) >= 2:
            try:
                chosen_on = self.validation_prompts()
            except (ValueError, FileNotFoundError):
                chosen_on = [None]  # the prompts' own problem is reported with [prompts]
            if not chosen_on:
                p.append(f"[evaluation] variants 'uniform' chooses its weight on validation prompts, and "
                         f"validation_fraction={fraction} sets none aside; raise it (0.25 is usual) or drop 'uniform'")
        weights = evaluation.uniform_weights
        if not weights or not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
            p.append(f"[evaluation] uniform_weights={list(weights)}: give one or more weights > 0, e.g. "
                     "[0.25, 0.5, 1.0]")
        if not (math.isfinite(evaluation.merge_weight) and evaluation.merge_weight > 0):
            p.append(f"[evaluation] merge_weight={evaluation.merge_weight}: must be > 0 (1 = each LoRA at full weight)")
        if not (math.isfinite(evaluation.merge_density) and 0.0 < evaluation.merge_density <= 1.0):
            p.append(f"[evaluation] merge_density={evaluation.merge_density}: must be in (0, 1] (the share of each "
                     "LoRA's weight changes that ties / dare keep; 0.5 is usual)")
        if evaluation.gate_mode not in GATE_MODES:
            p.append(f"[evaluation] gate_mode={evaluation.gate_mode!r}: use one of {', '.join(GATE_MODES)}")
        if evaluation.resamples < 100:
            p.append(f"[evaluation] resamples={evaluation.resamples}: use >= 100 (2000 is usual)")
        if not 0.5 <= evaluation.level < 1.0:
            p.append(f"[evaluation] level={evaluation.level}: a confidence level in [0.5, 1), e.g. 0.95")
        if evaluation.unit not in BOOTSTRAP_UNITS:
            p.append(f"[evaluation] unit={evaluation.unit!r}: use one of {', '.join(BOOTSTRAP_UNITS)}")
        return p


MIXTURE_NAME = "mixture"


def mixture_name(variant: str | None = None) -> str:
    """The MoL file's name (without suffix) of the [gate] mixture or of a [gate_variants] one."""
    return MIXTURE_NAME if variant is None else f"{MIXTURE_NAME}-{variant}"

# Data settings a gate trains with by default: the LoRAs' own (same images, same resolution).
GATE_INHERITS_FROM_LORA = frozenset({
    "resolution", "bucketing", "bucket_step", "bucket_max_aspect", "random_flip", "cache_latents",
    "cache_text_embeddings", "train_batch_size", "mixed_precision", "gradient_checkpointing", "seed",
    "checkpointing_steps"})


def replay_count(fraction: float, kept: int) -> int:
    """Real images added to an aspect's training set with ``kept`` selected images."""
    return math.floor(fraction * kept + 0.5)


# -- helpers -----------------------------------------------------------------------------------------

def _commented_setting(key: str, value: Any, comment: str, *, commented_out: bool = False) -> list[str]:
    """``# comment`` and ``key = value`` (commented out itself when ``commented_out``, or when the
    value is unset: TOML has no null)."""
    lines = [f"# {comment}"] if comment else []
    if value is None:
        return [*lines, f"# {key} = (unset)"]
    if isinstance(value, Mapping):  # a table inside a section (no loop setting is one)
        raise TypeError(f"{key}: a nested table can't be printed as one setting")
    line = f"{key} = {toml_value(list(value) if isinstance(value, tuple) else value)}"
    return [*lines, f"# {line}" if commented_out else line]


def _threshold_meaning(spec: Any) -> str:
    try:
        threshold = Threshold.parse(spec)
    except ValueError:
        return ""  # validate() names it
    if threshold.kind == "none":
        return "every prompt's best image is kept"
    if threshold.kind == "absolute":
        return f"a prompt's best image is kept if it scores >= {threshold.value:g}"
    return f"a prompt's best image is kept if it scores >= the {threshold.value:g}th percentile of all candidates"


def _threshold_text(value: Any) -> str:
    try:
        return str(Threshold.parse(value))
    except ValueError:
        return str(value)  # validate() names it


def _override_problems(where: str, overrides: Mapping[str, Any], config_class: type, placeholders: Mapping[str, str],
                       build: Callable[[], Any]) -> list[str]:
    """The problems of one table of trainer-setting overrides ([lora_aspects.<aspect>],
    [gate_variants.<name>]): settings the loop owns, unknown keys, else those of the config ``build``
    makes from it (less the placeholders' paths)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    owned = sorted(set(overrides) & LOOP_OWNED_TRAINING_FIELDS)
    unknown = [k for k in overrides if k not in fields]
    p = [f"{where} {', '.join(owned)}: set by the loop for every job; remove them"] if owned else []
    p += [f"{where} {_unknown(k, sorted(fields - LOOP_OWNED_TRAINING_FIELDS), '')}" for k in unknown]
    if p:
        return p
    try:
        config = build()
    except ValueError as exc:
        return [str(exc).replace("\n  - ", "; ")]
    return [f"{where} {problem}" for problem in config.problems(check_paths=False)
            if not any(problem.startswith(field) for field in placeholders)]


def _unknown(key: str, known: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return (f"{where}unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; known: {', '.join(known)}")


def _prompt_list(listed: Sequence[str], file: str, name: str) -> list[str]:
    if file:
        try:
            prompts = read_prompt_file(file)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}_file={file!r}: no such file; write one prompt per line") from None
        except ValueError as exc:
            raise ValueError(f"{name}_file: {exc}") from None
    else:
        prompts = list(listed)
    if not prompts:
        raise ValueError(f"{name}: zero prompts; give at least one prompt ({name} = [...] or {name}_file)")
    return check_prompts(prompts, what=name)


def _device_problems(device: str) -> list[str]:
    if device == "auto":
        return []
    try:
        import torch

        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return [f"device={device!r}: use auto, cpu, cuda, cuda:1, mps ..."]
    return []


__all__ = [
    "MIXTURE_NAME",
    "VARIANT_KINDS",
    "DatasetSection",
    "EvaluationSection",
    "GenerationConfig",
    "LoopConfig",
    "ModelSection",
    "PromptsSection",
    "ScoringSection",
    "TrainingSection",
    "replay_count",
]
