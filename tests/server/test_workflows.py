"""The shipped workflows in a real ComfyUI server (skipped without COMFYUI_PATH).

The server gets this pack and a test-only pack (``versat2i_test_nodes``) in its custom_nodes, and a
tiny SD1.5-shaped checkpoint with its ``.configs/`` sidecar in models/checkpoints. Each shipped
workflow file is converted with ``harness.workflow_to_api`` against the live /object_info (after
``harness.validate_workflow`` accepted it against that same /object_info) and queued through the
HTTP API, as the frontend would queue it. What the tests change, on the UI-format workflow before
converting, and why:

* the checkpoint name (the Primitive / Load Checkpoint value) -> the tiny checkpoint;
* sizes, steps and ranks -> tiny values (seconds on a CPU, not hours on a GPU);
* the reward models -> weight-free analytic scorers (no weight files here);
* in the converted prompt, ``CheckpointLoaderSimple`` -> ``VersaT2ITest_TinyCheckpointLoader``
  (same input, same MODEL / CLIP / VAE outputs): ComfyUI's model detection only knows real-size
  checkpoints. The training nodes load the same file themselves through the sidecar configs.
  Likewise, for the Z-Image workflows (ComfyUI >= 0.3.74; skipped, with the reason, on older ones):
  the Z-Image Turbo file names -> the tiny Z-Image files of tiny_models/dit.py (put into the server's
  diffusion_models / text_encoders / vae folders), and ``UNETLoader`` / ``CLIPLoader`` / ``VAELoader``
  -> the test pack's tiny loaders (same inputs and outputs; ComfyUI detects Z-Image only at its real
  width). DiT Model Files and Train Aspect LoRA read the tiny files themselves.

Every other value and every link is the shipped one. The outputs are checked on disk: the
training set and its manifest, the kohya LoRA files, the MoL file, the saved images.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from harness import (
    PromptFailed,
    PromptRejected,
    _widget_inputs,
    comfyui_version,
    has_control_widget,
    load_snapshot,
    min_comfyui_version,
    snapshot_node_definition,
    snapshot_version,
    supports,
    validate_workflow,
    workflow_to_api,
)
from PIL import Image
from safetensors import safe_open
from tiny_models.sd import build_tiny_sd15

from versat2i.aspects import ASPECTS
from versat2i.training_set.layout import CAPTION_SUFFIX, MANIFEST_NAME, SUMMARY_NAME

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SNAPSHOT = load_snapshot()
TEST_PACK = Path(__file__).resolve().parent / "versat2i_test_nodes"
TINY_LOADER = "VersaT2ITest_TinyCheckpointLoader"
CHECKPOINT = "tiny-sd15.safetensors"
PACK = "ComfyUI-VersaT2I"
LOOP, INFERENCE, QUICK = "versat2i_self_improvement_loop", "versat2i_gated_inference", "versat2i_quick_loop_one_aspect"
ZIMAGE_INFERENCE, ZIMAGE_QUICK = "versat2i_zimage_gated_inference", "versat2i_zimage_quick_loop_one_aspect"
# Z-Image Turbo's files as the Z-Image workflows name them: diffusion model, text encoder, VAE
ZIMAGE_FILES = ("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors")
# core loader -> the test pack's stand-in with the same inputs and outputs (module docstring)
TINY_LOADERS = {"CheckpointLoaderSimple": TINY_LOADER, "UNETLoader": "VersaT2ITest_TinyUNETLoader",
                "CLIPLoader": "VersaT2ITest_TinyCLIPLoader", "VAELoader": "VersaT2ITest_TinyVAELoader"}
K = 2  # candidates per prompt in the tests

ANALYTIC_SCORERS = {"aesthetics": "analytic:contrast", "alignment": "analytic:colourfulness",
                    "geometry": "analytic:sharpness", "lowlevel": "analytic:exposure"}
TINY_TRAINING = {"steps": 3, "learning_rate": 2e-2, "rank": 4, "alpha": 4.0, "resolution": 64}
# node type -> widget values the tests change (see the module docstring)
TINY_SETTINGS = {
    "VersaT2I_GenerateCandidates": {"k": K, "steps": 2, "width": 64, "height": 64, "batch_size": 2},
    "VersaT2I_TrainAspectLoRA": TINY_TRAINING,
    "VersaT2I_TrainGate": {"steps": 3, "resolution": 64},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    """A ComfyUI with the pack, the test pack and a tiny checkpoint (+ configs sidecar)."""
    from harness import ComfyServer

    base = tmp_path_factory.mktemp("workflows-server")
    tiny = build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(tiny.checkpoint, checkpoints / CHECKPOINT)
    shutil.copytree(tiny.folder, checkpoints / "tiny-sd15.configs",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))  # configs only
    started = ComfyServer.start(comfyui_path, base, extra_packs={"versat2i-test-nodes": TEST_PACK})
    try:
        yield started
    finally:
        started.stop()


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def set_widget(node: dict, name: str, value, object_info: dict) -> None:
    """Set a widget's value in a UI-format node (positional, skipping control values)."""
    position = 0
    for widget, io_type, options in _widget_inputs(object_info[node["type"]]):
        if widget == name:
            node["widgets_values"][position] = value
            return
        position += 1 + has_control_widget(widget, io_type, options)
    raise KeyError(f"{node['type']} has no widget {name!r}")


