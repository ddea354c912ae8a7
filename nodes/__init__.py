"""ComfyUI adapters. The only package of the pack that imports ``comfy``, ``comfy_api`` or
``folder_paths``; everything it does is a call into ``rewards/``, ``trainer/`` or ``loop/``.

One node per module (named after the node); each module exports ``NODES``, the node classes it
defines. The list below is the registration order ComfyUI shows.
"""

from __future__ import annotations

import importlib

from comfy_api.latest import ComfyExtension, io

from .common import register_model_folders

NODE_MODULES = (
    # 1. generate
    "generate_candidates",
    # 2. score, 3. filter + dataset
    "load_scorers",
    "score_images",
    "filter_best_per_prompt",
    "save_training_set",
    # 4. train
    "dit_model_files",
    "train_aspect_lora",
    # 5. mix
    "train_gate",
    "gated_multi_lora_loader",
    # report
    "loop_report",
)


def all_nodes() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in NODE_MODULES:
        nodes.extend(importlib.import_module(f".{name}", __name__).NODES)
    return nodes


class VersaT2IExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.64 never calls on_load(), so folder registration happens here.
        register_model_folders()
        return all_nodes()
