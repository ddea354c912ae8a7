"""Training configurations: frozen dataclasses that round-trip through TOML and JSON.

``TrainingRunConfig`` holds what every training program of the pack needs (base model, dataset,
output, optimiser, schedule, precision, checkpoints); ``LoraTrainConfig`` adds the aspect-LoRA
fields. The gate trainer subclasses ``TrainingRunConfig`` the same way, so both programs read the
same files, report the same errors and fingerprint their inputs the same way.

``validate()`` collects every problem it finds and raises one ``ValueError`` naming each field
and the fix, so a user edits the file once.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import typing
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

ConfigT = TypeVar("ConfigT", bound="ConfigFile")

ARCHITECTURES = ("auto", "sd15", "sd2", "sdxl")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction", "sample")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# diffusers.optimization.SchedulerType values (kept here so validation needs no diffusers import).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA_FILE_SUFFIX = ".safetensors"


class ConfigFile:
    """TOML/JSON I/O, strict parsing and fingerprints for the frozen config dataclasses below."""

    # Fields that change where or how a run is stored, not what it learns (left out of fingerprints).
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset()

    # -- dict ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
        """Build from a mapping; unknown keys and wrong types are errors that name the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown setting(s) {', '.join(hints)}; known settings: {', '.join(fields)}")
        hints_by_name = typing.get_type_hints(cls)
        values, problems = {}, []
        for name, value in data.items():
            try:
                values[name] = _coerce(value, hints_by_name[name])
            except (TypeError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
        missing = [
            name for name, f in fields.items()
            if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        problems += [f"{name}: required setting is missing" for name in missing]
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        return cls(**values)

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        return dataclasses.replace(self, **changes)

    # -- files -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls: type[ConfigT], text: str, *, source: str = "config") -> ConfigT:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of settings")
        return cls.from_dict(data, source=source)

    def to_toml(self) -> str:
        return dump_flat_toml(self.to_dict())

    @classmethod
    def from_toml(cls: type[ConfigT], text: str, *, source: str = "config") -> ConfigT:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{source}: not valid TOML ({exc})") from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls: type[ConfigT], path: str | os.PathLike) -> ConfigT:
        """Read ``.toml`` or ``.json`` (by extension)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            return cls.from_json(text, source=str(path))
        return cls.from_toml(text, source=str(path))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``.toml`` or ``.json`` (by extension), atomically (``safe_io``: a hidden temporary,
        removed if the write fails, then a rename). An existing file is replaced only with ``overwrite``."""
        from ..safe_io import atomic_write_text

        path = Path(path)
        text = self.to_json() if path.suffix.lower() == ".json" else self.to_toml()
        return atomic_write_text(path, text, overwrite=overwrite, what="config file")

    # -- identity --------------------------------------------------------------------------------
    def fingerprint(self, **extra: Any) -> str:
        """sha256 over the fields that change the trained result (plus ``extra``, e.g. file hashes)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in self.NON_RESULT_FIELDS}
        payload["__class__"] = type(self).__name__
        payload.update({f"extra:{k}": v for k, v in extra.items()})
        blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingRunConfig(ConfigFile):
    """Settings every training program of the pack shares (LoRA and gate training)."""

    # what to start from and learn on
    base_model: str  # diffusers folder or single-file checkpoint (.safetensors)
    arch: str = "auto"  # auto | sd15 | sd2 | sdxl
    prediction_type: str = "auto"  # auto (from the model) | epsilon | v_prediction | sample
    model_config_dir: str = ""  # diffusers configs for a single-file checkpoint ("" = the shipped ones)
    dataset_dir: str  # <root>/<name> written by Save Training Set
    # where results go: <output_dir>/<output_name>.safetensors; checkpoints and logs in work_dir
    output_dir: str
    output_name: str
    work_dir: str
    overwrite: bool = False
    # optimisation
    seed: int = 0
    max_train_steps: int = 500
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # speed / memory
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, no elsewhere
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 0
    # checkpoints (accelerate state) for --resume latest
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 2  # newest checkpoints kept (0 = keep all)

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"output_dir", "output_name", "work_dir", "overwrite", "dataloader_num_workers",
         "checkpointing_steps", "checkpoints_total_limit"}
    )

    @property
    def output_path(self) -> Path:
        """Final file: ``<output_dir>/<output_name>.safetensors`` (confinement checked by validate)."""
        name = self.output_name if self.output_name.endswith(LORA_FILE_SUFFIX) else self.output_name + LORA_FILE_SUFFIX
        return Path(self.output_dir) / name

    def problems(self, *, check_paths: bool = True) -> list[str]:
        """Every problem with the settings, each naming the field and the fix (empty = valid)."""
        p: list[str] = []
        _choice(p, "arch", self.arch, ARCHITECTURES)
        _choice(p, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice(p, "mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _choice(p, "lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
            _at_least(p, name, getattr(self, name), 1)
        for name in ("lr_warmup_steps", "dataloader_num_workers", "checkpoints_total_limit", "seed"):
            _at_least(p, name, getattr(self, name), 0)
        _positive_float(p, "learning_rate", self.learning_rate)
        _positive_float(p, "adam_epsilon", self.adam_epsilon)
        _positive_float(p, "max_grad_norm", self.max_grad_norm)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                p.append(f"{name}={value}: must be in [0, 1)")
        if not math.isfinite(self.adam_weight_decay) or self.adam_weight_decay < 0:
            p.append(f"adam_weight_decay={self.adam_weight_decay}: must be >= 0")
        problem = output_name_problem(self.output_name)
        if problem:
            p.append(problem)
        for name in ("base_model", "dataset_dir", "output_dir", "work_dir"):
            if not str(getattr(self, name)).strip():
                p.append(f"{name}: is empty; give a path")
        if check_paths:
            if self.base_model.strip() and not os.path.exists(self.base_model):
                p.append(f"base_model={self.base_model!r}: no such file or folder; give a diffusers model folder "
                         "or a single-file checkpoint (.safetensors)")
            if self.model_config_dir and not os.path.isdir(self.model_config_dir):
                p.append(f"model_config_dir={self.model_config_dir!r}: no such folder; give a diffusers model folder "
                         "whose configs describe the checkpoint, or leave it empty")
            if self.dataset_dir.strip() and not os.path.isdir(self.dataset_dir):
                p.append(f"dataset_dir={self.dataset_dir!r}: no such folder; give the folder Save Training Set "
                         "(or `versat2i build-dataset`) wrote")
            if self.output_dir.strip() and not problem and not self.overwrite and self.output_path.exists():
                p.append(f"output_name={self.output_name!r}: {self.output_path} already exists; choose another "
                         "name or set overwrite = true")
        return p

    def with_resolved_precision(self, *, cpu: bool | None = None):
        """This config with ``mixed_precision`` as the trainer will use it (``auto`` resolved by
        ``resolve_mixed_precision``): what fingerprints compare, so that "auto" on a CPU and "auto"
        on a GPU are different runs while "auto" and "no" on a CPU are the same one."""
        return self.replace(mixed_precision=resolve_mixed_precision(self.mixed_precision, cpu=cpu))

    def validate(self, *, check_paths: bool = True):
        problems = self.problems(check_paths=check_paths)
        if problems:
            raise ValueError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))
        return self


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTrainingConfig(TrainingRunConfig):
    """The image/caption data settings of every program that trains on a training set (LoRA, gate)."""

    resolution: int = 512  # training area is resolution^2; sides are multiples of 8
    bucketing: bool = True  # aspect-ratio buckets (kohya style); off = square center crops
    bucket_step: int = 64
    bucket_max_aspect: float = 2.0  # widest bucket: long side / short side
    random_flip: bool = False
    cache_latents: bool = False  # encode every image once before training (and reuse generation latents)
    cache_text_embeddings: bool = False  # encode every caption once (frozen text encoders only)
    keep_checkpoints: bool = True  # False: delete the checkpoints once the final file is written

    # cache_latents is not among them: a cached latent is one posterior sample drawn before training
    # (a fresh one every step otherwise), and the noise stream shifts without the per-step VAE
    # samples. Cached text embeddings are the same numbers the frozen encoders give every step.
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = TrainingRunConfig.NON_RESULT_FIELDS | {
        "cache_text_embeddings", "keep_checkpoints"}

    def problems(self, *, check_paths: bool = True) -> list[str]:
        p = super().problems(check_paths=check_paths)
        # Multiples of 8 down to 8: the embedded demo world trains at 32 px (its VAE does not downsample).
        if self.resolution < 8 or self.resolution % 8:
            p.append(f"resolution={self.resolution}: must be a multiple of 8 "
                     f"(e.g. {max(8, round(self.resolution / 64) * 64)})")
        if self.bucket_step < 8 or self.bucket_step % 8:
            p.append(f"bucket_step={self.bucket_step}: must be a multiple of 8 (64 is usual)")
        if not math.isfinite(self.bucket_max_aspect) or self.bucket_max_aspect < 1.0:
            p.append(f"bucket_max_aspect={self.bucket_max_aspect}: must be >= 1 (long side / short side)")
        if self.cache_latents and self.random_flip:
            p.append("random_flip with cache_latents: cached latents cannot be flipped; turn one off")
        return p


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraTrainConfig(ImageTrainingConfig):
    """One aspect LoRA (kohya keys, peft layers) trained on one aspect's folders of a training set."""

    aspect: str = ""  # train on the <repeats>_<aspect> folders of this aspect ("" = every folder)
    # LoRA
    rank: int = 16
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    train_feed_forward: bool = False  # also the transformer feed-forward layers
    train_text_encoder: bool = False  # also the text encoder(s) attention + MLP
    text_encoder_lr: float = 0.0  # 0 = learning_rate
    # loss
    noise_offset: float = 0.0
    snr_gamma: float = 0.0  # min-SNR weighting gamma (0 = off; 5 is the paper's value)

    def problems(self, *, check_paths: bool = True) -> list[str]:
        p = super().problems(check_paths=check_paths)
        _at_least(p, "rank", self.rank, 1)
        _positive_float(p, "alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout}: must be in [0, 1)")
        if not math.isfinite(self.text_encoder_lr) or self.text_encoder_lr < 0:
            p.append(f"text_encoder_lr={self.text_encoder_lr}: must be >= 0 (0 = learning_rate)")
        if not math.isfinite(self.noise_offset) or self.noise_offset < 0:
            p.append(f"noise_offset={self.noise_offset}: must be >= 0 (0.05-0.1 is usual)")
        if not math.isfinite(self.snr_gamma) or self.snr_gamma < 0:
            p.append(f"snr_gamma={self.snr_gamma}: must be >= 0 (0 = off, 5 is usual)")
        if self.cache_text_embeddings and self.train_text_encoder:
            p.append("cache_text_embeddings with train_text_encoder: a trained text encoder changes the "
                     "embeddings every step; turn one off")
        if any(c in self.aspect for c in "/\\") or self.aspect in (".", ".."):
            p.append(f"aspect={self.aspect!r}: an aspect name, not a path")
        return p


# -- helpers -------------------------------------------------------------------------------------

def resolve_mixed_precision(choice: str, *, cpu: bool | None = None) -> str:
    """``auto``: bf16 on CUDA devices that support it, else fp16 on CUDA, else no (CPU, MPS).

    ``cpu``: the run is forced onto the CPU (``accelerate launch --cpu``); None reads what
    ``accelerate launch`` tells the training process (``ACCELERATE_USE_CPU``), so the launcher
    (which knows its options) and the child resolve ``auto`` alike.
    """
    if choice != "auto":
        return choice
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "t", "yes", "y", "on")
    if cpu:
        return "no"
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a LoRA name relative to a loras folder (None if it can)."""
    if not name or not name.strip():
        return "output_name: is empty; give a LoRA name such as 'versat2i/my_aspect'"
    if "\x00" in name:
        return f"output_name={name!r}: contains a NUL character"
    if os.path.isabs(name) or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"output_name={name!r}: must be relative to the loras folder, not an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(part in ("..", ".") for part in parts) or not parts:
        return f"output_name={name!r}: must stay inside the loras folder (no '.' or '..' parts)"
    if any(part.startswith(".") for part in parts):
        return f"output_name={name!r}: hidden names (starting with '.') are not allowed"
    return None


def _choice(p: list[str], name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        p.append(f"{name}={value!r}: must be one of {', '.join(choices)}")


def _at_least(p: list[str], name: str, value: int, minimum: int) -> None:
    if value < minimum:
        p.append(f"{name}={value}: must be >= {minimum}")


def _positive_float(p: list[str], name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        p.append(f"{name}={value}: must be a positive number")


# Public names for configs that subclass TrainingRunConfig (the gate trainer's).
require_choice, require_at_least, require_positive = _choice, _at_least, _positive_float


def _coerce(value: Any, hint: Any) -> Any:
    """Strict scalar coercion for settings read from TOML/JSON (ints are accepted for floats)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "1e-4" written as a string
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"expected a string, got {value!r}")
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        (item,) = set(typing.get_args(hint)) - {Ellipsis} or {str}
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return origin(_coerce(v, item) for v in value)
    return value


def dump_flat_toml(data: dict[str, Any]) -> str:
    """TOML for a flat table of scalars and lists of scalars; ``None`` values are left out.

    Written by hand because the standard library only reads TOML (``tomllib``) and a writer
    dependency for ~20 lines of flat keys is not worth it; ``from_toml`` round-trips it (tested).
    """
    lines = []
    for key, value in data.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        # JSON string escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(os.fspath(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")