def tiny_workflow(name: str, object_info: dict, *, scorers: dict | None = None) -> dict:
    """The shipped workflow with the test settings (module docstring), still in UI format."""
    workflow = load(name)
    for node in workflow["nodes"]:
        if node["type"] == "PrimitiveNode" and str(node["widgets_values"][0]).endswith(".safetensors") \
                and node["widgets_values"][0] not in ZIMAGE_FILES:  # (tiny_zimage_workflow replaces those)
            node["widgets_values"][0] = CHECKPOINT  # the workflows' checkpoint value, shared by every stage
        elif node["type"] == "CheckpointLoaderSimple":
            set_widget(node, "ckpt_name", CHECKPOINT, object_info)
        for widget, value in TINY_SETTINGS.get(node["type"], {}).items():
            set_widget(node, widget, value, object_info)
        if node["type"] == "VersaT2I_LoadScorers":
            for aspect in ASPECTS:
                position = [w[0] for w in _widget_inputs(object_info[node["type"]])].index(aspect)
                if node["widgets_values"][position] != "disabled":
                    set_widget(node, aspect, (scorers or ANALYTIC_SCORERS)[aspect], object_info)
    return workflow


def to_prompt(server, workflow: dict, *, validate: bool = True) -> dict:
    """Validate against the live definitions, convert as the frontend would, swap in the tiny loader."""
    object_info = server.object_info(refresh=True)
    if validate:  # the choices of file lists are this server's files (the snapshot records which inputs list files)
        assert validate_workflow(workflow, object_info,
                                 dynamic_combos=snapshot_version(SNAPSHOT)["dynamic_combos"]) == []
    graph = workflow_to_api(workflow, object_info, strict=True)
    for node in graph.values():
        node["class_type"] = TINY_LOADERS.get(node["class_type"], node["class_type"])
    return graph


def run(server, workflow: dict, timeout: float = 600.0) -> dict:
    return server.run(to_prompt(server, workflow), timeout=timeout)


def kohya_lora_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def saved_images(entry: dict, node_type_outputs: str, server) -> list[Path]:
    return [server.base_dir / "output" / image["subfolder"] / image["filename"]
            for image in entry["outputs"].get(node_type_outputs, {}).get("images", [])]


# -- definitions and serving ------------------------------------------------------------------------

