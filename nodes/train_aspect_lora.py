"""Train Aspect LoRA: train one aspect's LoRA on a training set, in a separate process.

The training runs under ``accelerate launch`` in a child process (``trainer/launcher.py``), so it
gets the GPU after ComfyUI's models are unloaded, it cannot leak memory into ComfyUI, and Cancel
kills it (its whole process group) while keeping its last checkpoint: queueing the same inputs
again resumes there. Identical inputs with a finished LoRA return that LoRA without training; a LoRA
of the same name from other inputs is refused unless 'overwrite' is on.

An aspect the training set kept no image for (its threshold kept nothing, or geometry found no
person) is not an error: the node trains nothing, says so on its text and loss image, and outputs
an empty lora_name, which Train Gate leaves out of the mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io

from ..safe_io import TargetExistsError, confined_path, file_identity, relative_name_problem
from ..trainer.config import (
    LR_SCHEDULERS,
    MEMORY_SAVING,
    MIXED_PRECISIONS,
    PREDICTION_TYPES,
    WEIGHTING_SCHEMES,
    LoraTrainConfig,
    input_range,
)
from ..trainer.launcher import TrainingFailed
from ..trainer.lora_job import train_or_reuse
from ..trainer.loss_curve import render_loss_curve
from ..trainer.train_lora import lora_run_fingerprint
from ..training_set.layout import REPEATS_FOLDER
from ..training_set.manifest import describe_empty, empty_aspects
from .common import (
    NONE,
    ModelFiles,
    TrainingHooks,
    category,
    hidden_name_problem,
    node_id,
    overwrite_refused,
    overwrite_tooltip,
)
from .dit_model_files import model_files

LORA_SUBFOLDER = "versat2i"  # every LoRA this node writes lives in models/loras/versat2i/
RUNS_SUBFOLDER = "versat2i/lora_runs"  # checkpoints and logs, under ComfyUI's output folder


# What the frontend's "control after generate" box stores after a seed. Before the training seeds
# dropped that box (0.1.0 development), a saved workflow had one of these right after `seed`; the
# frontend assigns widget values by position, so in such a save every value after seed moved by one.
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


TRAINING_COMBOS = {"lr_scheduler": LR_SCHEDULERS, "mixed_precision": MIXED_PRECISIONS,
                   "prediction_type": PREDICTION_TYPES, "memory_saving": MEMORY_SAVING,
                   "weighting_scheme": WEIGHTING_SCHEMES}


def bad_combo_message(name: str, value: str, options) -> str:
    message = f"{name} {value!r}: must be one of {', '.join(options)}"
    if value in SEED_CONTROL_VALUES:
        message += (f" ('{value}' is a seed's old 'control after generate' value: this node was saved by an older "
                    "version, so the values after seed moved by one; set them again, or add the node anew)")
    return message


def check_combos(inputs: dict[str, Any], choices: dict[str, Any] | None = None) -> None:
    """Refuse a combo value that is not one of its choices (ComfyUI 0.3.64 lets V3 combo values through;
    an old workflow can hold one), naming the input."""
    for name, options in (choices or TRAINING_COMBOS).items():
        value = inputs.get(name)
        if value is not None and value not in options:
            raise ValueError(bad_combo_message(name, value, options))


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_file_name(dataset: str, aspect: str, lora_name: str) -> str:
    """``<name>.safetensors`` inside the versat2i loras folder (default: <dataset leaf>_<aspect>)."""
    name = lora_name.strip() or f"{Path(dataset.replace(chr(92), '/')).name}_{aspect or 'all'}"
    return name if name.endswith(".safetensors") else name + ".safetensors"


def lora_name_problem(lora_name: str | None) -> str | None:
    """Why a typed ``lora_name`` cannot be saved (too long with its temporary sibling, bad characters,
    a reserved name, a path out of the folder, a symlink out of it), naming lora_name and the fix;
    None if it can (or is empty: the default name is derived from the dataset when the node runs)."""
    if not isinstance(lora_name, str) or not lora_name.strip():
        return None
    name = lora_file_name("", "", lora_name)
    problem = relative_name_problem(name, what="lora_name") or hidden_name_problem(name, "lora_name")
    if problem:
        return problem
    try:
        confined_path(loras_root() / LORA_SUBFOLDER, name, what="lora_name")
    except ValueError as exc:
        return str(exc)
    return None


def resolve_paths(dataset: str, aspect: str, ckpt_name: str, lora_name: str,
                  files: dict[str, str | None] | None = None) -> dict[str, Path]:
    """dataset folder, model files (``files``: DiT Model Files' output, else the checkpoint) and LoRA
    file, each confined to its ComfyUI folder."""
    output = Path(folder_paths.get_output_directory())
    dataset_dir = confined_path(output, dataset, what="dataset", writes=False)
    if not dataset_dir.is_dir():
        raise ValueError(f"dataset {dataset!r}: no such folder in ComfyUI's output folder; connect Save Training "
                         "Set's dataset_path, or type the folder name it wrote (e.g. 'versat2i/training_set')")
    chosen = model_files(ckpt_name, files)
    name = lora_file_name(dataset, aspect, lora_name)
    lora_file = confined_path(loras_root() / LORA_SUBFOLDER, name, what="lora_name")
    problem = hidden_name_problem(name, "lora_name")
    if problem:
        raise ValueError(problem)
    return {"dataset": dataset_dir, "checkpoint": chosen["base_model"], "text_encoders": chosen["text_encoders"],
            "vae": chosen["vae"], "lora": lora_file, "output": output}


def single_aspect(dataset_dir: Path, aspect: str) -> str:
    """``aspect``, or the dataset's only aspect when empty (an error naming them when there are several)."""

    if aspect:
        return aspect
    found = sorted({m.group(2) for p in dataset_dir.iterdir() if p.is_dir() and (m := REPEATS_FOLDER.match(p.name))})
    if len(found) > 1:
        raise ValueError(f"aspect: the dataset has several aspects ({', '.join(found)}); type the one to train")
    return found[0] if found else ""


def build_config(paths: dict[str, Path], aspect: str, settings: dict[str, Any]) -> LoraTrainConfig:
    root = loras_root().resolve()
    return LoraTrainConfig(
        base_model=str(paths["checkpoint"]), dataset_dir=str(paths["dataset"]), aspect=aspect,
        text_encoders=paths.get("text_encoders", ()), vae=str(paths["vae"]) if paths.get("vae") else "",
        output_dir=str(root), output_name=paths["lora"].relative_to(root).as_posix(),
        work_dir=str(paths["output"] / RUNS_SUBFOLDER),  # replaced by a per-fingerprint folder
        keep_checkpoints=False, **settings)


def loss_curve_image(points: list[tuple[int, float]], title: str, message: str = "no loss values") -> torch.Tensor:
    return torch.from_numpy(render_loss_curve(points, title=title, message=message)).float().div(255.0).unsqueeze(0)


@dataclass(frozen=True)
class AspectLoraResult:
    lora_name: str  # relative to the loras folder; "" when the aspect kept no image
    loss_curve: list[tuple[int, float]]
    reused: bool = False
    skipped: str = ""  # why nothing was trained (the aspect kept no image)


def train_aspect_lora(dataset: str, aspect: str, ckpt_name: str, lora_name: str,
                      settings: dict[str, Any]) -> AspectLoraResult:
    """Train (or reuse) the LoRA, or skip an aspect the training set kept no image for."""

    settings = dict(settings)
    files = settings.pop("model_files", None)
    paths = resolve_paths(dataset, aspect, ckpt_name, lora_name, files)
    aspect = single_aspect(paths["dataset"], aspect)
    empty = empty_aspects(paths["dataset"]).get(aspect)
    if empty is not None:
        return AspectLoraResult("", [], skipped=describe_empty(aspect, empty))
    config = build_config(paths, aspect, settings)
    hooks = TrainingHooks(config.max_train_steps)
    try:
        result = train_or_reuse(config, runs_root=paths["output"] / RUNS_SUBFOLDER, **hooks.launch_kwargs())
    except TrainingFailed as exc:
        raise RuntimeError(f"Train Aspect LoRA: {exc}") from None
    except TargetExistsError as exc:
        raise overwrite_refused(exc, "Train Aspect LoRA", "LoRA", "lora_name") from None
    hooks.finish()
    return AspectLoraResult(result.lora_path.relative_to(loras_root().resolve()).as_posix(), result.loss_curve,
                            result.reused)


class TrainAspectLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("TrainAspectLoRA"),
            display_name="Train Aspect LoRA (VersaT2I)",
            category=category("train"),
            description=(
                "Trains one LoRA for one aspect on a training set from Save Training Set, in a separate process "
                "(accelerate + diffusers + peft), and saves it in kohya format to models/loras/versat2i/ where the "
                "stock LoRA loaders find it. ComfyUI's loaded models are unloaded first so training gets the GPU. "
                "Cancel stops training and keeps the last checkpoint: queue again to resume. Identical inputs "
                "return the finished LoRA without training again."
            ),
            is_output_node=True,
            inputs=[
                io.String.Input("dataset", default="versat2i/training_set",
                                tooltip="Training set folder inside ComfyUI's output folder (connect Save Training "
                                        "Set's dataset_path)."),
                io.String.Input("aspect", default="",
                                tooltip="Aspect to train (its '<repeats>_<aspect>' folder). Empty: the dataset's "
                                        "only aspect."),
                io.Combo.Input("ckpt_name", options=[*folder_paths.get_filename_list("checkpoints"), NONE],
                               tooltip="Base model: an SD1.x, SD2.x or SDXL checkpoint (or a full FLUX.1 checkpoint) "
                                       "from models/checkpoints. Not used when model_files is connected (a DiT)."),
                io.String.Input("lora_name", default="",
                                tooltip="File name inside models/loras/versat2i/ (sub-folders allowed). Empty: "
                                        "<dataset>_<aspect>."),
                io.Int.Input("steps", default=500, **input_range("max_train_steps"),
                             tooltip="Optimiser steps (each sees batch_size x gradient_accumulation_steps images)."),
                io.Float.Input("learning_rate", default=1e-4, **input_range("learning_rate"), step=1e-6,
                               tooltip="AdamW learning rate of the UNet LoRA."),
                io.Int.Input("rank", default=16, **input_range("rank"),
                             tooltip="LoRA rank: capacity and file size (4-32 is usual)."),
                io.Float.Input("alpha", default=16.0, **input_range("alpha"), step=0.5,
                               tooltip="LoRA alpha; the LoRA is scaled by alpha / rank."),
                io.Int.Input("batch_size", default=1, **input_range("train_batch_size"),
                             tooltip="Images per step and device."),
                io.Int.Input("resolution", default=512, **input_range("resolution"), step=8,
                             tooltip="Training resolution (area = resolution^2, aspect-ratio buckets); a multiple "
                                     "of 8."),
                # No "control after generate": the frontend's default for a seed is "randomize",
                # which would change the inputs, and so retrain, on every queue.
                io.Int.Input("seed", default=0, **input_range("seed"), control_after_generate=False,
                             tooltip="Seed of LoRA init, noise and data order. Stays as typed, so queueing again "
                                     "reuses the finished LoRA; change it to train a new one."),
                io.Combo.Input("lr_scheduler", options=list(LR_SCHEDULERS), default="constant", optional=True,
                               tooltip="Learning-rate schedule (diffusers)."),
                io.Int.Input("lr_warmup_steps", default=0, **input_range("lr_warmup_steps"), optional=True,
                             tooltip="Warm-up steps of the schedule."),
                io.Int.Input("gradient_accumulation_steps", default=1, **input_range("gradient_accumulation_steps"),
                             optional=True,
                             tooltip="Micro-batches per optimiser step."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute activations during the backward pass: less memory, "
                                         "slower steps."),
                io.Combo.Input("mixed_precision", options=list(MIXED_PRECISIONS), default="auto", optional=True,
                               tooltip="auto: bf16 (or fp16) on CUDA, full precision on CPU."),
                io.Boolean.Input("train_text_encoder", default=False, optional=True,
                                 tooltip="Also train LoRA layers in the text encoder(s)."),
                io.Boolean.Input("train_feed_forward", default=False, optional=True,
                                 tooltip="Also train the feed-forward layers (attention only by default)."),
                io.Boolean.Input("cache_latents", default=True, optional=True,
                                 tooltip="Encode each image once before training (faster; reuses latents saved at "
                                         "generation)."),
                io.Float.Input("noise_offset", default=0.0, **input_range("noise_offset"), step=0.01, optional=True,
                               tooltip="Offset noise (0.05-0.1 helps very dark / bright images)."),
                io.Float.Input("snr_gamma", default=0.0, **input_range("snr_gamma"), step=0.5, optional=True,
                               tooltip="Min-SNR loss weighting gamma (0 = off, 5 is usual)."),
                io.Float.Input("dropout", default=0.0, **input_range("dropout"), step=0.01, optional=True,
                               tooltip="Dropout on the LoRA layers (0 = off; 0.05-0.1 can help small "
                                       "training sets)."),
                io.Combo.Input("prediction_type", options=list(PREDICTION_TYPES), default="auto", optional=True,
                               tooltip="auto: from the checkpoint (v-prediction SD2/SDXL are detected)."),
                io.Int.Input("checkpoint_every", default=100, **input_range("checkpointing_steps"), optional=True,
                             tooltip="Save a resumable checkpoint every N steps."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip=overwrite_tooltip("LoRA", "training set, checkpoint and settings")),
                ModelFiles.Input("model_files", optional=True,
                                 tooltip="A DiT's files (FLUX.1, FLUX.2-klein, Z-Image): connect a DiT Model Files "
                                         "node. Connected, the LoRA is trained on that DiT and ckpt_name is not "
                                         "used."),
                io.Combo.Input("memory_saving", options=list(MEMORY_SAVING), default="off", optional=True,
                               tooltip="auto: turn on text-embedding caching, gradient checkpointing, fp8 base weights "
                                       "and block offloading, as far as needed for the run to fit the GPU. A run "
                                       "that cannot fit stops before it starts, naming what to lower."),
                io.Boolean.Input("fp8_base", default=False, optional=True,
                                 tooltip="DiT models: keep the frozen weights in fp8 (half of bf16), computed in bf16. "
                                         "Saves memory together with gradient checkpointing."),
                io.Boolean.Input("offload_blocks", default=False, optional=True,
                                 tooltip="DiT models on a GPU: frozen blocks wait in RAM and move to the GPU one at a "
                                         "time (slower; for 12B models on 16 GB)."),
                io.Combo.Input("weighting_scheme", options=list(WEIGHTING_SCHEMES), default="none", optional=True,
                               tooltip="DiT models: where noise levels are drawn and how losses weigh (diffusers' "
                                       "recipes: none = uniform)."),
                io.Int.Input("sample_every_n_steps", default=0, **input_range("sample_every_n_steps"), optional=True,
                             tooltip="Render preview images every N steps (0 = off): shown here while training and "
                                     "saved in the run folder."),
                io.String.Input("sample_prompts", default="", multiline=True, optional=True,
                                tooltip="Preview prompts, one per line (empty: the training set's first captions)."),
            ],
            outputs=[
                io.String.Output("lora_file", display_name="lora_name",  # ids must differ from input ids
                                 tooltip="The LoRA, relative to the loras folder (e.g. versat2i/name.safetensors), "
                                         "as LoRA loaders name it; empty when the aspect kept no image (nothing "
                                         "trained: Train Gate mixes the other aspects)."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="A plot of the training loss per step (raw and smoothed); connect a Preview "
                                        "Image to see it."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str | None = None) -> bool | str:
        # ComfyUI attaches what this returns to every input it takes, so it takes lora_name only: a
        # name that cannot be saved is one error, on lora_name, when the prompt is queued. The DiT's
        # files are checked on DiT Model Files; a missing checkpoint is ComfyUI 0.33's own one error on
        # ckpt_name (it checks V3 combo values; 0.3.64 does not, and the node refuses it when it runs).
        # The other inputs are checked when the node runs, naming the input (as is the default name,
        # derived from the dataset, and lora_name again: ComfyUI 0.3.64 or an API prompt may skip this).
        return lora_name_problem(lora_name) or True

    @classmethod
    def fingerprint_inputs(cls, dataset: str, aspect: str, ckpt_name: str, lora_name: str, **settings) -> Any:
        # ComfyUI caches outputs by inputs; the data, the checkpoint or the LoRA file can change on disk
        # with the same inputs, so they take part in the cache key.
        try:
            settings = dict(settings)
            files = settings.pop("model_files", None)
            paths = resolve_paths(dataset, aspect, ckpt_name, lora_name, files)
            config = build_config(paths, single_aspect(paths["dataset"], aspect), _settings(settings))
            lora = paths["lora"]
            return (lora_run_fingerprint(config, cpu=TrainingHooks.cpu_only() or None),
                    file_identity(lora) if lora.is_file() else None)
        except Exception:  # a bad input is reported by execute; re-run to get there
            return math.nan

    @classmethod
    def execute(cls, dataset: str, aspect: str, ckpt_name: str, lora_name: str, **settings) -> io.NodeOutput:
        check_combos(settings)
        result = train_aspect_lora(dataset, aspect.strip(), ckpt_name, lora_name, _settings(settings))
        if result.skipped:
            summary = f"NOT TRAINED: {result.skipped}. Train Gate mixes the other aspects."
            curve = loss_curve_image([], f"{aspect.strip() or 'aspect'}: not trained", "no image kept:\nnot trained")
            return io.NodeOutput("", curve, ui={"text": (summary,)})
        steps = result.loss_curve[-1][0] if result.loss_curve else 0
        title = f"{result.lora_name} ({'reused, ' if result.reused else ''}{steps} steps)"
        summary = f"LoRA: {result.lora_name}" + (" (already trained from these inputs)" if result.reused else "")
        return io.NodeOutput(result.lora_name, loss_curve_image(result.loss_curve, title), ui={"text": (summary,)})


# node input -> LoraTrainConfig field (inputs not listed keep their name)
_SETTING_FIELDS = {"steps": "max_train_steps", "batch_size": "train_batch_size",
                   "checkpoint_every": "checkpointing_steps"}


def _settings(inputs: dict[str, Any]) -> dict[str, Any]:
    settings = {_SETTING_FIELDS.get(k, k): v for k, v in inputs.items() if v is not None}
    if settings.get("mixed_precision") is None:
        settings.pop("mixed_precision", None)
    if "sample_prompts" in settings:  # one per line
        settings["sample_prompts"] = tuple(line.strip() for line in settings["sample_prompts"].splitlines()
                                           if line.strip())
    return settings


NODES = [TrainAspectLora]
