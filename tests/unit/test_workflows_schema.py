"""The shipped workflows (workflows/*.json), checked without ComfyUI against the node definitions.

The definitions are tests/data/object_info.json, a snapshot of a real ComfyUI's /object_info (our
nodes and the core nodes the workflows use), made by tests/data/make_object_info.py; with
COMFYUI_PATH set, tests/server/test_workflows.py compares it with the live server and queues every
workflow there. Here: each workflow passes ``harness.validate_workflow`` (link types, widget counts
including the frontend's control values, required inputs, combo choices, node ids), converts to an
API prompt, wires the loop's stages the way the docs say, is laid out in groups without overlaps,
and has an up-to-date thumbnail. The validator itself is shown to catch each kind of mistake.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from pathlib import Path

import pytest
from harness import (
    SUPPORTED_COMFYUI_VERSIONS,
    WorkflowError,
    _widget_inputs,
    has_control_widget,
    load_snapshot,
    min_comfyui_version,
    node_code_sha256,
    snapshot_version,
    supports,
    validate_workflow,
    version_key,
    workflow_to_api,
)
from PIL import Image

from versat2i.aspects import ASPECTS

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent

WORKFLOWS = REPO / "workflows"
SNAPSHOT = load_snapshot()
# The oldest supported version's definitions (the frontend the workflows are written for); every
# version's are checked by test_workflow_matches_the_node_definitions_of_every_supported_version.
DEFINITIONS, DYNAMIC = snapshot_version(SNAPSHOT)["nodes"], snapshot_version(SNAPSHOT)["dynamic_combos"]
LOOP, INFERENCE, QUICK = "versat2i_self_improvement_loop", "versat2i_gated_inference", "versat2i_quick_loop_one_aspect"
ZIMAGE_INFERENCE, ZIMAGE_QUICK = "versat2i_zimage_gated_inference", "versat2i_zimage_quick_loop_one_aspect"
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
TITLE_HEIGHT = 30  # litegraph draws a node's title bar above its pos


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def supported_versions(workflow: dict) -> list[str]:
    """The snapshot's supported versions a workflow loads in (oldest first)."""
    return [v for v in SUPPORTED_COMFYUI_VERSIONS if supports(workflow, v)]


def entry_for(workflow: dict) -> dict:
    """The snapshot entry of the oldest version the workflow supports (what it is built from)."""
    versions = supported_versions(workflow)
    assert versions, f"no supported ComfyUI version is >= {min_comfyui_version(workflow)}"
    return snapshot_version(SNAPSHOT, versions[0])


def definitions_for(workflow: dict) -> dict:
    return entry_for(workflow)["nodes"]


def validate(workflow: dict) -> list[str]:
    entry = entry_for(workflow)
    return validate_workflow(workflow, entry["nodes"], dynamic_combos=entry["dynamic_combos"])


def api(name_or_workflow) -> dict:
    workflow = load(name_or_workflow) if isinstance(name_or_workflow, str) else name_or_workflow
    return workflow_to_api(workflow, definitions_for(workflow), strict=True)


def of_type(graph: dict, class_type: str) -> dict[str, dict]:
    return {node_id: node for node_id, node in graph.items() if node["class_type"] == class_type}


def source(graph: dict, value) -> dict:
    """The API node a link value ``[node id, slot]`` points at."""
    assert isinstance(value, list), f"expected a link, got the value {value!r}"
    return graph[value[0]]


SHIPPED = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.mark.parametrize("version", SUPPORTED_COMFYUI_VERSIONS)
def test_the_snapshot_was_made_from_the_current_node_code(version):
    """The definitions below are only as current as the snapshot: a change to the code of nodes/*.py
    after it was made (a new input, a renamed output) would let stale workflows pass here. Every
    supported ComfyUI version has its entry. Comments, docstrings, tooltips and descriptions are not
    part of the key (tests/unit/test_snapshot_key.py)."""
    assert snapshot_version(SNAPSHOT, version).get("node_code_sha256") == node_code_sha256(REPO), (
        f"ComfyUI {version}'s entry of tests/data/object_info.json is older than the code in nodes/*.py: regenerate "
        f"it with "
        f"`COMFYUI_PATH=/path/to/ComfyUI-{version} .venv/bin/python tests/data/make_object_info.py` "
        "(and the workflows with tools/build_workflows.py if a definition changed)")