def test_snapshot_matches_the_live_node_definitions(server):
    """tests/data/object_info.json's entry for this ComfyUI version (what the offline validation
    uses) is what this ComfyUI and this pack define; otherwise rerun tests/data/make_object_info.py."""
    entry = snapshot_version(SNAPSHOT, comfyui_version(server.comfyui_path))
    live = server.object_info(refresh=True)
    ours_live = {k for k in server.nodes_of_pack()}
    ours_snapshot = {k for k in entry["nodes"] if k.startswith("VersaT2I_")}
    assert ours_live == ours_snapshot, "node set changed: rerun tests/data/make_object_info.py"
    stale = [kind for kind, expected in entry["nodes"].items()
             if snapshot_node_definition(live[kind], entry["dynamic_combos"].get(kind, ())) != expected]
    assert stale == [], f"definitions changed for {stale}: rerun tests/data/make_object_info.py"
    # The inputs recorded as file lists are: the tiny checkpoint shows up in them.
    for kind, names in entry["dynamic_combos"].items():
        for name in names:
            if name == "ckpt_name":
                spec = live[kind]["input"]["required"][name]
                choices = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
                assert CHECKPOINT in choices, (kind, choices)


def test_comfyui_serves_the_workflows_as_templates_with_thumbnails(server):
    templates = server.get_json("/workflow_templates")
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert sorted(templates.get(PACK, [])) == names, templates
    for name in names:
        # The frontend fetches <name>.json and shows <name>.jpg from the pack's template route.
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.json") as response:
            assert json.load(response) == load(name)
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg") as response:
            assert response.headers["Content-Type"] == "image/jpeg"
            assert response.read() == (WORKFLOWS / f"{name}.jpg").read_bytes()


# -- the workflows, queued ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loop_run(server):
    """The self-improvement loop, queued once (4 LoRAs and the gate train in child processes)."""
    object_info = server.object_info(refresh=True)
    entry = run(server, tiny_workflow(LOOP, object_info))
    return entry


@pytest.mark.slow
def test_the_loop_writes_the_training_set_four_loras_and_the_gate(server, loop_run):
    output = server.base_dir / "output"
    loras = server.base_dir / "models" / "loras" / "versat2i"
    dataset = output / "versat2i" / "loop"
    manifest = [json.loads(line) for line in (dataset / MANIFEST_NAME).read_text().splitlines()]
    generate = next(n for n in load(LOOP)["nodes"] if n["type"] == "VersaT2I_GenerateCandidates")
    prompts = [line.strip() for line in generate["widgets_values"][0].splitlines() if line.strip()]
    assert {e["aspect"] for e in manifest} == set(ASPECTS), "every aspect keeps at least one image"
    for entry in manifest:
        assert entry["prompt"] == prompts[entry["prompt_index"]] and entry["caption"] == entry["prompt"]
        # Generate Candidates' seed rule, carried through Score Images into the manifest.
        assert entry["seed"] == entry["prompt_index"] * K + entry["candidate_index"]
        assert entry["scorer"]["id"] == ANALYTIC_SCORERS[entry["aspect"]]
        image = dataset / entry["file"]
        assert image.is_file() and image.with_suffix(CAPTION_SUFFIX).read_text() == entry["prompt"]
        assert Image.open(image).size == (64, 64)
    per_aspect = {a: [e["prompt_index"] for e in manifest if e["aspect"] == a] for a in ASPECTS}
    assert all(len(v) == len(set(v)) <= len(prompts) for v in per_aspect.values()), "one image per prompt at most"
    summary = json.loads((dataset / SUMMARY_NAME).read_text())
    assert summary["images_scored"] == len(prompts) * K

    for aspect in ASPECTS:
        keys = kohya_lora_keys(loras / f"loop_{aspect}.safetensors")
        assert keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
        assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    from versat2i.trainer.mol_file import read_mol

    mol = read_mol(loras / "loop.mol.safetensors")
    assert list(mol.aspects) == list(ASPECTS)  # the order of the joined LoRA list

    ui = dict(loop_run["outputs"])
    texts = [t for out in ui.values() for t in out.get("text", []) if isinstance(t, str)]
    assert any("MoL file: versat2i/loop.mol.safetensors" in t for t in texts), texts
    assert sum("LoRA: versat2i/loop_" in t for t in texts) == 4, texts
    loss_previews = [out for out in ui.values() if out.get("images") and all(
        i.get("type") == "temp" for i in out["images"])]
    assert len(loss_previews) >= 5, "the four LoRA loss curves, the gate's and the kept images are shown"


