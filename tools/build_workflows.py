"""Build the shipped workflows (workflows/*.json, UI format 0.4) and their thumbnails (*.jpg).

    .venv/bin/python tools/build_workflows.py              # rebuild the JSON files and thumbnails
    .venv/bin/python tools/build_workflows.py --thumbnails # only re-render thumbnails (after editing a
                                                           # workflow in ComfyUI and saving it over the file)

Why a script: a UI-format workflow is positional (``widgets_values`` in widget order, frontend-only
values such as a seed's "control after generate" in between, link slots by index), so writing one
by hand is error-prone. Here each node names its widget values, and the positions, input/output
lists and link slots come from the node definitions in tests/data/object_info.json (a snapshot of
real ComfyUI's /object_info, see tests/data/make_object_info.py), in the order frontend 1.27 uses:
socket inputs first, then one input per widget, both in ``input_order``.

tests/unit/test_workflows_schema.py validates the result without ComfyUI and tests/server/
test_workflows.py queues it in a real ComfyUI. The thumbnails are diagrams of the graph drawn by
tools/render_thumbnails.py (ComfyUI's template browser shows ``<name>.jpg`` for a custom-node
template ``<name>.json``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from versat2i.aspects import ASPECTS
from versat2i.rewards.registry import WEIGHT_INPUTS
from versat2i.rewards.weights import HUB_FILES

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
SNAPSHOT = REPO / "tests" / "data" / "object_info.json"
FRONTEND_VERSION = "1.27.10"  # the frontend ComfyUI 0.3.64 ships; the format is the same for 1.x
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CORE_CNR_ID, PACK_CNR_ID = "comfy-core", "comfyui-versat2i"
# A workflow's own facts in its ``extra`` (kept by the frontend): the oldest ComfyUI it loads in.
EXTRA_KEY = "versat2i"
# Z-Image (Turbo) support came with ComfyUI 0.3.74 (2025-11-26; ComfyUI commit 0e24dbb1 added its model
# detection and text encoder, 0.3.73 lacks them; 0.3.64 has no Z-Image model, text
# encoder or CLIPLoader type): the Z-Image workflows are built from, and checked against, the
# snapshot versions from there on (tests use 0.33.0).
ZIMAGE_MIN_COMFYUI = "0.3.74"

# Layout metrics of the litegraph canvas (LiteGraph.NODE_SLOT_HEIGHT, NODE_WIDGET_HEIGHT + margin).
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
TITLE_HEIGHT = 30
HOLLOW_CIRCLE, GRID_SHAPE = 7, 6  # litegraph RenderShape: optional inputs, list outputs
MODE_ALWAYS, MODE_NEVER = 0, 2

GROUP_COLORS = {"model": "#3f789e", "score": "#a1309b", "filter": "#b06634", "train": "#8A8", "mix": "#b58b2a",
                "try": "#88A"}
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"  # ComfyUI's default workflow names this one
# As ComfyUI's own default template declares it.
CHECKPOINT_MODEL = {"name": DEFAULT_CHECKPOINT, "directory": "checkpoints",
                    "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                           "v1-5-pruned-emaonly-fp16.safetensors?download=true"}
# Z-Image Turbo's split files, as ComfyUI's own Z-Image Turbo template (image_z_image_turbo.json in
# comfyui-workflow-templates) declares them: diffusion model, Qwen3-4B text encoder, FLUX.1's VAE.
ZIMAGE_URL = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/"
ZIMAGE_FILES = {"diffusion_model": ("z_image_turbo_bf16.safetensors", "diffusion_models"),
                "text_encoder": ("qwen_3_4b.safetensors", "text_encoders"),
                "vae": ("ae.safetensors", "vae")}
ZIMAGE_MODELS = {role: {"name": name, "directory": folder, "url": f"{ZIMAGE_URL}{folder}/{name}"}
                 for role, (name, folder) in ZIMAGE_FILES.items()}
# The scorer weight files Load Scorers' file inputs name (their published names, under models/versat2i).
SCORER_WEIGHTS = {option: spec.relative_path for option, spec in WEIGHT_INPUTS.items()}
SCORER_MODELS = [{"name": name, "directory": "versat2i", "url": HUB_FILES[name].url}
                 for name in SCORER_WEIGHTS.values()]


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def load_definitions(path: Path = SNAPSHOT, min_comfyui: str | None = None) -> dict[str, Any]:
    """The node definitions of the oldest snapshot version a workflow supports (its frontend's
    workflow format works in the newer ones; tests/unit/test_workflows_schema.py validates the result
    against every supported version at or above ``min_comfyui``)."""
    versions = json.loads(path.read_text())["versions"]
    usable = [v for v in versions if min_comfyui is None or version_key(v) >= version_key(min_comfyui)]
    if not usable:
        raise ValueError(f"tests/data/object_info.json has no ComfyUI version >= {min_comfyui} (it has "
                         f"{', '.join(versions)}): run tests/data/make_object_info.py against one")
    return versions[min(usable, key=version_key)]["nodes"]


def min_comfyui_of(workflow: Mapping[str, Any]) -> str | None:
    """The minimum ComfyUI version a built workflow records (None: every supported version)."""
    return workflow.get("extra", {}).get(EXTRA_KEY, {}).get("min_comfyui_version")


def widget_specs(spec: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(name, type, options, optional) of each widget input, in the frontend's order."""
    found = []
    for category in ("required", "optional"):
        for name in spec.get("input_order", {}).get(category, []):
            definition = spec["input"][category][name]
            io_type = definition[0]
            options = dict(definition[1]) if len(definition) > 1 else {}
            if isinstance(io_type, list):
                io_type, options = "COMBO", {**options, "options": io_type}
            if io_type in WIDGET_TYPES and not options.get("forceInput"):
                found.append((name, io_type, options, category == "optional"))
    return found


