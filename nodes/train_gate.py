"""Train Gate (Mixture of LoRA): learn the per-layer gate that mixes aspect LoRAs, in a separate
process, and save it as a MoL file next to the LoRAs for the Gated Multi-LoRA Loader.

As for Train Aspect LoRA, the run is a child process under ``accelerate launch`` (it gets the GPU
after ComfyUI's models are unloaded; Cancel kills its process group and keeps the last
checkpoint, so queueing again resumes); identical inputs return the finished MoL file, and a MoL
file of the same name from other inputs is refused unless 'overwrite' is on.

A LoRA socket that brings an empty name (its Train Aspect LoRA kept no image for its aspect) is left
out: the gate mixes the other aspects, and the node's text names the aspects left out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import io

from ..safe_io import TargetExistsError, confined_path, file_identity, relative_name_problem
from ..trainer.config import MIXED_PRECISIONS, input_range
from ..trainer.gate import BALANCE_KINDS, GATE_KINDS, GRANULARITIES
from ..trainer.launcher import TrainingFailed
from ..trainer.mol_file import MOL_SUFFIX
from ..trainer.train_gate import (
    OBJECTIVES,
    GateTrainConfig,
    gate_run_fingerprint,
    lora_aspect_names,
    shared_aspects,
    train_gate_or_reuse,
)
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
from .train_aspect_lora import check_combos, loss_curve_image

RUNS_SUBFOLDER = "versat2i/gate_runs"  # checkpoints and logs, under ComfyUI's output folder
GATE_COMBOS = {"granularity": GRANULARITIES, "gate_kind": GATE_KINDS, "balance_loss": BALANCE_KINDS,
               "objective": OBJECTIVES, "mixed_precision": MIXED_PRECISIONS}
# Sockets for the LoRA names that Train Aspect LoRA nodes output (the loop's four aspects), so a
# workflow links them straight in; more LoRAs, or names typed by hand, go in the `loras` box.
# (ComfyUI 0.3.64 has no public growing input: its AutogrowDynamic is not exported, and frontend
# 1.27 does not render it.)
LORA_SOCKETS = ("lora_1", "lora_2", "lora_3", "lora_4")


def lora_names(loras: str, linked: Iterable[str | None] = (), left_out: Iterable[str] = ()) -> list[str]:
    """The LoRAs in gate order: the linked sockets (lora_1..lora_4), then the ``loras`` box. Each
    holds names one per line or comma separated; blank lines and lines starting with # are skipped
    (an empty socket: its aspect kept no image). ``left_out``: lines naming such aspects, added to
    the error when fewer than two LoRAs remain."""
    names: list[str] = []
    for text in (*linked, loras):
        for line in (text or "").replace(",", "\n").splitlines():
            name = line.strip()
            if name and not name.startswith("#"):
                names.append(name)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"loras: {', '.join(twice)} given twice (lora_1..lora_4 and the loras box are joined); "
                         "list each aspect LoRA once")
    if len(names) < 2:
        raise ValueError("loras: a mixture needs at least two aspect LoRAs; connect Train Aspect LoRA's lora_name "
                         "outputs to lora_1..lora_4, or list the files in loras, one per line (e.g. "
                         "versat2i/loop_aesthetics.safetensors)" + (f" (got {names[0]!r} only)" if names else "")
                         + "".join(f". Left out: {line}" for line in left_out))
    return names


def resolve_paths(dataset: str, ckpt_name: str, loras: str, mol_name: str,
                  linked: Iterable[str | None] = (), left_out: Iterable[str] = (),
                  files: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training set, base model (``files``: DiT Model Files' output, else the checkpoint), LoRA files
    (``lora_names``, relative to the loras folder) and the MoL file, which goes into the LoRAs' common
    folder (it names them relative to itself)."""
    output = Path(folder_paths.get_output_directory())
    dataset_dir = confined_path(output, dataset, what="dataset", writes=False)
    if not dataset_dir.is_dir():
        raise ValueError(f"dataset {dataset!r}: no such folder in ComfyUI's output folder; connect Save Training "
                         "Set's dataset_path")
    chosen = model_files(ckpt_name, files)
    paths = []
    for name in lora_names(loras, linked, left_out):
        path = folder_paths.get_full_path("loras", name)
        if path is None:
            raise ValueError(f"loras: {name!r} is not in models/loras; train it first (Train Aspect LoRA) or fix the "
                             "name")
        if Path(path).resolve() in paths:
            raise ValueError(f"loras: {name!r} names a LoRA file given already; list each aspect LoRA once")
        paths.append(Path(path).resolve())
    problem = shared_aspect_problem(paths)
    if problem:
        raise ValueError(problem)
    root = Path(os.path.commonpath([p.parent for p in paths]))
    if not any(root.is_relative_to(Path(d).resolve()) for d in folder_paths.get_folder_paths("loras")):
        raise ValueError("loras: the LoRAs are in different loras folders; put them in one folder (the MoL file is "
                         "saved next to them)")
    mol = confined_path(root, mol_file_name(mol_name), what="mol_name")
    problem = hidden_name_problem(mol_file_name(mol_name), "mol_name")
    if problem:
        raise ValueError(problem)
    return {"dataset": dataset_dir, "checkpoint": chosen["base_model"], "text_encoders": chosen["text_encoders"],
            "vae": chosen["vae"], "loras": paths, "root": root, "mol": mol, "output": output}