@pytest.mark.slow
def test_gated_inference_samples_with_the_trained_mixture(server, loop_run):
    object_info = server.object_info(refresh=True)
    workflow = tiny_workflow(INFERENCE, object_info)
    entry = run(server, workflow)
    (save_id,) = [i for i, n in to_prompt(server, workflow).items() if n["class_type"] == "SaveImage"]
    (gated,) = saved_images(entry, save_id, server)
    assert gated.name.startswith("gated_") and Image.open(gated).size == (64, 64)

    # The same graph at strength 0 is the base model: the mixture must have changed the image.
    base_workflow = copy.deepcopy(workflow)
    mixture = next(n for n in base_workflow["nodes"] if n["type"] == "VersaT2I_GatedMultiLoRALoader")
    set_widget(mixture, "strength", 0.0, object_info)
    (base,) = saved_images(run(server, base_workflow), save_id, server)
    difference = np.abs(np.asarray(Image.open(gated), dtype=np.int16) - np.asarray(Image.open(base), dtype=np.int16))
    assert difference.max() > 0, "the gated LoRA mixture did not change the image"


@pytest.mark.slow
def test_quick_loop_trains_one_lora_then_the_unmuted_group_uses_it(server):
    object_info = server.object_info(refresh=True)
    workflow = tiny_workflow(QUICK, object_info)
    run(server, workflow)
    output = server.base_dir / "output" / "versat2i" / "quick"
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == ["10_aesthetics"]
    lora = server.base_dir / "models" / "loras" / "versat2i" / "quick_aesthetics.safetensors"
    stamp = lora.stat().st_mtime_ns
    assert kohya_lora_keys(lora)

    for node in workflow["nodes"]:  # what the note asks: unmute group 4 and queue again
        node["mode"] = 0
    entry = run(server, workflow)
    (save_id,) = [i for i, n in to_prompt(server, workflow).items() if n["class_type"] == "SaveImage"]
    (image,) = saved_images(entry, save_id, server)
    assert image.name.startswith("quick_lora_") and Image.open(image).size == (64, 64)
    assert lora.stat().st_mtime_ns == stamp, "the finished LoRA was trained again"


# -- the Z-Image Turbo workflows, on tiny Z-Image files ------------------------------------------------------

@pytest.fixture(scope="module")
def zimage(server, tmp_path_factory):
    """The tiny Z-Image files in the server's model folders (the diffusion model with its
    ``.configs`` sidecar); skipped on a ComfyUI older than the Z-Image workflows need."""
    workflow, version = load(ZIMAGE_QUICK), comfyui_version(server.comfyui_path)
    if not supports(workflow, version):
        pytest.skip(f"the Z-Image workflows need ComfyUI >= {min_comfyui_version(workflow)}; ComfyUI {version} has "
                    "no Z-Image")
    from tiny_models.dit import write_tiny_dit

    tiny = write_tiny_dit("zimage", tmp_path_factory.mktemp("tiny-zimage"))
    for folder in ("diffusion_models", "text_encoders", "vae"):
        shutil.copytree(tiny.diffusion_model.parents[1] / folder, server.base_dir / "models" / folder,
                        dirs_exist_ok=True)
    return tiny


def tiny_zimage_workflow(name: str, object_info: dict, tiny) -> dict:
    """tiny_workflow, and Z-Image Turbo's file names (in Primitives, loaders, DiT Model Files) ->
    the tiny files' names."""
    workflow = tiny_workflow(name, object_info)
    names = dict(zip(ZIMAGE_FILES, (tiny.diffusion_model.name, tiny.text_encoders[0].name, tiny.vae.name),
                     strict=True))
    replaced = 0
    for node in workflow["nodes"]:
        for index, value in enumerate(node.get("widgets_values") or []):
            if isinstance(value, str) and value in names:
                node["widgets_values"][index] = names[value]
                replaced += 1
    assert replaced >= 3, "the workflow names none of Z-Image Turbo's files"
    return workflow


def node_of(workflow: dict, node_type: str) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type]
    return node