@pytest.mark.parametrize("version", SUPPORTED_COMFYUI_VERSIONS)
@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_workflow_matches_the_node_definitions_of_every_supported_version(name, version):
    """Core nodes change between ComfyUI versions (0.33's PreviewImage declares an output); a shipped
    workflow must load in each supported version at or above the minimum it records (a DiT workflow
    needs a ComfyUI that has the model: skipped, with the reason, on older ones)."""
    workflow = load(name)
    if version not in supported_versions(workflow):
        pytest.skip(f"{name} needs ComfyUI >= {min_comfyui_version(workflow)}; this snapshot entry is {version}")
    entry = snapshot_version(SNAPSHOT, version)
    assert validate_workflow(workflow, entry["nodes"], dynamic_combos=entry["dynamic_combos"]) == []


def test_the_workflows_are_shipped_in_ui_format():
    assert SHIPPED == sorted([LOOP, INFERENCE, QUICK, ZIMAGE_INFERENCE, ZIMAGE_QUICK])
    for name in SHIPPED:
        workflow = load(name)
        assert workflow["version"] == 0.4 and isinstance(workflow["links"], list) and workflow["groups"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_vector2(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_has_the_fields_the_frontend_schema_requires(name):
    """The fields and types ComfyUI frontend 1.27 checks before loading a 0.4 workflow (zod schema
    ``zComfyWorkflow`` in src/platform/workflow/validation/schemas/workflowSchema.ts)."""
    workflow = load(name)
    uuid.UUID(workflow["id"])
    assert isinstance(workflow["last_node_id"], int) and isinstance(workflow["last_link_id"], int)
    assert _is_number(workflow["version"]) and isinstance(workflow["nodes"], list)
    for link in workflow["links"]:
        assert len(link) == 6 and all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)
    for group in workflow["groups"]:
        assert isinstance(group["title"], str) and len(group["bounding"]) == 4
        assert all(_is_number(v) for v in group["bounding"])
    assert _is_number(workflow["extra"]["ds"]["scale"]) and _is_vector2(workflow["extra"]["ds"]["offset"])
    repo_like = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")
    for node in workflow["nodes"]:
        assert isinstance(node["id"], int) and isinstance(node["type"], str)
        assert _is_vector2(node["pos"]) and _is_vector2(node["size"])
        assert isinstance(node["flags"], dict) and _is_number(node["order"]) and _is_number(node["mode"])
        assert isinstance(node["properties"], dict)
        if "cnr_id" in node["properties"]:
            assert repo_like.match(node["properties"]["cnr_id"])
        for entry in node.get("inputs", []):
            assert isinstance(entry["name"], str) and isinstance(entry["type"], str)
            assert entry.get("link") is None or isinstance(entry["link"], int)
        for entry in node.get("outputs", []):
            assert isinstance(entry["name"], str) and isinstance(entry["type"], str)
            assert entry.get("links") is None or all(isinstance(i, int) for i in entry["links"])
        assert isinstance(node.get("widgets_values", []), list)


def test_the_sd_workflows_support_every_version_and_the_zimage_ones_need_a_comfyui_with_zimage():
    """The SD workflows record no minimum (every supported version); the Z-Image ones the release
    that added Z-Image, so ComfyUI 0.3.64 (no Z-Image) is left out, with the reason, and 0.33 is
    what they are built from and checked against. Their notes say so."""
    for name in (LOOP, INFERENCE, QUICK):
        workflow = load(name)
        assert min_comfyui_version(workflow) is None
        assert supported_versions(workflow) == list(SUPPORTED_COMFYUI_VERSIONS)
    for name in (ZIMAGE_INFERENCE, ZIMAGE_QUICK):
        workflow = load(name)
        needed = min_comfyui_version(workflow)
        assert version_key("0.3.64") < version_key(needed) <= version_key("0.33.0")
        assert supported_versions(workflow) == ["0.33.0"]
        (intro,) = [n["widgets_values"][0] for n in workflow["nodes"]
                    if n["type"] == "MarkdownNote" and n["widgets_values"][0].startswith("# ")]
        assert f"ComfyUI {needed} or newer" in intro
    docs = (REPO / "docs" / "workflows.md").read_text(encoding="utf-8")
    assert ZIMAGE_INFERENCE in docs and ZIMAGE_QUICK in docs
    assert f"ComfyUI {min_comfyui_version(load(ZIMAGE_INFERENCE))} or newer" in docs


def test_the_snapshot_covers_every_node_type_used():
    for version in SUPPORTED_COMFYUI_VERSIONS:
        definitions = snapshot_version(SNAPSHOT, version)["nodes"]
        used = {node["type"] for name in SHIPPED if version in supported_versions(load(name))
                for node in load(name)["nodes"]} - FRONTEND_ONLY
        assert used <= set(definitions), (version, sorted(used - set(definitions)))
    ours = {k for k in DEFINITIONS if k.startswith("VersaT2I_")}
    assert {"VersaT2I_GenerateCandidates", "VersaT2I_LoadScorers", "VersaT2I_ScoreImages",
            "VersaT2I_FilterBestPerPrompt", "VersaT2I_SaveTrainingSet", "VersaT2I_TrainAspectLoRA",
            "VersaT2I_TrainGate", "VersaT2I_GatedMultiLoRALoader", "VersaT2I_LoopReport",
            "VersaT2I_DiTModelFiles"} <= ours
    for kind, names in DYNAMIC.items():  # file-listing combos: known inputs, choices emptied
        for name in names:
            spec = DEFINITIONS[kind]["input"]
            assert name in spec.get("required", {}) or name in spec.get("optional", {})


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_matches_the_node_definitions(name):
    assert validate(load(name)) == []


@pytest.mark.parametrize("name", SHIPPED)
def test_workflow_converts_to_an_api_prompt_with_every_required_input(name):
    graph = api(name)
    definitions = definitions_for(load(name))
    assert graph, "nothing to queue"
    for node_id, node in graph.items():
        spec = definitions[node["class_type"]]
        for input_name in spec["input"].get("required", {}):
            assert input_name in node["inputs"], f"{node_id} {node['class_type']}: {input_name} missing"
        for value in node["inputs"].values():
            if isinstance(value, list):  # a link: to a node that is queued too (not a muted one)
                assert value[0] in graph, f"{node_id} links to {value[0]}, which is not queued"
    assert any(definitions[n["class_type"]]["output_node"] for n in graph.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_seed_stays_fixed_so_a_requeue_reuses_finished_stages(name):
    """The frontend adds a "control after generate" value (default 'randomize') after a seed unless
    the definition opts out: 'randomize' would change the seed after each queue, draw new candidates
    and retrain everything. Our nodes opt out; core seeds (KSampler) are saved as 'fixed'."""
    seeds = []
    workflow = load(name)
    definitions = definitions_for(workflow)
    for node in workflow["nodes"]:
        spec = definitions.get(node["type"])
        if spec is None:
            continue
        position = 0
        for widget, io_type, options in _widget_inputs(spec):
            position += 1
            control = None
            if has_control_widget(widget, io_type, options):
                control = node["widgets_values"][position]
                position += 1
            if io_type == "INT" and (widget in ("seed", "noise_seed") or control is not None):
                seeds.append((node["type"], node["id"], widget, control))
    assert seeds, "no seed found"
    for kind, node_id, widget, control in seeds:
        if kind.startswith("VersaT2I_"):
            assert control is None, f"{kind} {node_id}: {widget} gets a control widget"
        else:
            assert control == "fixed", (kind, node_id, widget, control)


def test_no_input_of_ours_gets_a_control_widget():
    controlled = [(kind, widget) for kind, spec in DEFINITIONS.items() if kind.startswith("VersaT2I_")
                  for widget, io_type, options in _widget_inputs(spec) if has_control_widget(widget, io_type, options)]
    assert controlled == []


def test_the_loop_wires_every_stage():
    graph = api(LOOP)
    (generate_id, generate), = of_type(graph, "VersaT2I_GenerateCandidates").items()
    (_, loader), = of_type(graph, "CheckpointLoaderSimple").items()
    assert [source(graph, generate["inputs"][k]) is loader for k in ("model", "clip", "vae")] == [True] * 3
    (_, score), = of_type(graph, "VersaT2I_ScoreImages").items()
    assert score["inputs"]["images"] == [generate_id, 0] and score["inputs"]["candidates"] == [generate_id, 1]
    assert source(graph, score["inputs"]["scorers"])["class_type"] == "VersaT2I_LoadScorers"
    (_, scorers), = of_type(graph, "VersaT2I_LoadScorers").items()
    assert all(scorers["inputs"][aspect] != "disabled" for aspect in ASPECTS)
    (filter_id, filt), = of_type(graph, "VersaT2I_FilterBestPerPrompt").items()
    assert source(graph, filt["inputs"]["scores"]) is score and filt["inputs"]["images"] == [generate_id, 0]
    (save_id, save), = of_type(graph, "VersaT2I_SaveTrainingSet").items()
    assert save["inputs"]["selection"] == [filter_id, 0] and save["inputs"]["images"] == [generate_id, 0]

    trainers = of_type(graph, "VersaT2I_TrainAspectLoRA")
    assert sorted(t["inputs"]["aspect"] for t in trainers.values()) == sorted(ASPECTS)
    checkpoint = loader["inputs"]["ckpt_name"]
    for trainer in trainers.values():  # trained on the saved set, from the checkpoint that generated it
        assert trainer["inputs"]["dataset"] == [save_id, 0]
        assert trainer["inputs"]["ckpt_name"] == checkpoint
    (_, gate), = of_type(graph, "VersaT2I_TrainGate").items()
    assert gate["inputs"]["dataset"] == [save_id, 0] and gate["inputs"]["ckpt_name"] == checkpoint
    # The gate's experts: each aspect's LoRA linked into lora_1..lora_4 in aspect order (the order
    # of the MoL file's aspects); nothing typed in the list, no string-joining nodes in between.
    by_aspect = {t["inputs"]["aspect"]: node_id for node_id, t in trainers.items()}
    assert [gate["inputs"][f"lora_{i}"] for i in range(1, 5)] == [[by_aspect[a], 0] for a in ASPECTS]
    assert gate["inputs"]["loras"] == ""
    assert not of_type(graph, "StringConcatenate")


def test_the_inference_workflow_samples_with_the_mixture_the_loop_trains():
    loop, graph = api(LOOP), api(INFERENCE)
    (_, gate), = of_type(loop, "VersaT2I_TrainGate").items()
    (mixture_id, mixture), = of_type(graph, "VersaT2I_GatedMultiLoRALoader").items()
    # Train Gate saves <mol_name>.mol.safetensors next to the LoRAs (models/loras/versat2i/).
    assert mixture["inputs"]["mol_file"] == f"versat2i/{gate['inputs']['mol_name']}.mol.safetensors"
    assert mixture["inputs"]["mode"] == "bake"
    (_, sampler), = of_type(graph, "KSampler").items()
    assert sampler["inputs"]["model"] == [mixture_id, 0]
    for side in ("positive", "negative"):
        assert source(graph, sampler["inputs"][side])["inputs"]["clip"] == [mixture_id, 1]
    (_, decode), = of_type(graph, "VAEDecode").items()
    assert source(graph, decode["inputs"]["samples"]) is sampler
    (_, save), = of_type(graph, "SaveImage").items()
    assert source(graph, save["inputs"]["images"]) is decode


# ComfyUI's own Z-Image Turbo template (comfyui-workflow-templates' image_z_image_turbo.json): its
# loaders' values and declared files, its sampler settings.
ZIMAGE_URL = "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/"
ZIMAGE_LOADERS = {
    "UNETLoader": ({"unet_name": "z_image_turbo_bf16.safetensors", "weight_dtype": "default"}, "diffusion_models"),
    "CLIPLoader": ({"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}, "text_encoders"),
    "VAELoader": ({"vae_name": "ae.safetensors"}, "vae"),
}


def check_zimage_loaders(workflow: dict, graph: dict) -> tuple[str, str, str, str]:
    """The split loaders as ComfyUI's Z-Image Turbo template has them, each declaring its file as the
    template does; returns the ids of (UNETLoader, ModelSamplingAuraFlow, CLIPLoader, VAELoader)."""
    ids = {}
    for kind, (values, folder) in ZIMAGE_LOADERS.items():
        (node_id, node), = of_type(graph, kind).items()
        assert {k: node["inputs"][k] for k in values} == values, kind
        (ui,) = [n for n in workflow["nodes"] if n["id"] == int(node_id)]
        (file_name,) = [v for v in values.values() if v.endswith(".safetensors")]
        assert ui["properties"]["models"] == [{"name": file_name, "directory": folder,
                                               "url": f"{ZIMAGE_URL}{folder}/{file_name}"}], kind
        ids[kind] = node_id
    (sampling_id, sampling), = of_type(graph, "ModelSamplingAuraFlow").items()
    assert sampling["inputs"] == {"model": [ids["UNETLoader"], 0], "shift": 3.0}
    return ids["UNETLoader"], sampling_id, ids["CLIPLoader"], ids["VAELoader"]


def check_zimage_sampling(graph: dict, model: list, clip: list, vae_id: str) -> dict:
    """Prompt -> zeroed negative, 16-channel empty latent, KSampler at Turbo's settings, decode, save."""
    (_, sampler), = of_type(graph, "KSampler").items()
    assert {k: sampler["inputs"][k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "steps": 8, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple", "denoise": 1.0}
    assert sampler["inputs"]["model"] == model
    positive = source(graph, sampler["inputs"]["positive"])
    assert positive["class_type"] == "CLIPTextEncode" and positive["inputs"]["clip"] == clip
    negative = source(graph, sampler["inputs"]["negative"])
    assert negative["class_type"] == "ConditioningZeroOut"
    assert negative["inputs"]["conditioning"] == sampler["inputs"]["positive"]
    assert source(graph, sampler["inputs"]["latent_image"])["class_type"] == "EmptySD3LatentImage"
    (_, decode), = of_type(graph, "VAEDecode").items()
    assert source(graph, decode["inputs"]["samples"]) is sampler and decode["inputs"]["vae"] == [vae_id, 0]
    (_, save), = of_type(graph, "SaveImage").items()
    assert source(graph, save["inputs"]["images"]) is decode
    return save


def test_the_zimage_inference_workflow_mixes_the_gate_into_zimage_turbo_as_comfyuis_template_loads_it():
    workflow = load(ZIMAGE_INFERENCE)
    graph = api(workflow)
    _, sampling_id, clip_id, vae_id = check_zimage_loaders(workflow, graph)
    (mixture_id, mixture), = of_type(graph, "VersaT2I_GatedMultiLoRALoader").items()
    assert mixture["inputs"]["model"] == [sampling_id, 0] and mixture["inputs"]["clip"] == [clip_id, 0]
    assert mixture["inputs"]["mol_file"].startswith("versat2i/") and mixture["inputs"]["mode"] == "bake"
    save = check_zimage_sampling(graph, [mixture_id, 0], [mixture_id, 1], vae_id)
    assert save["inputs"]["filename_prefix"] == "versat2i/zimage_gated"


def test_the_zimage_quick_loop_trains_on_the_files_that_generated_and_tries_the_lora_with_the_stock_loader():
    workflow = load(ZIMAGE_QUICK)
    graph = api(workflow)
    unet_id, sampling_id, clip_id, vae_id = check_zimage_loaders(workflow, graph)
    (generate_id, generate), = of_type(graph, "VersaT2I_GenerateCandidates").items()
    assert [generate["inputs"][k] for k in ("model", "clip", "vae")] == [[sampling_id, 0], [clip_id, 0], [vae_id, 0]]
    assert (generate["inputs"]["steps"], generate["inputs"]["cfg"]) == (8, 1.0)
    (_, scorers), = of_type(graph, "VersaT2I_LoadScorers").items()
    enabled = [aspect for aspect in ASPECTS if scorers["inputs"][aspect] != "disabled"]
    (_, save), = of_type(graph, "VersaT2I_SaveTrainingSet").items()
    (_, trainer), = of_type(graph, "VersaT2I_TrainAspectLoRA").items()
    assert enabled == [trainer["inputs"]["aspect"]] and source(graph, trainer["inputs"]["dataset"]) is save
    # Trained from the DiT's files, the very ones the loaders load (one Primitive each feeds both).
    files = source(graph, trainer["inputs"]["model_files"])
    assert files["class_type"] == "VersaT2I_DiTModelFiles" and trainer["inputs"]["ckpt_name"] == "none"
    assert files["inputs"]["diffusion_model"] == graph[unet_id]["inputs"]["unet_name"]
    assert files["inputs"]["text_encoder"] == graph[clip_id]["inputs"]["clip_name"]
    assert files["inputs"]["vae"] == graph[vae_id]["inputs"]["vae_name"] and files["inputs"]["text_encoder_2"] == "none"
    primitives = {n["id"]: n for n in workflow["nodes"] if n["type"] == "PrimitiveNode"}
    fed = {}
    for link in workflow["links"]:
        if link[1] in primitives:
            target = next(n for n in workflow["nodes"] if n["id"] == link[3])
            fed.setdefault(link[1], set()).add((target["type"], target["inputs"][link[4]]["name"]))
    assert {("UNETLoader", "unet_name"), ("VersaT2I_DiTModelFiles", "diffusion_model")} in fed.values()
    assert {("CLIPLoader", "clip_name"), ("VersaT2I_DiTModelFiles", "text_encoder")} in fed.values()
    assert {("VAELoader", "vae_name"), ("VersaT2I_DiTModelFiles", "vae")} in fed.values()
    assert not of_type(graph, "LoraLoaderModelOnly"), "the try-it group must be muted until the LoRA exists"

    unmuted = copy.deepcopy(workflow)
    for node in unmuted["nodes"]:
        node["mode"] = 0
    full = api(unmuted)
    (lora_id, lora), = of_type(full, "LoraLoaderModelOnly").items()
    expected = f"versat2i/{save['inputs']['name'].rsplit('/', 1)[-1]}_{trainer['inputs']['aspect']}.safetensors"
    assert trainer["inputs"]["lora_name"] == "" and lora["inputs"]["lora_name"] == expected
    assert lora["inputs"]["model"] == [sampling_id, 0]
    check_zimage_sampling(full, [lora_id, 0], [clip_id, 0], vae_id)


def test_the_quick_loop_trains_the_one_aspect_it_scores_and_can_try_it():
    workflow = load(QUICK)
    graph = api(workflow)
    (_, scorers), = of_type(graph, "VersaT2I_LoadScorers").items()
    enabled = [aspect for aspect in ASPECTS if scorers["inputs"][aspect] != "disabled"]
    (_, trainer), = of_type(graph, "VersaT2I_TrainAspectLoRA").items()
    (_, save), = of_type(graph, "VersaT2I_SaveTrainingSet").items()
    assert enabled == [trainer["inputs"]["aspect"]]
    assert not of_type(graph, "LoraLoader"), "the try-it group must be muted until the LoRA exists"

    unmuted = copy.deepcopy(workflow)
    for node in unmuted["nodes"]:
        node["mode"] = 0
    full = api(unmuted)
    (_, lora), = of_type(full, "LoraLoader").items()
    # Train Aspect LoRA's default file name: <dataset folder name>_<aspect> in models/loras/versat2i/.
    expected = f"versat2i/{save['inputs']['name'].rsplit('/', 1)[-1]}_{trainer['inputs']['aspect']}.safetensors"
    assert trainer["inputs"]["lora_name"] == "" and lora["inputs"]["lora_name"] == expected
    (_, sampler), = of_type(full, "KSampler").items()
    assert source(full, sampler["inputs"]["model"]) is lora


@pytest.mark.parametrize("name", SHIPPED)
def test_layout_every_node_in_a_group_and_nothing_overlaps(name):
    workflow = load(name)

    def box(node):
        x, y = node["pos"]
        w, h = node["size"]
        return x, y - TITLE_HEIGHT, x + w, y + h

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    groups = [(g["title"], (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                            g["bounding"][1] + g["bounding"][3])) for g in workflow["groups"]]
    for node in workflow["nodes"]:
        b = box(node)
        inside = [title for title, g in groups if g[0] <= b[0] and g[1] <= b[1] and b[2] <= g[2] and b[3] <= g[3]]
        assert len(inside) == 1, f"node {node['id']} ({node['type']}) is in groups {inside}"
    nodes = workflow["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            assert not overlap(box(a), box(b)), f"nodes {a['id']} and {b['id']} overlap"
    for i, (title_a, a) in enumerate(groups):
        for title_b, b in groups[i + 1:]:
            assert not overlap(a, b), f"groups {title_a!r} and {title_b!r} overlap"
    assert any(node["type"] == "MarkdownNote" for node in nodes), "no note explaining the workflow"


@pytest.mark.parametrize("name", SHIPPED)
def test_thumbnail_is_a_jpeg_of_the_current_workflow(name):
    """ComfyUI's template browser shows <name>.jpg for a custom-node template <name>.json. The
    thumbnail records the hash of the workflow it was drawn from (tools/render_thumbnails.py)."""
    thumbnail = WORKFLOWS / f"{name}.jpg"
    assert thumbnail.is_file(), "no thumbnail; run tools/build_workflows.py --thumbnails"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width == image.height >= 256
        comment = image.info.get("comment", b"").decode("ascii")
    digest = hashlib.sha256((WORKFLOWS / f"{name}.json").read_bytes()).hexdigest()
    assert comment == f"versat2i-workflow-sha256:{digest}", (
        "the thumbnail was drawn from another version of the workflow; run tools/build_workflows.py --thumbnails")


# -- the validator catches what it claims to catch ----------------------------------------------------

def find(workflow: dict, node_type: str, title: str | None = None) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title))


def widget_index(node_type: str, name: str) -> int:
    """Position of a widget's value in widgets_values (counting the seeds' control values)."""
    spec = DEFINITIONS[node_type]
    position = 0
    for widget, io_type, options in _widget_inputs(spec):
        if widget == name:
            return position
        position += 1 + has_control_widget(widget, io_type, options)
    raise KeyError(name)


def mutated(name: str, change) -> list[str]:
    workflow = load(name)
    change(workflow)
    return validate(workflow)


def test_validator_catches_a_link_between_mismatched_types():
    def relink(workflow):  # VAE Decode's vae input fed from the checkpoint's CLIP output
        decode, loader = find(workflow, "VAEDecode"), find(workflow, "CheckpointLoaderSimple")
        link_id = next(i["link"] for i in decode["inputs"] if i["name"] == "vae")
        link = next(link for link in workflow["links"] if link[0] == link_id)
        loader["outputs"][link[2]]["links"].remove(link_id)
        loader["outputs"][1]["links"].append(link_id)
        link[2], link[5] = 1, "CLIP"

    problems = mutated(INFERENCE, relink)
    assert any("'vae' (VAE) is linked to a CLIP output" in p for p in problems), problems


def test_validator_catches_a_missing_control_value_after_a_seed():
    def drop_control(workflow):
        node = find(workflow, "KSampler")
        assert node["widgets_values"][widget_index("KSampler", "seed") + 1] == "fixed"
        del node["widgets_values"][widget_index("KSampler", "seed") + 1]

    # (The converter accepts this, as the frontend does for saves older than the control widget;
    # the shipped files must have it.)
    problems = mutated(INFERENCE, drop_control)
    assert any("widget values, KSampler needs" in p for p in problems), problems


def test_validator_and_converter_catch_a_missing_widget_value():
    def drop_last(workflow):
        find(workflow, "VersaT2I_SaveTrainingSet")["widgets_values"].pop()

    assert any("2 widget values, VersaT2I_SaveTrainingSet needs 3" in p for p in mutated(LOOP, drop_last))
    workflow = load(LOOP)
    drop_last(workflow)
    with pytest.raises(WorkflowError, match="widget values"):
        workflow_to_api(workflow, DEFINITIONS, strict=True)


@pytest.mark.parametrize("node_type, widget, value, expected", [
    ("VersaT2I_LoadScorers", "aesthetics", "no-such-scorer", "is not one of its choices"),
    ("VersaT2I_GenerateCandidates", "sampler_name", "euler_fast", "is not one of its choices"),
    ("VersaT2I_GenerateCandidates", "k", 0, "below its minimum 1"),
    ("VersaT2I_GenerateCandidates", "cfg", "7", "is not a number"),
    ("VersaT2I_SaveTrainingSet", "overwrite", "no", "is not true/false"),
])
def test_validator_catches_bad_widget_values(node_type, widget, value, expected):
    def change(workflow):
        find(workflow, node_type)["widgets_values"][widget_index(node_type, widget)] = value

    problems = mutated(LOOP, change)
    assert any(widget in p and expected in p for p in problems), problems


def test_validator_catches_an_unconnected_required_input_and_a_dangling_link():
    def unlink(workflow):  # Score Images without its scorers
        score = find(workflow, "VersaT2I_ScoreImages")
        entry = next(i for i in score["inputs"] if i["name"] == "scorers")
        link_id, entry["link"] = entry["link"], None
        workflow["links"] = [link for link in workflow["links"] if link[0] != link_id]
        for node in workflow["nodes"]:
            for output in node.get("outputs") or []:
                if link_id in (output.get("links") or []):
                    output["links"].remove(link_id)

    assert any("required input 'scorers'" in p for p in mutated(LOOP, unlink))

    def dangle(workflow):
        workflow["links"].pop()

    assert any("does not exist" in p or "does not list it" in p for p in mutated(LOOP, dangle))


def test_validator_catches_unknown_nodes_missing_outputs_and_bad_primitive_values():
    def unknown(workflow):
        find(workflow, "VAEDecode")["type"] = "VAEDecodeTurbo"

    assert any("does not exist" in p for p in mutated(INFERENCE, unknown))

    def no_output(workflow):
        for node in workflow["nodes"]:
            if node["type"] == "SaveImage":
                node["mode"] = 2

    assert any("no active output node" in p for p in mutated(INFERENCE, no_output))

    def primitive_into_static_combo(workflow):  # the checkpoint Primitive also feeding a sampler name
        primitive, generate = find(workflow, "PrimitiveNode"), find(workflow, "VersaT2I_GenerateCandidates")
        slot = next(i for i, entry in enumerate(generate["inputs"]) if entry["name"] == "sampler_name")
        link_id = workflow["last_link_id"] + 1
        workflow["last_link_id"] = link_id
        workflow["links"].append([link_id, primitive["id"], 0, generate["id"], slot, "COMBO"])
        primitive["outputs"][0]["links"].append(link_id)
        generate["inputs"][slot]["link"] = link_id

    problems = mutated(LOOP, primitive_into_static_combo)
    assert any("sampler_name" in p and "is not one of its choices" in p for p in problems), problems


def test_validator_catches_output_lists_that_do_not_match_the_definition():
    def drop_output(workflow):
        find(workflow, "VersaT2I_FilterBestPerPrompt")["outputs"].pop()

    assert any("outputs, the definition has 4" in p for p in mutated(LOOP, drop_output))