def mol_file_name(mol_name: str) -> str:
    """The MoL file's name relative to the LoRAs' folder (``.mol.safetensors`` added)."""
    stem = mol_name.strip() or "aspects"
    return stem if stem.endswith(MOL_SUFFIX) else stem + MOL_SUFFIX


def mol_name_problem(mol_name: str | None) -> str | None:
    """Why ``mol_name`` cannot be saved (the MoL file and its temporary sibling must fit; bad
    characters, reserved names, '..'), naming mol_name and the fix; None if it can. Needs no folder
    (the MoL file goes next to the LoRAs, known when the node runs, where it is confined to them)."""
    if not isinstance(mol_name, str):
        return None  # linked: checked when the node runs
    name = mol_file_name(mol_name)
    return relative_name_problem(name, what="mol_name") or hidden_name_problem(name, "mol_name")


def shared_aspect_problem(paths: list[Path]) -> str | None:
    """LoRAs of one aspect, in this node's words (it has no input naming aspects: each LoRA's comes
    from its metadata, else its file name). Checked before anything is written or started."""
    shared = shared_aspects(paths, lora_aspect_names(paths))
    if not shared:
        return None
    aspect, files = next(iter(shared.items()))
    return (f"loras: {', '.join(Path(f).name for f in files)} are all LoRAs of aspect {aspect!r}; a mixture needs "
            "one LoRA per aspect: connect (or list) LoRAs trained on different aspects")


def build_config(paths: dict[str, Any], settings: dict[str, Any]):
    return GateTrainConfig(
        base_model=str(paths["checkpoint"]), text_encoders=tuple(paths.get("text_encoders", ())),
        vae=str(paths["vae"]) if paths.get("vae") else "", dataset_dir=str(paths["dataset"]),
        loras=tuple(str(p) for p in paths["loras"]), output_dir=str(paths["root"]),
        output_name=paths["mol"].relative_to(paths["root"]).as_posix(),
        work_dir=str(paths["output"] / RUNS_SUBFOLDER), keep_checkpoints=False, **settings)


def mol_combo_name(mol: Path) -> str:
    """The MoL file as the Gated Multi-LoRA Loader's list names it."""
    for folder in folder_paths.get_folder_paths("loras"):
        folder = Path(folder).resolve()
        if mol.resolve().is_relative_to(folder):
            return mol.resolve().relative_to(folder).as_posix()
    return mol.name


def left_out_aspects(dataset_dir: Path) -> list[str]:
    """Lines naming the training set's aspects that kept no image (not trained, so not mixed)."""
    return [describe_empty(aspect, record) for aspect, record in sorted(empty_aspects(dataset_dir).items())]


def train_gate(dataset: str, ckpt_name: str, loras: str, mol_name: str, settings: dict[str, Any],
               linked: Iterable[str | None] = (), files: dict[str, Any] | None = None):
    """Train (or reuse) the MoL file; returns (its name as the loader lists it, loss points, reused,
    the aspects left out because they kept no image)."""
    left_out = left_out_aspects(confined_path(folder_paths.get_output_directory(), dataset, what="dataset"))
    paths = resolve_paths(dataset, ckpt_name, loras, mol_name, linked, left_out, files)
    config = build_config(paths, settings)
    hooks = TrainingHooks(config.max_train_steps)
    try:
        result = train_gate_or_reuse(config, runs_root=paths["output"] / RUNS_SUBFOLDER, **hooks.launch_kwargs())
    except TrainingFailed as exc:
        raise RuntimeError(f"Train Gate: {exc}") from None
    except TargetExistsError as exc:
        raise overwrite_refused(exc, "Train Gate", "MoL file", "mol_name") from None
    hooks.finish()
    return mol_combo_name(result.mol_path), result.loss_curve, result.reused, left_out


class TrainGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("TrainGate"),
            display_name="Train Gate (Mixture of LoRA)",
            category=category("mix"),
            description=(
                "Learns how to mix aspect LoRAs layer by layer (MoLE-style gate with a balancing loss), with the "
                "base model and the LoRAs frozen, on the union of the aspects' training images. Connect the Train "
                "Aspect LoRA nodes to lora_1..lora_4 (list more LoRAs in loras). Saves a "
                ".mol.safetensors next to the LoRAs for the Gated Multi-LoRA Loader. Runs in a separate process; "
                "Cancel keeps the last checkpoint (queue again to resume); identical inputs reuse the finished file."
            ),
            is_output_node=True,
            inputs=[
                io.String.Input("dataset", default="versat2i/training_set",
                                tooltip="Training set folder inside ComfyUI's output folder "
                                        "(all its aspects are used)."),
                io.Combo.Input("ckpt_name", options=[*folder_paths.get_filename_list("checkpoints"), NONE],
                               tooltip="The base model the LoRAs were trained on (a checkpoint from "
                                       "models/checkpoints). Not used when model_files is connected (a DiT)."),
                io.String.Input("loras", default="", multiline=True,
                                placeholder="LoRA files beyond lora_1..lora_4, one per line",
                                tooltip="Aspect LoRAs typed by hand (or more than four), one per line as the LoRA "
                                        "loaders name them (e.g. versat2i/loop_aesthetics.safetensors); they follow "
                                        "lora_1..lora_4 in the gate. Each LoRA's aspect name comes from its "
                                        "metadata (else the file name)."),
                io.String.Input("mol_name", default="aspects",
                                tooltip="Name of the MoL file, saved in the LoRAs' folder (.mol.safetensors added)."),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default=GateTrainConfig.granularity,
                               tooltip="token: a gate per token from the layer input (MoLE; mode 'dynamic' at run "
                                       "time). "
                                       "prompt: a gate per prompt from the text embedding (can be baked per prompt). "
                                       "layer: one learned weight per layer and LoRA (bakes exactly)."),
                io.Combo.Input("gate_kind", options=list(GATE_KINDS), default=GateTrainConfig.gate_kind,
                               tooltip="How the gate weighs the LoRAs. softmax: weights sum to 1 (MoLE; each aspect "
                                       "gets a share of its LoRA). softmax_n: N x softmax, weights sum to N (starts "
                                       "with every LoRA at full weight). sigmoid: each LoRA weighted 0..2 on its own. "
                                       "scaled_softmax: softmax routing times a learned strength per layer and LoRA."),
                io.Int.Input("timestep_knots", default=GateTrainConfig.timestep_knots, min=0, max=64,
                             tooltip="0: the gate ignores the noise level. K >= 2: the gate also reads the timestep "
                                     "(learned offsets at K noise levels, interpolated): aspects may act at "
                                     "different steps. Such a gate runs dynamically (bake cannot merge it once)."),
                io.Combo.Input("balance_loss", options=list(BALANCE_KINDS), default="mole",
                               tooltip="mole: -log prod(mean gate) over all layers; switch: load balancing per layer; "
                                       "none."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default=GateTrainConfig.objective,
                               tooltip="denoise: the denoising loss over all aspects' images, each image counting the "
                                       "same. aspect_balanced: each aspect's images count the same in total (when "
                                       "the aspects kept different numbers of images)."),
                io.Float.Input("balance_weight", default=0.01, **input_range("balance_weight"), step=0.001,
                               tooltip="Weight of the balancing loss against the denoising loss."),
                io.Int.Input("steps", default=200, **input_range("max_train_steps"),
                             tooltip="Optimiser steps (only the gate trains; the base model and the LoRAs stay "
                                     "frozen)."),
                io.Float.Input("learning_rate", default=1e-2, **input_range("learning_rate"), step=1e-5,
                               tooltip="AdamW learning rate of the gate."),
                io.Int.Input("batch_size", default=1, **input_range("train_batch_size"),
                             tooltip="Images per step and device."),
                io.Int.Input("resolution", default=512, **input_range("resolution"), step=8,
                             tooltip="Training resolution (a multiple of 8)."),
                # No "control after generate" (the frontend would default it to "randomize" and
                # retrain on every queue).
                io.Int.Input("seed", default=0, **input_range("seed"), control_after_generate=False,
                             tooltip="Seed of the training noise and data order (the gate starts as the equal mix). "
                                     "Stays as typed, so queueing again reuses the finished MoL file; change it "
                                     "to train a new one."),
                io.Combo.Input("mixed_precision", options=list(MIXED_PRECISIONS), default="auto", optional=True,
                               tooltip="auto: bf16 (or fp16) on CUDA, full precision on CPU."),
                io.Boolean.Input("cache_latents", default=True, optional=True,
                                 tooltip="Encode each image once before training."),
                io.Int.Input("checkpoint_every", default=100, **input_range("checkpointing_steps"), optional=True,
                             tooltip="Save a resumable checkpoint every N steps."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip=overwrite_tooltip("MoL file", "training set, LoRAs, checkpoint and settings")),
                *(io.String.Input(name, optional=True, force_input=True,
                                  tooltip=f"Aspect LoRA number {index} of the mixture: connect a Train Aspect "
                                          "LoRA's lora_name output. The gate mixes lora_1..lora_4 in this order, "
                                          "then the loras box; an empty name (an aspect that kept no image) is "
                                          "left out.")
                  for index, name in enumerate(LORA_SOCKETS, start=1)),
                ModelFiles.Input("model_files", optional=True,
                                 tooltip="The DiT the LoRAs were trained on (FLUX.1, FLUX.2-klein, Z-Image): connect "
                                         "the DiT Model Files node that fed their Train Aspect LoRA nodes. "
                                         "Connected, ckpt_name is not used."),
            ],
            outputs=[
                io.String.Output("mol_file", display_name="mol_file",
                                 tooltip="The MoL file, as the Gated Multi-LoRA Loader's mol_file list names it "
                                         "(e.g. versat2i/loop.mol.safetensors)."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="A plot of the denoising loss per step; connect a Preview Image to see it."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mol_name: str | None = None) -> bool | str:
        # ComfyUI attaches what this returns to every input it takes, so it takes mol_name only: a name
        # that cannot be saved is one error, on mol_name, when the prompt is queued. A missing
        # checkpoint is ComfyUI 0.33's own one error on ckpt_name (0.3.64 checks no V3 combo value:
        # the node refuses it when it runs, naming ckpt_name); the DiT's files are checked on DiT Model
        # Files. The other inputs (LoRAs of one aspect included) are checked first thing when the node
        # runs, before anything is written, each error naming its input.
        return mol_name_problem(mol_name) or True

    @classmethod
    def fingerprint_inputs(cls, dataset: str, ckpt_name: str, loras: str, mol_name: str, **inputs) -> Any:
        try:
            linked, settings = _split_linked(inputs)
            files = settings.pop("model_files", None)
            paths = resolve_paths(dataset, ckpt_name, loras, mol_name, linked, files=files)
            mol = paths["mol"]
            return (gate_run_fingerprint(build_config(paths, _settings(settings)),
                                         cpu=TrainingHooks.cpu_only() or None),
                    file_identity(mol) if mol.is_file() else None)
        except Exception:  # a bad input is reported by execute; re-run to get there
            return math.nan

    @classmethod
    def execute(cls, dataset: str, ckpt_name: str, loras: str = "", mol_name: str = "aspects",
                **inputs) -> io.NodeOutput:
        linked, settings = _split_linked(inputs)
        files = settings.pop("model_files", None)
        check_combos(settings, GATE_COMBOS)
        name, curve, reused, left_out = train_gate(dataset, ckpt_name, loras, mol_name, _settings(settings), linked,
                                                   files)
        title = f"{name} ({'reused, ' if reused else ''}{curve[-1][0] if curve else 0} steps)"
        summary = f"MoL file: {name}" + (" (already trained from these inputs)" if reused else "")
        if left_out:
            summary += "\nNot in the mixture: " + "; ".join(left_out)
        return io.NodeOutput(name, loss_curve_image(curve, title), ui={"text": (summary,)})


_SETTING_FIELDS = {"steps": "max_train_steps", "batch_size": "train_batch_size",
                   "checkpoint_every": "checkpointing_steps"}


def _split_linked(inputs: dict[str, Any]) -> tuple[list[str | None], dict[str, Any]]:
    """(the LoRA sockets' values in order, the other inputs)."""
    return [inputs.get(name) for name in LORA_SOCKETS], {k: v for k, v in inputs.items() if k not in LORA_SOCKETS}


def _settings(inputs: dict[str, Any]) -> dict[str, Any]:
    return {_SETTING_FIELDS.get(k, k): v for k, v in inputs.items() if v is not None}


NODES = [TrainGate]