def saved_image(server, workflow: dict) -> np.ndarray:
    """Queue ``workflow``; the one image its Save Image wrote, as an int16 array."""
    entry = run(server, workflow)
    (save_id,) = [i for i, n in to_prompt(server, workflow).items() if n["class_type"] == "SaveImage"]
    (path,) = saved_images(entry, save_id, server)
    assert Image.open(path).size == (64, 64)
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.slow
def test_zimage_gated_inference_samples_zimage_with_the_mixture(server, zimage):
    """The shipped graph (ComfyUI's Z-Image loaders -> Gated Multi-LoRA Loader, bake -> KSampler)
    on the tiny Z-Image, with a MoL file over two Z-Image LoRAs in the family's diffusers format: it
    samples, and the mixture changes the image (strength 0 is the base model)."""
    from tiny_models.mixture import write_mixture

    object_info = server.object_info(refresh=True)
    mol_file, _ = write_mixture("zimage", zimage, server.base_dir / "models" / "loras", ["aesthetics", "lowlevel"],
                                "token", b_scale=50.0, tag="zimage")
    workflow = tiny_zimage_workflow(ZIMAGE_INFERENCE, server.object_info(refresh=True), zimage)
    mixture = node_of(workflow, "VersaT2I_GatedMultiLoRALoader")
    set_widget(mixture, "mol_file", mol_file, object_info)
    log_before = len(server.log_text())
    gated = saved_image(server, workflow)
    base_workflow = copy.deepcopy(workflow)
    set_widget(node_of(base_workflow, "VersaT2I_GatedMultiLoRALoader"), "strength", 0.0, object_info)
    base = saved_image(server, base_workflow)
    assert np.abs(gated - base).max() > 0, "the gated LoRA mixture did not change the Z-Image image"
    assert "lora key not loaded" not in server.log_text()[log_before:]


@pytest.mark.slow
def test_zimage_quick_loop_trains_a_lora_on_the_dit_files_that_the_stock_loader_applies(server, zimage):
    object_info = server.object_info(refresh=True)
    workflow = tiny_zimage_workflow(ZIMAGE_QUICK, object_info, zimage)
    entry = run(server, workflow)
    dataset = server.base_dir / "output" / "versat2i" / "zimage_quick"
    assert sorted(p.name for p in dataset.iterdir() if p.is_dir()) == ["10_aesthetics"]
    manifest = [json.loads(line) for line in (dataset / MANIFEST_NAME).read_text().splitlines()]
    assert {e["aspect"] for e in manifest} == {"aesthetics"} and len(manifest) == 4  # the best of each prompt
    lora = server.base_dir / "models" / "loras" / "versat2i" / "zimage_quick_aesthetics.safetensors"
    keys = kohya_lora_keys(lora)
    # Z-Image's LoRA format (diffusers / PEFT keys on the transformer), which ComfyUI maps for Z-Image
    assert keys and all(k.startswith("transformer.") for k in keys), keys[:5]
    assert any("LoRA: versat2i/zimage_quick_aesthetics.safetensors" in t for t in ui_texts(entry)), ui_texts(entry)
    stamp = lora.stat().st_mtime_ns

    for node in workflow["nodes"]:  # what the note asks: unmute group 4 and queue again
        node["mode"] = 0
    log_before = len(server.log_text())
    with_lora = saved_image(server, workflow)
    assert "lora key not loaded" not in server.log_text()[log_before:]
    assert lora.stat().st_mtime_ns == stamp, "the finished LoRA was trained again"
    without = copy.deepcopy(workflow)
    set_widget(node_of(without, "LoraLoaderModelOnly"), "strength_model", 0.0, object_info)
    assert np.abs(with_lora - saved_image(server, without)).max() > 0, "the trained LoRA does not change the image"


# -- queueing again, an aspect that keeps nothing --------------------------------------------------------

