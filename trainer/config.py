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
import math
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import ClassVar

from ..aspects import aspect_name_problem
from ..config_file import ConfigFile, SettingRange, require_choice, require_in_range, require_positive
from ..models.architectures import ARCHITECTURE_NAMES
from ..safe_io import folder_problem, path_problem, relative_name_problem

ARCH_CHOICES = ("auto", *ARCHITECTURE_NAMES)
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction", "sample")
# diffusers.training_utils.compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
MEMORY_SAVING = ("off", "auto")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
# diffusers.optimization.SchedulerType values (kept here so validation needs no diffusers import).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LORA_FILE_SUFFIX = ".safetensors"

# The range of every bounded numeric setting of the training configs, defined once: ``problems()``
# checks configs (``versat2i train-lora`` / ``train-gate`` files, the loop's [lora] / [gate]) against
# it, and the Train Aspect LoRA / Train Gate nodes take their inputs' min and max from it, so a file
# cannot ask for more than a node offers (``resolution = 100000`` once grew a training process to
# 15 GB before the kernel killed it). What a run may use of the machine is checked separately, from
# its memory estimate (``trainer/memory.py``).
SETTING_RANGES: dict[str, SettingRange] = {
    "max_train_steps": SettingRange(1, 1_000_000),
    "train_batch_size": SettingRange(1, 256),
    "gradient_accumulation_steps": SettingRange(1, 1024),
    "learning_rate": SettingRange(1e-7, 1.0),
    "lr_warmup_steps": SettingRange(0, 1_000_000),
    "seed": SettingRange(0, 2**31 - 1),
    "dataloader_num_workers": SettingRange(0, 64),
    "checkpointing_steps": SettingRange(1, 1_000_000),
    "checkpoints_total_limit": SettingRange(0, 1_000_000),
    "resolution": SettingRange(8, 4096),  # down to 8: the embedded demo world trains at 32 px
    "bucket_step": SettingRange(8, 1024),
    "bucket_max_aspect": SettingRange(1.0, 16.0),
    "rank": SettingRange(1, 256),
    "alpha": SettingRange(0.01, 1024.0),
    "dropout": SettingRange(0.0, 0.9),
    "text_encoder_lr": SettingRange(0.0, 1.0),  # 0 = learning_rate
    "noise_offset": SettingRange(0.0, 1.0),
    "snr_gamma": SettingRange(0.0, 100.0),
    "balance_weight": SettingRange(0.0, 100.0),
    "sample_every_n_steps": SettingRange(0, 1_000_000),
    "sample_steps": SettingRange(0, 1000),
    "sample_count": SettingRange(1, 64),
}