def socket_specs(spec: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of each input that is only a socket (no widget)."""
    widgets = {w[0] for w in widget_specs(spec)}
    return [(name, spec["input"][category][name][0], category == "optional")
            for category in ("required", "optional") for name in spec.get("input_order", {}).get(category, [])
            if name not in widgets]


def has_control_widget(name: str, io_type: str, options: Mapping[str, Any]) -> bool:
    # Same rule as the frontend (and tests/server/harness.py): seeds get one unless told otherwise.
    if io_type == "INT":
        flag = options.get("control_after_generate")
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return io_type == "COMBO" and bool(options.get("control_after_generate"))


def widget_height(io_type: str, options: Mapping[str, Any], multiline_height: int) -> int:
    return multiline_height if io_type == "STRING" and options.get("multiline") else WIDGET_HEIGHT


@dataclass
class Node:
    id: int
    type: str
    pos: list[float]
    size: list[float]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    widgets_values: list[Any] = field(default_factory=list)
    title: str | None = None
    mode: int = MODE_ALWAYS
    properties: dict[str, Any] = field(default_factory=dict)
    color: str | None = None
    bgcolor: str | None = None

    def input_slot(self, name: str) -> int:
        for index, entry in enumerate(self.inputs):
            if entry["name"] == name:
                return index
        raise KeyError(f"{self.type} has no input {name!r}: {[i['name'] for i in self.inputs]}")

    def output_slot(self, name: str | int) -> int:
        """By index, or by name (an output without a display name is named after its type, e.g. IMAGE)."""
        if isinstance(name, int):
            return name
        for index, entry in enumerate(self.outputs):
            if entry["name"] == name:
                return index
        raise KeyError(f"{self.type} has no output {name!r}: {[o['name'] for o in self.outputs]}")

    def bottom(self) -> float:
        return self.pos[1] + self.size[1]

    def right(self) -> float:
        return self.pos[0] + self.size[0]

    def to_json(self, order: int) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type, "pos": self.pos, "size": self.size, "flags": {},
                                "order": order, "mode": self.mode, "inputs": self.inputs, "outputs": self.outputs}
        if self.title is not None:
            data["title"] = self.title
        data["properties"] = self.properties
        data["widgets_values"] = self.widgets_values
        if self.color:
            data["color"], data["bgcolor"] = self.color, self.bgcolor
        return data


class Workflow:
    """A UI-format workflow under construction."""

    def __init__(self, name: str, definitions: Mapping[str, Any], *, min_comfyui: str | None = None):
        self.name = name
        self.definitions = definitions
        self.min_comfyui = min_comfyui
        self.nodes: list[Node] = []
        self.links: list[list[Any]] = []
        self.groups: list[dict[str, Any]] = []

    # -- nodes ------------------------------------------------------------------------------------
    def add(self, kind: str, pos: tuple[float, float], *, width: float = 360, values: Mapping[str, Any] | None = None,
            controls: Mapping[str, str] | None = None, title: str | None = None, multiline_height: int = 72,
            heights: Mapping[str, int] | None = None, min_height: float = 0, mode: int = MODE_ALWAYS) -> Node:
        """A node of ``kind`` with named widget values (unnamed ones take the definition's default)."""
        spec = self.definitions[kind]
        values = dict(values or {})
        heights = dict(heights or {})
        node = Node(id=len(self.nodes) + 1, type=kind, pos=[float(pos[0]), float(pos[1])], size=[float(width), 0.0],
                    title=title, mode=mode)
        for name, io_type, optional in socket_specs(spec):
            entry = {"localized_name": name, "name": name, "type": io_type, "link": None}
            if optional:
                entry["shape"] = HOLLOW_CIRCLE
            node.inputs.append(entry)
        body = 0
        for name, io_type, options, optional in widget_specs(spec):
            entry = {"localized_name": name, "name": name, "type": io_type, "widget": {"name": name}, "link": None}
            if optional:
                entry["shape"] = HOLLOW_CIRCLE
            node.inputs.append(entry)
            if name in values:
                value = values.pop(name)
            elif "default" in options:
                value = options["default"]
            elif io_type == "COMBO" and options.get("options"):
                value = options["options"][0]
            else:
                raise ValueError(f"{kind}.{name}: no value given and no default")
            node.widgets_values.append(value)
            if has_control_widget(name, io_type, options):
                node.widgets_values.append((controls or {}).get(name, "fixed"))
                body += WIDGET_HEIGHT
            body += heights.get(name, widget_height(io_type, options, multiline_height))
        if values:
            raise ValueError(f"{kind}: no widget named {sorted(values)}")
        for index, (out_type, out_name) in enumerate(zip(spec["output"], spec["output_name"])):
            entry = {"localized_name": out_name, "name": out_name, "type": out_type, "links": []}
            if spec.get("output_is_list", [False] * (index + 1))[index]:
                entry["shape"] = GRID_SHAPE
            node.outputs.append(entry)
        sockets = max(len([i for i in node.inputs if "widget" not in i]), len(node.outputs))
        node.size[1] = float(max(min_height, sockets * SLOT_HEIGHT + body + 12))
        cnr = PACK_CNR_ID if spec.get("category", "").startswith("VersaT2I") else CORE_CNR_ID
        node.properties = {"cnr_id": cnr, "Node name for S&R": kind}
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[float, float], size: tuple[float, float], markdown: str) -> Node:
        node = Node(id=len(self.nodes) + 1, type="MarkdownNote", pos=[float(pos[0]), float(pos[1])],
                    size=[float(size[0]), float(size[1])], widgets_values=[markdown.strip() + "\n"],
                    color=NOTE_COLOR, bgcolor=NOTE_BGCOLOR)
        self.nodes.append(node)
        return node

    def declare_models(self, node: Node, models: list[dict[str, str]]) -> None:
        """Declare the model files ``node`` needs as ComfyUI's own templates do (``properties.models``:
        name, url, directory). The frontend lists the missing ones in its missing-models dialog when
        the workflow is opened (frontend 1.27: a declared name that is one of the node's widget values;
        1.49: a combo widget whose value is a missing file gets the declared URL and folder)."""
        node.properties["models"] = [dict(model) for model in models]

    def primitive(self, pos: tuple[float, float], value: Any, *, title: str, width: float = 360) -> Node:
        """A frontend Primitive node: one value shared by several widget inputs (linked later)."""
        node = Node(id=len(self.nodes) + 1, type="PrimitiveNode", pos=[float(pos[0]), float(pos[1])],
                    size=[float(width), 82.0], title=title, properties={"Run widget replace on values": False})
        node.widgets_values = [value]
        self.nodes.append(node)
        return node

    # -- links --------------------------------------------------------------------------------------
    def link(self, origin: Node, output: str | int, target: Node, input_name: str) -> None:
        link_id = len(self.links) + 1
        target_slot = target.input_slot(input_name)
        target_input = target.inputs[target_slot]
        if target_input["link"] is not None:
            raise ValueError(f"{target.type}.{input_name} is already linked")
        if origin.type == "PrimitiveNode":
            widget = target_input.get("widget")
            if not widget:
                raise ValueError(f"a Primitive node can only feed a widget input, not {target.type}.{input_name}")
            io_type = target_input["type"]
            if not origin.outputs:
                origin.outputs.append({"name": io_type, "type": io_type, "widget": {"name": widget["name"]},
                                       "links": []})
                origin.widgets_values += ["fixed", ""] if io_type == "COMBO" else (
                    ["fixed"] if io_type in ("INT", "FLOAT") else [])
            elif origin.outputs[0]["type"] != io_type:
                raise ValueError(f"Primitive {origin.title!r} feeds {origin.outputs[0]['type']}, not {io_type}")
            origin_slot = 0
        else:
            origin_slot = origin.output_slot(output)
        link_type = origin.outputs[origin_slot]["type"]
        origin.outputs[origin_slot]["links"].append(link_id)
        target_input["link"] = link_id
        self.links.append([link_id, origin.id, origin_slot, target.id, target_slot, link_type])

    # -- groups ---------------------------------------------------------------------------------------
    def group(self, title: str, nodes: list[Node], color: str, *, padding: float = 20) -> dict[str, Any]:
        left = min(n.pos[0] for n in nodes) - padding
        top = min(n.pos[1] - TITLE_HEIGHT for n in nodes) - padding - 60  # room for the group's title
        right = max(n.right() for n in nodes) + padding
        bottom = max(n.bottom() for n in nodes) + padding
        group = {"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                 "color": color, "font_size": 24, "flags": {}}
        self.groups.append(group)
        return group

    # -- output ---------------------------------------------------------------------------------------
    def execution_order(self) -> dict[int, int]:
        """Topological order (what the frontend stores in ``order``); notes and primitives first."""
        incoming = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [n.id for n in self.nodes if n.id not in done and incoming[n.id] <= done]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            for node_id in ready:
                order[node_id] = len(order)
                done.add(node_id)
        return order

    def to_json(self) -> dict[str, Any]:
        order = self.execution_order()
        for node in self.nodes:
            for output in node.outputs:
                output.setdefault("links", [])
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/versat2i/ComfyUI-VersaT2I/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": [node.to_json(order[node.id]) for node in self.nodes],
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.55, "offset": [60, 90]}, "frontendVersion": FRONTEND_VERSION,
                      **({EXTRA_KEY: {"min_comfyui_version": self.min_comfyui}} if self.min_comfyui else {})},
            "version": 0.4,
        }


