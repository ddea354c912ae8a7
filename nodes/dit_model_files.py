"""DiT Model Files: the split files of a DiT (FLUX.1, FLUX.2-klein, Z-Image) that Train Aspect LoRA and
Train Gate train over, picked as ComfyUI's Load Diffusion Model / Load CLIP / Load VAE name them.

The node outputs the chosen file names (``VERSAT2I_MODEL_FILES``); connected to a trainer's
``model_files`` socket, they replace its ``ckpt_name``. Files that do not belong together (a FLUX.1
VAE with Z-Image, a T5 as FLUX.2-klein's text encoder, FLUX.1 without its T5) are refused when the
prompt is queued, on this node's input at fault: ``validate_inputs`` reads the files' headers only.
The trainers keep their own ``validate_inputs`` for their names (ComfyUI attaches what a
``validate_inputs`` returns to every input it takes, so each node checks one set of inputs there).

The helpers below resolve the files for both trainers (``model_files``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import io

from ..models.split_files import ModelFilesError, inspect_model_files
from .common import NONE, ModelFiles, category, node_id

# node input -> (ComfyUI model folder, what the file is)
MODEL_FILE_INPUTS = {"diffusion_model": ("diffusion_models", "a FLUX.1 / FLUX.2-klein / Z-Image diffusion model"),
                     "text_encoder": ("text_encoders", "its text encoder (CLIP-L or Qwen3)"),
                     "text_encoder_2": ("text_encoders", "FLUX.1's second text encoder (T5-XXL)"),
                     "vae": ("vae", "its VAE")}
OPTIONAL_FILES = ("text_encoder_2",)  # inputs with a "none" choice (FLUX.1's T5; the other families have none)


def model_file_options(name: str) -> list[str]:
    """The choices of a model-file input: its folder's files (as ComfyUI's loaders list them),
    ``none`` first for an optional one."""
    files = folder_paths.get_filename_list(MODEL_FILE_INPUTS[name][0])
    return [NONE, *files] if name in OPTIONAL_FILES else list(files)


def model_file_path(input_name: str, value: str | None) -> Path | None:
    """The full path of a model-file input (None when it is ``none`` or empty); ``ValueError`` naming the input."""
    if not value or value == NONE:
        return None
    folder = MODEL_FILE_INPUTS[input_name][0]
    if value not in folder_paths.get_filename_list(folder):
        raise ValueError(f"{input_name} {value!r}: not in models/{folder}; put the file there and refresh")
    return Path(folder_paths.get_full_path_or_raise(folder, value))


def dit_file_paths(files: dict[str, Any]) -> dict[str, Any]:
    """base_model, text_encoders and vae paths of a DiT Model Files value; ``ValueError`` naming the input."""
    if not isinstance(files, dict):
        raise ValueError(f"model_files: expected DiT Model Files' output, got {type(files).__name__}; connect a "
                         "DiT Model Files (VersaT2I) node")
    paths = {name: model_file_path(name, files.get(name)) for name in MODEL_FILE_INPUTS}
    missing = [name for name in MODEL_FILE_INPUTS if name not in OPTIONAL_FILES and paths[name] is None]
    if missing:
        folders = ", ".join(f"{name} (models/{MODEL_FILE_INPUTS[name][0]})" for name in missing)
        raise ValueError(f"{missing[0]}: no file chosen; choose {folders}")
    encoders = tuple(str(p) for p in (paths["text_encoder"], paths["text_encoder_2"]) if p is not None)
    return {"base_model": paths["diffusion_model"], "text_encoders": encoders, "vae": paths["vae"]}


def model_files(ckpt_name: str, files: dict[str, Any] | None) -> dict[str, Any]:
    """base_model, text_encoders and vae paths of a trainer: the DiT's files when its ``model_files``
    socket is connected (``ckpt_name`` is then not used), else the checkpoint."""
    if files is not None:
        return dit_file_paths(files)
    if not ckpt_name or ckpt_name == NONE or ckpt_name not in folder_paths.get_filename_list("checkpoints"):
        raise ValueError(f"ckpt_name {ckpt_name!r}: not in models/checkpoints; put the checkpoint there and refresh, "
                         "or connect a DiT Model Files node to model_files")
    return {"base_model": Path(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)), "text_encoders": (),
            "vae": None}


def model_files_problem(files: dict[str, Any]) -> str | None:
    """Why the chosen DiT files cannot train together, naming the node input at fault (read from the
    files' headers only: cheap enough to run when a prompt is queued), or None."""
    try:
        chosen = dit_file_paths(files)
    except ValueError as exc:
        return str(exc)
    try:
        inspect_model_files(chosen["base_model"], chosen["text_encoders"], chosen["vae"])
    except ModelFilesError as exc:
        name = {"base_model": "diffusion_model", "vae": "vae", "text_encoders": "text_encoder"}[exc.field]
        if exc.field == "text_encoders" and exc.index is not None:
            given = [n for n in ("text_encoder", "text_encoder_2") if files.get(n) not in (None, NONE)]
            name = given[exc.index] if exc.index < len(given) else name
        message = str(exc).split(": ", 1)[-1] if str(exc).startswith(exc.field) else str(exc)
        return f"{name}: {message}"
    return None


class DiTModelFiles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("DiTModelFiles"),
            display_name="DiT Model Files (VersaT2I)",
            category=category("train"),
            description=(
                "Picks a DiT's files (FLUX.1, FLUX.2-klein, Z-Image: diffusion model, text encoder(s), VAE) as "
                "Load Diffusion Model, Load CLIP and Load VAE list them, for Train Aspect LoRA and Train Gate: "
                "connect model_files to their model_files input (their ckpt_name is then not used). Files that do "
                "not belong together are refused when the prompt is queued, naming the input at fault."
            ),
            inputs=[
                *(io.Combo.Input(name, options=model_file_options(name),
                                 **({"default": NONE} if name in OPTIONAL_FILES else {}),
                                 tooltip=f"{what[0].upper()}{what[1:]}, from models/{folder}"
                                         + ("; none = not used (FLUX.2-klein and Z-Image have one text encoder)."
                                            if name in OPTIONAL_FILES else "."))
                  for name, (folder, what) in MODEL_FILE_INPUTS.items()),
            ],
            outputs=[
                ModelFiles.Output("model_files", display_name="model_files",
                                  tooltip="The chosen files: connect to Train Aspect LoRA's or Train Gate's "
                                          "model_files."),
            ],
        )

    @classmethod
    def validate_inputs(cls, diffusion_model: str | None = None, text_encoder: str | None = None,
                        text_encoder_2: str | None = None, vae: str | None = None) -> bool | str:
        # ComfyUI attaches what this returns to every input it takes: this node's four file inputs, so
        # files that do not belong together are reported on them. A linked input (None) is checked
        # when the node runs.
        files = {"diffusion_model": diffusion_model, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                 "vae": vae}
        if any(value is None for value in files.values()):
            return True
        return model_files_problem(files) or True

    @classmethod
    def execute(cls, diffusion_model: str, text_encoder: str, text_encoder_2: str = NONE,
                vae: str = "") -> io.NodeOutput:
        files = {"diffusion_model": diffusion_model, "text_encoder": text_encoder,
                 "text_encoder_2": text_encoder_2 or NONE, "vae": vae}
        problem = model_files_problem(files)
        if problem:
            raise ValueError(problem)
        return io.NodeOutput(files)


NODES = [DiTModelFiles]
