"""Constants shared by the nodes: ids, categories, custom types, model folders.

Node ids are public API: saved workflows refer to them. Never rename one after release.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

NODE_ID_PREFIX = "VersaT2I_"
CATEGORY = "VersaT2I"


def node_id(name: str) -> str:
    return NODE_ID_PREFIX + name


def category(*sub: str) -> str:
    return "/".join((CATEGORY, *sub))


# Custom socket types passed between our nodes.
Scorers = io.Custom("VERSAT2I_SCORERS")  # loaded reward models, one per aspect
Scores = io.Custom("VERSAT2I_SCORES")  # per-image scores for every aspect + prompts/seeds + scorer ids
Selection = io.Custom("VERSAT2I_SELECTION")  # best-per-prompt picks per aspect

# models/versat2i/... holds reward-model weights (and extra_model_paths.yaml may add more roots).
MODEL_FOLDER = "versat2i"
SUPPORTED_WEIGHT_EXTENSIONS = {".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".mat", ".json", ".tflite"}


def register_model_folders() -> None:
    """Register ``models/versat2i`` with ComfyUI. Idempotent; keeps any folders that
    extra_model_paths.yaml already registered under the same name (they are searched too)."""
    folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    extensions.update(SUPPORTED_WEIGHT_EXTENSIONS)


def model_search_dirs() -> list[str]:
    register_model_folders()
    return list(folder_paths.get_folder_paths(MODEL_FOLDER))