# ---------------------------------------------------------------------------------------------------
# The workflows

LOOP_PROMPTS = """a portrait of an old fisherman in a knitted sweater, natural light
a woman riding a bicycle through a rainy street
two children playing football on a beach at sunset
a chef cooking in a busy restaurant kitchen
a red fox sitting in a snowy forest
a bowl of fruit on a wooden table, still life
a lighthouse on a cliff above a stormy sea
a city street at night with neon signs"""

QUICK_PROMPTS = """a red fox sitting in a snowy forest
a bowl of fruit on a wooden table, still life
a lighthouse on a cliff above a stormy sea
a cosy reading corner with a green armchair"""

NEGATIVE = "blurry, low quality, watermark, text"
TRAINING = {"steps": 500, "learning_rate": 1e-4, "rank": 16, "alpha": 16.0, "batch_size": 1, "resolution": 512,
            "seed": 0}


def candidates_stage(wf: Workflow, *, x: float, y: float, prompts: str, k: int, checkpoint_title: str):
    """Checkpoint (one Primitive feeding every checkpoint input) -> Generate Candidates."""
    checkpoint_value = wf.primitive((x, y), DEFAULT_CHECKPOINT, title=checkpoint_title, width=400)
    loader = wf.add("CheckpointLoaderSimple", (x, y + 150), width=400, values={"ckpt_name": DEFAULT_CHECKPOINT})
    wf.link(checkpoint_value, "", loader, "ckpt_name")
    for node in (checkpoint_value, loader):
        wf.declare_models(node, [CHECKPOINT_MODEL])
    generate = wf.add("VersaT2I_GenerateCandidates", (x + 440, y), width=420, heights={"prompts": 170},
                      values={"prompts": prompts, "k": k, "seed": 0, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
                              "scheduler": "normal", "width": 512, "height": 512, "batch_size": 4,
                              "negative_prompt": NEGATIVE, "prompts_file": ""})
    for output, name in (("MODEL", "model"), ("CLIP", "clip"), ("VAE", "vae")):
        wf.link(loader, output, generate, name)
    return checkpoint_value, loader, generate