def input_range(name: str) -> dict[str, int | float]:
    """``{"min": ..., "max": ...}`` of a setting, for a node input (``io.Int.Input(..., **input_range(name))``)."""
    limits = SETTING_RANGES[name]
    return {"min": limits.minimum, "max": limits.maximum}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingRunConfig(ConfigFile):
    """Settings every training program of the pack shares (LoRA and gate training)."""

    # what to start from and learn on
    base_model: str  # diffusers folder, single-file checkpoint (.safetensors) or a DiT diffusion model
    text_encoders: tuple[str, ...] = ()  # a DiT diffusion model's text encoder file(s) (ComfyUI's Load CLIP)
    vae: str = ""  # a DiT diffusion model's VAE file (ComfyUI's Load VAE)
    arch: str = "auto"  # auto (detect) or a family of models/architectures.py
    prediction_type: str = "auto"  # auto (from the model) | epsilon | v_prediction | sample
    model_config_dir: str = ""  # diffusers configs for a single-file checkpoint ("" = the shipped ones)
    dataset_dir: str  # <root>/<name> written by Save Training Set
    # where results go: <output_dir>/<output_name>.safetensors; checkpoints and logs in work_dir
    output_dir: str  # folder of the trained file
    output_name: str  # file name, relative to output_dir (".safetensors" added)
    work_dir: str  # checkpoints, logs and the loss curve
    overwrite: bool = False  # replace an existing output file
    # optimisation
    seed: int = 0  # seeds the noise, the timesteps and the data order
    max_train_steps: int = 500  # optimiser steps in all
    train_batch_size: int = 1  # images per step and process
    gradient_accumulation_steps: int = 1  # batches summed into one optimiser step
    learning_rate: float = 1e-4  # AdamW learning rate
    lr_scheduler: str = "constant"  # constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
    lr_warmup_steps: int = 0  # steps of linear warm-up (with a scheduler that has one)
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_weight_decay: float = 1e-2  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float = 1.0  # gradients clipped to this norm
    # speed / memory
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, no elsewhere
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    fp8_base: bool = False  # frozen DiT weights stored in float8 (e4m3fn), computed in bf16 (layerwise casting)
    offload_blocks: bool = False  # frozen DiT blocks wait on the CPU, each moved to the GPU when it runs
    memory_saving: str = "off"  # auto: turn on the options above (and text-embedding caching) until the run fits
    dataloader_num_workers: int = 0  # image-loading worker processes (0 = in the training process)
    # checkpoints (accelerate state) for --resume latest
    checkpointing_steps: int = 100  # save a resumable checkpoint every this many steps
    checkpoints_total_limit: int = 2  # newest checkpoints kept (0 = keep all)

    # offloading moves weights, not numbers; memory_saving only decides the other switches (recorded
    # per run folder, so a resumed run keeps what its first start chose)
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"output_dir", "output_name", "work_dir", "overwrite", "dataloader_num_workers",
         "checkpointing_steps", "checkpoints_total_limit", "offload_blocks", "memory_saving"}
    )
    LATER_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset({"text_encoders", "vae", "fp8_base"})

    @property
    def output_path(self) -> Path:
        """Final file: ``<output_dir>/<output_name>.safetensors`` (confinement checked by validate)."""
        name = self.output_name if self.output_name.endswith(LORA_FILE_SUFFIX) else self.output_name + LORA_FILE_SUFFIX
        return Path(self.output_dir) / name

    @property
    def output_file_name(self) -> str:
        """The final file relative to ``output_dir`` (``output_name`` with the suffix the program adds)."""
        return os.path.relpath(self.output_path, self.output_dir or ".").replace(os.sep, "/")

    def problems(self, *, check_paths: bool = True) -> list[str]:
        """Every problem with the settings, each naming the field and the fix (empty = valid)."""
        p: list[str] = []
        require_choice(p, "arch", self.arch, ARCH_CHOICES)
        require_choice(p, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        require_choice(p, "mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        require_choice(p, "lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        for name, limits in SETTING_RANGES.items():  # those of this config's fields (subclasses add some)
            if hasattr(self, name):
                require_in_range(p, name, getattr(self, name), limits)
        require_choice(p, "memory_saving", self.memory_saving, MEMORY_SAVING)
        require_positive(p, "adam_epsilon", self.adam_epsilon)
        require_positive(p, "max_grad_norm", self.max_grad_norm)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                p.append(f"{name}={value}: must be in [0, 1)")
        if not math.isfinite(self.adam_weight_decay) or self.adam_weight_decay < 0:
            p.append(f"adam_weight_decay={self.adam_weight_decay}: must be >= 0")
        problem = output_name_problem(self.output_name) or relative_name_problem(
            self.output_file_name, what="output_name")  # the file written, with its suffix
        if problem:
            p.append(problem)
        for name in ("base_model", "dataset_dir", "output_dir", "work_dir"):
            if not str(getattr(self, name)).strip():
                p.append(f"{name}: is empty; give a path")
        folders_ok = True
        for name in ("output_dir", "work_dir"):  # folders the run writes into (created when missing)
            value = str(getattr(self, name))
            if value.strip():
                folder = folder_problem(value, what=name) if check_paths else path_problem(value, what=name)
                if folder:
                    p.append(folder)
                    folders_ok = False
        if check_paths:
            if self.base_model.strip() and not os.path.exists(self.base_model):
                p.append(f"base_model={self.base_model!r}: no such file or folder; give a diffusers model folder "
                         "or a single-file checkpoint (.safetensors)")
            for index, path in enumerate(self.text_encoders):
                if not os.path.isfile(path):
                    p.append(f"text_encoders[{index}]={path!r}: no such file; give the text encoder file ComfyUI's "
                             "Load CLIP node reads (models/text_encoders)")
            if self.vae and not os.path.isfile(self.vae):
                p.append(f"vae={self.vae!r}: no such file; give the VAE file ComfyUI's Load VAE node reads "
                         "(models/vae)")
            if self.model_config_dir and not os.path.isdir(self.model_config_dir):
                p.append(f"model_config_dir={self.model_config_dir!r}: no such folder; give a diffusers model folder "
                         "whose configs describe the checkpoint, or leave it empty")
            if self.dataset_dir.strip() and not os.path.isdir(self.dataset_dir):
                p.append(f"dataset_dir={self.dataset_dir!r}: no such folder; give the folder Save Training Set "
                         "(or `versat2i build-dataset`) wrote")
            exists = self.output_dir.strip() and not problem and folders_ok and self.output_path.exists()
            if exists and not self.overwrite:
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
    bucket_step: int = 64  # bucket sides are multiples of this (px)
    bucket_max_aspect: float = 2.0  # widest bucket: long side / short side
    random_flip: bool = False  # mirror images at random (off: text and asymmetric subjects)
    cache_latents: bool = False  # encode every image once before training (and reuse generation latents)
    cache_text_embeddings: bool = False  # encode every caption once (frozen text encoders only)
    keep_checkpoints: bool = True  # false: delete the checkpoints once the final file is written

    # cache_latents is not among them: a cached latent is one posterior sample drawn before training
    # (a fresh one every step otherwise), and the noise stream shifts without the per-step VAE
    # samples. Cached text embeddings are the same numbers the frozen encoders give every step.
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = TrainingRunConfig.NON_RESULT_FIELDS | {
        "cache_text_embeddings", "keep_checkpoints"}

    def problems(self, *, check_paths: bool = True) -> list[str]:
        p = super().problems(check_paths=check_paths)
        # Multiples of 8 (the range is SETTING_RANGES'): the embedded demo world trains at 32 px.
        if self.resolution % 8:
            p.append(f"resolution={self.resolution}: must be a multiple of 8 "
                     f"(e.g. {max(8, round(self.resolution / 64) * 64)})")
        if self.bucket_step % 8:
            p.append(f"bucket_step={self.bucket_step}: must be a multiple of 8 (64 is usual)")
        if self.cache_latents and self.random_flip:
            p.append("random_flip with cache_latents: cached latents cannot be flipped; turn one off")
        return p

    def memory_needs(self, size) -> tuple[int, int]:
        """(parameters that train, bytes of frozen extras beyond the base model) of a run on a base
        model of ``size`` (``models.loading.ModelSize``), for ``trainer/memory.py``'s estimate."""
        return 0, 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraTrainConfig(ImageTrainingConfig):
    """One aspect LoRA (kohya keys, peft layers) trained on one aspect's folders of a training set."""

    aspect: str = ""  # train on the <repeats>_<aspect> folders of this aspect ("" = every folder)
    # LoRA
    rank: int = 16  # LoRA rank (size of the update; 4-32 is usual)
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0  # LoRA dropout
    train_feed_forward: bool = False  # also the transformer feed-forward layers
    train_text_encoder: bool = False  # also the text encoder(s) attention + MLP
    text_encoder_lr: float = 0.0  # 0 = learning_rate
    # loss
    noise_offset: float = 0.0  # offset noise: helps very dark / bright images (0.05-0.1; 0 = off)
    snr_gamma: float = 0.0  # min-SNR weighting gamma (0 = off; 5 is the paper's value)
    # flow matching (the DiT families), as diffusers' recipes: where noise levels are drawn, how losses weigh
    weighting_scheme: str = "none"  # none (uniform) | logit_normal | mode | cosmap | sigma_sqrt
    logit_mean: float = 0.0  # logit_normal: the mean of the logit of the noise level
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: how strongly noise levels gather around the middle
    guidance_scale: float = 0.0  # the guidance input of a guidance-distilled model (0 = its default: FLUX.1-dev 3.5)
    # sample previews while training: a few prompts (default: the training set's first captions) every N steps
    sample_every_n_steps: int = 0  # 0 = no previews
    sample_prompts: tuple[str, ...] = ()  # preview prompts (empty: the training set's first captions)
    sample_count: int = 2  # previews per round when sample_prompts is empty
    sample_steps: int = 0  # sampling steps (0 = the model's default)

    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = ImageTrainingConfig.NON_RESULT_FIELDS | {
        "sample_every_n_steps", "sample_prompts", "sample_count", "sample_steps"}
    LATER_RESULT_FIELDS: ClassVar[frozenset[str]] = ImageTrainingConfig.LATER_RESULT_FIELDS | {
        "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale"}

    def problems(self, *, check_paths: bool = True) -> list[str]:
        p = super().problems(check_paths=check_paths)  # the ranges of rank, alpha, dropout... included
        require_choice(p, "weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        require_positive(p, "logit_std", self.logit_std)
        require_positive(p, "mode_scale", self.mode_scale)
        if not math.isfinite(self.logit_mean):
            p.append(f"logit_mean={self.logit_mean}: must be a finite number (0 is usual)")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            p.append(f"guidance_scale={self.guidance_scale}: must be >= 0 (0 = the model's default)")
        if any(not str(prompt).strip() for prompt in self.sample_prompts):
            p.append("sample_prompts: an empty prompt; give text or leave the list empty (training captions are used)")
        if self.cache_text_embeddings and self.train_text_encoder:
            p.append("cache_text_embeddings with train_text_encoder: a trained text encoder changes the "
                     "embeddings every step; turn one off")
        if self.aspect:
            problem = aspect_name_problem(self.aspect, what="aspect=")
            if problem:
                p.append(problem)
        return p

    def memory_needs(self, size) -> tuple[int, int]:
        # The denoiser's LoRA layers (a text encoder's are a few percent of them: left out).
        targets = (*size.architecture.lora_attention_modules,
                   *(size.architecture.lora_feed_forward_modules if self.train_feed_forward else ()))
        return self.rank * sum(size.lora_target_features.get(t, 0) for t in targets), 0


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