def file_states(folder: Path) -> dict:
    """Every file's bytes and identity (inode, mtime): a rewrite with equal bytes still changes it."""
    return {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def ui_texts(entry: dict) -> list[str]:
    return [t for out in entry["outputs"].values() for t in out.get("text", []) if isinstance(t, str)]


@pytest.mark.slow
def test_the_same_workflow_queued_again_after_a_cache_clear_does_no_work(server):
    """The docs promise that queueing again re-runs only what changed: after ComfyUI's cache is
    cleared every node runs again, and the pack's nodes find their results on disk (the training set
    by its content fingerprint, the LoRA by its inputs' fingerprint) instead of refusing or
    retraining."""
    object_info = server.object_info(refresh=True)
    workflow = tiny_workflow(QUICK, object_info)
    for node in workflow["nodes"]:  # names of its own, so the other tests' runs don't matter
        if node["type"] == "VersaT2I_SaveTrainingSet":
            set_widget(node, "name", "versat2i/requeue", object_info)
        elif node["type"] == "VersaT2I_TrainAspectLoRA":
            set_widget(node, "lora_name", "requeue", object_info)
    first = run(server, workflow)
    dataset = server.base_dir / "output" / "versat2i" / "requeue"
    lora = server.base_dir / "models" / "loras" / "versat2i" / "requeue.safetensors"
    runs = server.base_dir / "output" / "versat2i" / "lora_runs"
    made = file_states(dataset), file_states(lora.parent), sorted(runs.rglob("*"))
    assert any("LoRA: versat2i/requeue.safetensors" == t for t in ui_texts(first)), ui_texts(first)

    server.clear_cache()
    second = run(server, workflow)  # no error
    texts = ui_texts(second)
    assert any("unchanged, reused (same content)" in t for t in texts), texts
    assert any("LoRA: versat2i/requeue.safetensors (already trained from these inputs)" in t for t in texts), texts
    assert (file_states(dataset), file_states(lora.parent), sorted(runs.rglob("*"))) == made, "something was redone"


@pytest.mark.slow
def test_an_aspect_that_keeps_no_image_does_not_stop_the_loop(server):
    """The loop workflow where the geometry threshold keeps nothing (as when no candidate shows a
    person): the other three LoRAs are trained, the gate mixes them, and the nodes say which aspect
    was left out."""
    object_info = server.object_info(refresh=True)
    workflow = tiny_workflow(LOOP, object_info)
    for node in workflow["nodes"]:
        if node["type"] == "VersaT2I_FilterBestPerPrompt":
            set_widget(node, "aspect_thresholds", "geometry = 100000000", object_info)  # above any sharpness
        elif node["type"] == "VersaT2I_SaveTrainingSet":
            set_widget(node, "name", "versat2i/no-geometry", object_info)
        elif node["type"] == "VersaT2I_TrainGate":
            set_widget(node, "mol_name", "no-geometry", object_info)
    entry = run(server, workflow)
    loras = server.base_dir / "models" / "loras" / "versat2i"
    trained = ["aesthetics", "alignment", "lowlevel"]
    for aspect in trained:
        assert kohya_lora_keys(loras / f"no-geometry_{aspect}.safetensors")
    assert not (loras / "no-geometry_geometry.safetensors").exists()
    from versat2i.trainer.mol_file import read_mol

    assert list(read_mol(loras / "no-geometry.mol.safetensors").aspects) == trained
    texts = ui_texts(entry)
    assert any("geometry: NO IMAGE KEPT" in t for t in texts), texts  # Save Training Set
    assert any(t.startswith("NOT TRAINED: aspect 'geometry' kept no image") for t in texts), texts  # Train LoRA
    assert any("MoL file: versat2i/no-geometry.mol.safetensors" in t and "Not in the mixture: aspect 'geometry'" in t
               for t in texts), texts  # Train Gate


# -- refused, or failing, with one error on the input at fault ----------------------------------------------

def checks_v3_combos(server) -> bool:
    """ComfyUI 0.33 checks V3 combo values when a prompt is queued; 0.3.64 lets them through."""
    return tuple(int(p) for p in comfyui_version(server.comfyui_path).split(".")[:2]) >= (0, 4)


def drain_queue(server, timeout: float = 600.0) -> None:
    """Wait until the server has nothing running or pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get_json("/queue")
        if not queue.get("queue_running") and not queue.get("queue_pending"):
            return
        time.sleep(0.5)
    raise AssertionError(f"the queue did not drain within {timeout:.0f} s")


def errors_by_node(refused: PromptRejected) -> dict[str, list[dict]]:
    return {node_id: node["errors"] for node_id, node in refused.node_errors.items()}


@pytest.mark.parametrize("workflow_name, node_type, widget, value", [
    (LOOP, "VersaT2I_LoadScorers", "aesthetics", "no-such-scorer"),
    (INFERENCE, "VersaT2I_GatedMultiLoRALoader", "mode", "blend"),
    (QUICK, "VersaT2I_GenerateCandidates", "sampler_name", "euler_fast"),
    (QUICK, "VersaT2I_TrainAspectLoRA", "lr_scheduler", "sometimes"),
    (INFERENCE, "KSampler", "sampler_name", "euler_fast"),
])
def test_a_bad_combo_value_is_one_error_on_its_input(server, workflow_name, node_type, widget, value):
    """ComfyUI 0.33 refuses it when queued, one error on that input; 0.3.64 checks only core (V1)
    combos, and the pack's node refuses the value when it runs, naming the input."""
    object_info = server.object_info(refresh=True)
    workflow = tiny_workflow(workflow_name, object_info)
    for mixture in (n for n in workflow["nodes"] if n["type"] == "VersaT2I_GatedMultiLoRALoader"):
        # no MoL file needed (the loop test may not have made one): only the bad value is at fault
        set_widget(mixture, "mol_file", "none (use the LoRA list)", object_info)
    node = next(n for n in workflow["nodes"] if n["type"] == node_type)
    set_widget(node, widget, value, object_info)
    problems = validate_workflow(workflow, object_info, dynamic_combos=snapshot_version(SNAPSHOT)["dynamic_combos"])
    assert any(value in p for p in problems), problems  # the offline check sees it too
    graph = to_prompt(server, workflow, validate=False)
    if node_type.startswith("VersaT2I_") and not checks_v3_combos(server):
        with pytest.raises(PromptFailed) as failed:
            server.run(graph, timeout=600)
        message = str(failed.value).split("\n", 1)[0]
        assert f"node {node['id']} ({node_type}) raised ValueError: {widget}" in message, message
        assert repr(value) in message, message
        return
    history_before = server.get_json("/history")
    with pytest.raises(PromptRejected) as refused:
        server.queue(graph)
    errors = errors_by_node(refused.value)
    assert list(errors) == [str(node["id"])], refused.value.details()  # no other node complains
    (error,) = errors[str(node["id"])]
    assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == widget
    assert value in error["details"]
    # ComfyUI 0.33 still runs the outputs that do not depend on a refused node (a quick loop's
    # training set is saved before its Train node): the node with the bad value never runs.
    drain_queue(server)
    ran = {node_id for key, entry in server.get_json("/history").items() if key not in history_before
           for node_id in entry.get("outputs", {})}
    assert str(node["id"]) not in ran, "the node with the bad value ran"


def test_a_missing_checkpoint_is_one_error_on_each_ckpt_name(server):
    """Before: each Train node showed it as 8 identical errors, on inputs unrelated to it."""
    object_info = server.object_info(refresh=True)
    workflow = tiny_workflow(LOOP, object_info)
    for node in workflow["nodes"]:
        if node["type"] == "PrimitiveNode" and node["widgets_values"][0] == CHECKPOINT:  # feeds every stage
            node["widgets_values"][0] = "deleted-meanwhile.safetensors"
    with pytest.raises(PromptRejected) as refused:
        server.queue(to_prompt(server, workflow, validate=False))
    errors = errors_by_node(refused.value)
    ours = {node["id"]: node["type"] for node in workflow["nodes"]
            if node["type"] in ("VersaT2I_TrainAspectLoRA", "VersaT2I_TrainGate")}
    assert len(ours) == 5
    for node_id in ours:
        if not checks_v3_combos(server):
            # 0.3.64 checks no V3 combo value, and these nodes' validate_inputs take their name only
            # (lora_name, mol_name): they refuse the checkpoint when they run, naming ckpt_name (tests/comfy)
            assert str(node_id) not in errors, errors[str(node_id)]
            continue
        (error,) = errors[str(node_id)]
        assert error["extra_info"]["input_name"] == "ckpt_name", error
        assert "deleted-meanwhile.safetensors" in error["details"], error