def score_filter_save(wf: Workflow, generate: Node, *, x: float, y: float, scorers: Mapping[str, str],
                      dataset: str, threshold_kind: str, threshold: float):
    load = wf.add("VersaT2I_LoadScorers", (x, y), width=360,
                  values={**scorers, "device": "auto", **SCORER_WEIGHTS, "download_missing": False})
    wf.declare_models(load, SCORER_MODELS)
    score = wf.add("VersaT2I_ScoreImages", (x, load.bottom() + 70), width=360, multiline_height=60,
                   values={"prompts": "", "seeds": "", "offload_after_scoring": True})
    wf.link(generate, "images", score, "images")
    wf.link(load, "scorers", score, "scorers")
    wf.link(generate, "candidates", score, "candidates")
    filt = wf.add("VersaT2I_FilterBestPerPrompt", (x + 400, y), width=380, multiline_height=60,
                  values={"threshold_kind": threshold_kind, "threshold": threshold, "aspect_thresholds": "",
                          "images_for": "all aspects"})
    wf.link(score, "scores", filt, "scores")
    wf.link(generate, "images", filt, "images")
    save = wf.add("VersaT2I_SaveTrainingSet", (x + 400, filt.bottom() + 70), width=380,
                  values={"name": dataset, "repeats": 10, "overwrite": False})
    wf.link(filt, "selection", save, "selection")
    wf.link(generate, "images", save, "images")
    kept = wf.add("PreviewImage", (x + 820, y), width=300, min_height=300, title="Kept images (best per prompt)")
    wf.link(filt, "kept", kept, "images")
    # One switch for every node that writes a result (Save Training Set, Train Aspect LoRA, Train Gate).
    overwrite = wf.primitive((x + 820, kept.bottom() + 70), False, title="Overwrite earlier results", width=300)
    overwrite.color, overwrite.bgcolor = "#322", "#533"
    wf.link(overwrite, "", save, "overwrite")
    return load, score, filt, save, kept, overwrite


def self_improvement_loop(definitions) -> Workflow:
    wf = Workflow("versat2i_self_improvement_loop", definitions)
    intro = wf.note((0, -40), (400, 560), """
# VersaT2I self-improvement loop

Makes **your checkpoint** better at four things at once, with no human labels:

1. **Generate** K candidates for every prompt (one per line; use `prompts_file` for hundreds).
2. **Score** each image per aspect with a reward model (aesthetics, text alignment, anatomy, low-level quality).
3. **Keep the best image of each prompt** per aspect, if it clears the threshold, and save a kohya-style training set.
4. **Train one LoRA per aspect** (separate process; Cancel keeps the last checkpoint, queue again to resume).
5. **Train the gate** that mixes the four LoRAs layer by layer.

Pick your checkpoint once in the purple **Checkpoint** box: it feeds every stage.

Reward weights go in `models/versat2i/`: ComfyUI lists missing ones when this workflow opens (or turn
on `download_missing` in **Load Scorers**). An aspect that keeps no image is skipped; the gate mixes the rest.

Queueing again reuses every finished stage. To replace results made from other inputs, turn on the red
**Overwrite earlier results** switch.

Results: `output/versat2i/loop/` (training set), `models/loras/versat2i/loop_*.safetensors` and
`loop.mol.safetensors`. Open the **Gated inference** workflow to use them.
""")
    checkpoint, loader, generate = candidates_stage(wf, x=0, y=560, prompts=LOOP_PROMPTS, k=4,
                                                    checkpoint_title="Checkpoint (used by every stage)")
    checkpoint.color, checkpoint.bgcolor = "#323", "#535"
    load, score, filt, save, kept, overwrite = score_filter_save(
        wf, generate, x=940, y=40, dataset="versat2i/loop", threshold_kind="percentile", threshold=50.0,
        scorers={"aesthetics": "laion-aesthetic-v2", "alignment": "clip-score", "geometry": "mediapipe-anatomy",
                 "lowlevel": "clip-iqa"})
    wf.group("1. Candidates: prompts x seeds", [intro, checkpoint, loader, generate], GROUP_COLORS["model"])
    wf.group("2. Score each aspect", [load, score], GROUP_COLORS["score"])
    wf.group("3. Keep the best per prompt", [filt, save, kept, overwrite], GROUP_COLORS["filter"])

    top = max(generate.bottom(), score.bottom(), save.bottom(), overwrite.bottom()) + 140
    train_nodes, previews = [], []
    for index, aspect in enumerate(ASPECTS):
        node = wf.add("VersaT2I_TrainAspectLoRA", (index * 400, top), width=370, title=f"Train LoRA: {aspect}",
                      values={"dataset": "versat2i/loop", "aspect": aspect, "ckpt_name": DEFAULT_CHECKPOINT,
                              "lora_name": "", **TRAINING})
        wf.link(save, "dataset_path", node, "dataset")
        wf.link(checkpoint, "", node, "ckpt_name")
        wf.link(overwrite, "", node, "overwrite")
        preview = wf.add("PreviewImage", (index * 400, node.bottom() + 60), width=370, min_height=260,
                         title=f"Loss: {aspect}")
        wf.link(node, "loss_curve", preview, "images")
        train_nodes.append(node)
        previews.append(preview)
    wf.group("4. One LoRA per aspect", train_nodes + previews, GROUP_COLORS["train"])

    x = len(ASPECTS) * 400 + 40
    gate = wf.add("VersaT2I_TrainGate", (x, top), width=380, multiline_height=60,
                  values={"dataset": "versat2i/loop", "ckpt_name": DEFAULT_CHECKPOINT, "loras": "", "mol_name": "loop",
                          "granularity": "layer", "balance_loss": "mole", "balance_weight": 0.01, "steps": 200,
                          "learning_rate": 1e-2, "batch_size": 1, "resolution": 512, "seed": 0})
    wf.link(save, "dataset_path", gate, "dataset")
    wf.link(checkpoint, "", gate, "ckpt_name")
    wf.link(overwrite, "", gate, "overwrite")
    for index, node in enumerate(train_nodes, start=1):  # the gate's experts, in aspect order
        wf.link(node, "lora_name", gate, f"lora_{index}")
    gate_loss = wf.add("PreviewImage", (x, gate.bottom() + 60), width=380, min_height=260, title="Loss: gate")
    wf.link(gate, "loss_curve", gate_loss, "images")
    mix_note = wf.note((x + 420, top), (300, 300), """
**Mixing.** The gate learns, layer by layer, how much of each aspect LoRA to apply, with a
balancing loss so no aspect is starved. The base model and the LoRAs stay frozen.

The four LoRAs come in through `lora_1`..`lora_4`; list more (or type names) in `loras`.

Result: `models/loras/versat2i/loop.mol.safetensors`, for the **Gated Multi-LoRA Loader**.
""")
    wf.group("5. Learn the mixing gate", [gate, gate_loss, mix_note], GROUP_COLORS["mix"])
    return wf


def gated_inference(definitions) -> Workflow:
    wf = Workflow("versat2i_gated_inference", definitions)
    intro = wf.note((0, 0), (380, 430), """
# Gated inference

Applies the four aspect LoRAs of a loop run **at once**, mixed layer by layer by the learned gate
(`*.mol.safetensors`, written by *Train Gate* next to the LoRAs).

**mode**
- `bake`: evaluate the gate once and merge it: sampling costs the same as the base model.
- `dynamic`: the gate per token at every step (MoLE); a little slower.
- `equal`: every LoRA at 1/N, the naive merge (to compare).
- `manual`: your weights (`aspect = weight` lines in `loras`).

`disabled_aspects` switches aspects off (e.g. `geometry`); the gate renormalises over the rest.
""")
    loader = wf.add("CheckpointLoaderSimple", (0, 500), width=380, values={"ckpt_name": DEFAULT_CHECKPOINT})
    wf.declare_models(loader, [CHECKPOINT_MODEL])
    mixture = wf.add("VersaT2I_GatedMultiLoRALoader", (420, 40), width=400, multiline_height=60,
                     values={"mol_file": "versat2i/loop.mol.safetensors", "mode": "bake", "strength": 1.0,
                             "disabled_aspects": "", "loras": "", "prompt": ""})
    wf.link(loader, "MODEL", mixture, "model")
    wf.link(loader, "CLIP", mixture, "clip")
    wf.group("1. Base model + gated LoRA mix", [intro, loader, mixture], GROUP_COLORS["mix"])
    positive = wf.add("CLIPTextEncode", (880, 40), width=400, multiline_height=120, title="Prompt",
                      values={"text": "a portrait of an old fisherman in a knitted sweater, natural light"})
    negative = wf.add("CLIPTextEncode", (880, positive.bottom() + 60), width=400, multiline_height=90,
                      title="Negative prompt", values={"text": NEGATIVE})
    wf.link(mixture, "CLIP", positive, "clip")
    wf.link(mixture, "CLIP", negative, "clip")
    latent = wf.add("EmptyLatentImage", (880, negative.bottom() + 60), width=400,
                    values={"width": 512, "height": 512, "batch_size": 1})
    sampler = wf.add("KSampler", (1340, 40), width=340,
                     values={"seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                             "denoise": 1.0}, controls={"seed": "fixed"})
    wf.link(mixture, "MODEL", sampler, "model")
    wf.link(positive, "CONDITIONING", sampler, "positive")
    wf.link(negative, "CONDITIONING", sampler, "negative")
    wf.link(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (1340, sampler.bottom() + 60), width=340)
    wf.link(sampler, "LATENT", decode, "samples")
    wf.link(loader, "VAE", decode, "vae")
    save = wf.add("SaveImage", (1720, 40), width=420, min_height=440, values={"filename_prefix": "versat2i/gated"})
    wf.link(decode, "IMAGE", save, "images")
    wf.group("2. Encode, sample, save", [positive, negative, latent, sampler, decode, save],
             GROUP_COLORS["model"])
    return wf


def zimage_loaders(wf: Workflow, *, x: float, y: float, width: float = 380):
    """Z-Image Turbo's split loaders as ComfyUI's own template wires them: Load Diffusion Model ->
    ModelSamplingAuraFlow (shift 3), Load CLIP (Qwen3-4B, type lumina2), Load VAE. Each loader
    declares its file (name, folder, download URL)."""
    unet = wf.add("UNETLoader", (x, y), width=width,
                  values={"unet_name": ZIMAGE_FILES["diffusion_model"][0], "weight_dtype": "default"})
    sampling = wf.add("ModelSamplingAuraFlow", (x + width + 40, y), width=width, values={"shift": 3.0})
    wf.link(unet, "MODEL", sampling, "model")
    clip = wf.add("CLIPLoader", (x, unet.bottom() + 60), width=width,
                  values={"clip_name": ZIMAGE_FILES["text_encoder"][0], "type": "lumina2", "device": "default"})
    vae = wf.add("VAELoader", (x, clip.bottom() + 60), width=width, values={"vae_name": ZIMAGE_FILES["vae"][0]})
    for node, role in ((unet, "diffusion_model"), (clip, "text_encoder"), (vae, "vae")):
        wf.declare_models(node, [ZIMAGE_MODELS[role]])
    return unet, sampling, clip, vae


ZIMAGE_REQUIREMENT = ("Needs **ComfyUI 0.3.74 or newer** (the release that added Z-Image; tested on 0.33). "
                      "Older versions show its loaders' options as missing.")
ZIMAGE_SAMPLING = {"steps": 8, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple", "denoise": 1.0}


def zimage_sample_stage(wf: Workflow, *, x: float, y: float, model: Node, model_output: str, clip: Node,
                        clip_output: str, vae: Node, prompt: str, prefix: str, mode: int = MODE_ALWAYS):
    """Prompt -> ConditioningZeroOut as the negative (cfg 1), EmptySD3LatentImage, KSampler with
    Z-Image Turbo's few steps, VAE Decode, Save Image: the sampling half of ComfyUI's template."""
    positive = wf.add("CLIPTextEncode", (x, y), width=400, multiline_height=120, title="Prompt", mode=mode,
                      values={"text": prompt})
    wf.link(clip, clip_output, positive, "clip")
    negative = wf.add("ConditioningZeroOut", (x, positive.bottom() + 60), width=400, title="Negative (zeroed)",
                      mode=mode)
    wf.link(positive, "CONDITIONING", negative, "conditioning")
    latent = wf.add("EmptySD3LatentImage", (x, negative.bottom() + 60), width=400, mode=mode,
                    values={"width": 1024, "height": 1024, "batch_size": 1})
    sampler = wf.add("KSampler", (x + 440, y), width=340, mode=mode, values={"seed": 42, **ZIMAGE_SAMPLING},
                     controls={"seed": "fixed"})
    wf.link(model, model_output, sampler, "model")
    wf.link(positive, "CONDITIONING", sampler, "positive")
    wf.link(negative, "CONDITIONING", sampler, "negative")
    wf.link(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (x + 440, sampler.bottom() + 60), width=340, mode=mode)
    wf.link(sampler, "LATENT", decode, "samples")
    wf.link(vae, "VAE", decode, "vae")
    save = wf.add("SaveImage", (x + 820, y), width=420, min_height=440, mode=mode, values={"filename_prefix": prefix})
    wf.link(decode, "IMAGE", save, "images")
    return [positive, negative, latent, sampler, decode, save]


def zimage_gated_inference(definitions) -> Workflow:
    wf = Workflow("versat2i_zimage_gated_inference", definitions, min_comfyui=ZIMAGE_MIN_COMFYUI)
    intro = wf.note((0, 0), (380, 560), f"""
# Gated inference: Z-Image Turbo

Z-Image Turbo with its aspect LoRAs applied **at once**, mixed layer by layer by the learned gate
(`*.mol.safetensors`, written by *Train Gate* next to the LoRAs, trained on these Z-Image files).

{ZIMAGE_REQUIREMENT}

The loaders are those of ComfyUI's own Z-Image Turbo template (missing files are listed when the
workflow opens, with their download links): diffusion model, Qwen3-4B text encoder (type
`lumina2`), VAE. Turbo samples in 8 steps at cfg 1 (the negative is zeroed).

**mode**
- `bake`: evaluate the gate once and merge it: sampling costs the same as the base model.
- `dynamic`: the gate per token at every step (MoLE); a little slower.
- `equal`: every LoRA at 1/N, the naive merge (to compare).
- `manual`: your weights (`aspect = weight` lines in `loras`).

`disabled_aspects` switches aspects off (e.g. `geometry`); the gate renormalises over the rest.
""")
    unet, sampling, clip, vae = zimage_loaders(wf, x=0, y=640)
    mixture = wf.add("VersaT2I_GatedMultiLoRALoader", (420, 40), width=380, multiline_height=60,
                     values={"mol_file": "versat2i/zimage_loop.mol.safetensors", "mode": "bake", "strength": 1.0,
                             "disabled_aspects": "", "loras": "", "prompt": ""})
    wf.link(sampling, "MODEL", mixture, "model")
    wf.link(clip, "CLIP", mixture, "clip")
    wf.group("1. Z-Image Turbo files + gated LoRA mix", [intro, unet, sampling, clip, vae, mixture],
             GROUP_COLORS["mix"])
    stage = zimage_sample_stage(wf, x=880, y=40, model=mixture, model_output="MODEL", clip=mixture,
                                clip_output="CLIP", vae=vae, prompt="a portrait of an old fisherman in a knitted "
                                "sweater, natural light", prefix="versat2i/zimage_gated")
    wf.group("2. Encode, sample, save", stage, GROUP_COLORS["model"])
    return wf


def quick_loop(definitions) -> Workflow:
    wf = Workflow("versat2i_quick_loop_one_aspect", definitions)
    intro = wf.note((0, -40), (400, 470), """
# Quick loop: one aspect

The VersaT2I loop for a single aspect (aesthetics), small enough to try in a few minutes on a GPU:
generate 4 prompts x 4 seeds, score them, keep the best image of each prompt, train one LoRA.

Change the aspect in **Load Scorers** (enable exactly one) and **Train LoRA** (`aspect`).

When the LoRA is trained, **unmute group 4** (select its nodes, Ctrl+M) and queue again: the stock
*Load LoRA* node applies it (`versat2i/quick_aesthetics.safetensors`). Finished stages are not
run again; to replace results made from other inputs, turn on **Overwrite earlier results**.

Missing weight files are listed when the workflow opens (or turn on `download_missing` in **Load Scorers**).
""")
    checkpoint, loader, generate = candidates_stage(wf, x=0, y=500, prompts=QUICK_PROMPTS, k=4,
                                                    checkpoint_title="Checkpoint")
    checkpoint.color, checkpoint.bgcolor = "#323", "#535"
    load, score, filt, save, kept, overwrite = score_filter_save(
        wf, generate, x=940, y=40, dataset="versat2i/quick", threshold_kind="none", threshold=50.0,
        scorers={"aesthetics": "laion-aesthetic-v2", "alignment": "disabled", "geometry": "disabled",
                 "lowlevel": "disabled"})
    wf.group("1. Candidates: 4 prompts x 4 seeds", [intro, checkpoint, loader, generate], GROUP_COLORS["model"])
    wf.group("2. Score, keep the best, save", [load, score, filt, save, kept, overwrite], GROUP_COLORS["filter"])

    top = max(generate.bottom(), score.bottom(), save.bottom(), overwrite.bottom()) + 140
    train = wf.add("VersaT2I_TrainAspectLoRA", (0, top), width=400, title="Train LoRA: aesthetics",
                   values={"dataset": "versat2i/quick", "aspect": "aesthetics", "ckpt_name": DEFAULT_CHECKPOINT,
                           "lora_name": "", **TRAINING, "steps": 300})
    wf.link(save, "dataset_path", train, "dataset")
    wf.link(checkpoint, "", train, "ckpt_name")
    wf.link(overwrite, "", train, "overwrite")
    loss = wf.add("PreviewImage", (440, top), width=380, min_height=300, title="Loss: aesthetics")
    wf.link(train, "loss_curve", loss, "images")
    wf.group("3. Train the LoRA", [train, loss], GROUP_COLORS["train"])

    x = 900
    lora = wf.add("LoraLoader", (x, top), width=380, mode=MODE_NEVER,
                  values={"lora_name": "versat2i/quick_aesthetics.safetensors", "strength_model": 1.0,
                          "strength_clip": 1.0})
    wf.link(loader, "MODEL", lora, "model")
    wf.link(loader, "CLIP", lora, "clip")
    positive = wf.add("CLIPTextEncode", (x, lora.bottom() + 60), width=380, multiline_height=90, title="Prompt",
                      mode=MODE_NEVER, values={"text": "a lighthouse on a cliff above a stormy sea"})
    negative = wf.add("CLIPTextEncode", (x, positive.bottom() + 60), width=380, multiline_height=60,
                      title="Negative prompt", mode=MODE_NEVER, values={"text": NEGATIVE})
    wf.link(lora, "CLIP", positive, "clip")
    wf.link(lora, "CLIP", negative, "clip")
    latent = wf.add("EmptyLatentImage", (x, negative.bottom() + 60), width=380, mode=MODE_NEVER,
                    values={"width": 512, "height": 512, "batch_size": 1})
    sampler = wf.add("KSampler", (x + 420, top), width=340, mode=MODE_NEVER,
                     values={"seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                             "denoise": 1.0}, controls={"seed": "fixed"})
    wf.link(lora, "MODEL", sampler, "model")
    wf.link(positive, "CONDITIONING", sampler, "positive")
    wf.link(negative, "CONDITIONING", sampler, "negative")
    wf.link(latent, "LATENT", sampler, "latent_image")
    decode = wf.add("VAEDecode", (x + 420, sampler.bottom() + 60), width=340, mode=MODE_NEVER)
    wf.link(sampler, "LATENT", decode, "samples")
    wf.link(loader, "VAE", decode, "vae")
    image = wf.add("SaveImage", (x + 420, decode.bottom() + 60), width=340, min_height=330, mode=MODE_NEVER,
                   values={"filename_prefix": "versat2i/quick_lora"})
    wf.link(decode, "IMAGE", image, "images")
    wf.group("4. Try it (muted until trained)", [lora, positive, negative, latent, sampler, decode,
                                                                 image], GROUP_COLORS["try"])
    return wf


def zimage_quick_loop(definitions) -> Workflow:
    wf = Workflow("versat2i_zimage_quick_loop_one_aspect", definitions, min_comfyui=ZIMAGE_MIN_COMFYUI)
    intro = wf.note((0, -40), (400, 600), f"""
# Quick loop on Z-Image Turbo: one aspect

The VersaT2I loop for a single aspect (aesthetics) on **Z-Image Turbo**: generate 4 prompts x 4 seeds,
score them, keep the best image of each prompt, train one LoRA on the same Z-Image files.

{ZIMAGE_REQUIREMENT}

Pick the three files once in the purple boxes (**Diffusion model**, **Text encoder**, **VAE**): they
feed ComfyUI's loaders (as in its Z-Image Turbo template) and **DiT Model Files**, so the LoRA is
trained on the model that made the images. Missing files are listed when the workflow opens, with
their download links (so are the reward weights, or turn on `download_missing` in **Load Scorers**).

When the LoRA is trained, **unmute group 4** (select its nodes, Ctrl+M) and queue again: the stock
*LoraLoaderModelOnly* applies it (`versat2i/zimage_quick_aesthetics.safetensors`). Finished stages
are not run again; to replace results made from other inputs, turn on **Overwrite earlier results**.
""")
    files = {}
    y = 620
    for role, title in (("diffusion_model", "Diffusion model"), ("text_encoder", "Text encoder"), ("vae", "VAE")):
        files[role] = wf.primitive((0, y), ZIMAGE_FILES[role][0], title=f"{title} (used by every stage)", width=400)
        files[role].color, files[role].bgcolor = "#323", "#535"
        wf.declare_models(files[role], [ZIMAGE_MODELS[role]])
        y = files[role].bottom() + 70
    unet, sampling, clip, vae = zimage_loaders(wf, x=440, y=620)
    for role, loader, widget in (("diffusion_model", unet, "unet_name"), ("text_encoder", clip, "clip_name"),
                                 ("vae", vae, "vae_name")):
        wf.link(files[role], "", loader, widget)
    generate = wf.add("VersaT2I_GenerateCandidates", (860, -40), width=420, heights={"prompts": 170},
                      values={"prompts": QUICK_PROMPTS, "k": 4, "seed": 0, "width": 1024, "height": 1024,
                              "batch_size": 4, "negative_prompt": "", "prompts_file": "",
                              **{k: v for k, v in ZIMAGE_SAMPLING.items() if k != "denoise"}})
    wf.link(sampling, "MODEL", generate, "model")
    wf.link(clip, "CLIP", generate, "clip")
    wf.link(vae, "VAE", generate, "vae")
    load, score, filt, save, kept, overwrite = score_filter_save(
        wf, generate, x=1340, y=40, dataset="versat2i/zimage_quick", threshold_kind="none", threshold=50.0,
        scorers={"aesthetics": "laion-aesthetic-v2", "alignment": "disabled", "geometry": "disabled",
                 "lowlevel": "disabled"})
    wf.group("1. Z-Image files -> 4 prompts x 4 seeds",
             [intro, *files.values(), unet, sampling, clip, vae, generate], GROUP_COLORS["model"])
    wf.group("2. Score, keep the best, save", [load, score, filt, save, kept, overwrite], GROUP_COLORS["filter"])

    top = max(vae.bottom(), files["vae"].bottom(), score.bottom(), save.bottom(), overwrite.bottom()) + 140
    model_files = wf.add("VersaT2I_DiTModelFiles", (0, top), width=400,
                         values={role: ZIMAGE_FILES[role][0] for role in ("diffusion_model", "text_encoder", "vae")}
                         | {"text_encoder_2": "none"})
    for role in ("diffusion_model", "text_encoder", "vae"):
        wf.link(files[role], "", model_files, role)
    train = wf.add("VersaT2I_TrainAspectLoRA", (440, top), width=400, title="Train LoRA: aesthetics",
                   values={"dataset": "versat2i/zimage_quick", "aspect": "aesthetics", "ckpt_name": "none",
                           "lora_name": "", **TRAINING, "steps": 300, "resolution": 1024, "memory_saving": "auto"})
    wf.link(save, "dataset_path", train, "dataset")
    wf.link(model_files, "model_files", train, "model_files")
    wf.link(overwrite, "", train, "overwrite")
    loss = wf.add("PreviewImage", (880, top), width=380, min_height=300, title="Loss: aesthetics")
    wf.link(train, "loss_curve", loss, "images")
    wf.group("3. Train the LoRA on the Z-Image files", [model_files, train, loss], GROUP_COLORS["train"])

    x = 1340
    lora = wf.add("LoraLoaderModelOnly", (x, top), width=400, mode=MODE_NEVER,
                  values={"lora_name": "versat2i/zimage_quick_aesthetics.safetensors", "strength_model": 1.0})
    wf.link(sampling, "MODEL", lora, "model")
    stage = zimage_sample_stage(wf, x=x, y=lora.bottom() + 70, model=lora, model_output="MODEL", clip=clip,
                                clip_output="CLIP", vae=vae, prompt="a lighthouse on a cliff above a stormy sea",
                                prefix="versat2i/zimage_quick_lora", mode=MODE_NEVER)
    wf.group("4. Try it (muted until trained)", [lora, *stage], GROUP_COLORS["try"])
    return wf


# (builder, the oldest ComfyUI the workflow needs; None: every supported version)
BUILDERS = ((self_improvement_loop, None), (gated_inference, None), (quick_loop, None),
            (zimage_gated_inference, ZIMAGE_MIN_COMFYUI), (zimage_quick_loop, ZIMAGE_MIN_COMFYUI))


def write_json(path: Path, workflow: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thumbnails", action="store_true", help="only re-render the thumbnails of workflows/*.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render_thumbnails import write_thumbnail

    if not args.thumbnails:
        for build, min_comfyui in BUILDERS:
            workflow = build(load_definitions(min_comfyui=min_comfyui))
            assert workflow.min_comfyui == min_comfyui, workflow.name
            write_json(WORKFLOWS / f"{workflow.name}.json", workflow.to_json())
    for path in sorted(WORKFLOWS.glob("*.json")):
        definitions = load_definitions(min_comfyui=min_comfyui_of(json.loads(path.read_text(encoding="utf-8"))))
        thumbnail = write_thumbnail(path, definitions)
        print(f"{path.relative_to(REPO)} -> {thumbnail.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
