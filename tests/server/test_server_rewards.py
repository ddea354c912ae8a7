"""The score -> filter -> save part of the loop through a real ComfyUI server's HTTP API.

ComfyUI (``COMFYUI_PATH``) is started with the pack linked into its custom_nodes (harness.py); the
tests check the pack imports cleanly, its nodes are listed by /object_info, and API-format graphs
queued with POST /prompt run (or are refused) as a user's would: LoadImage -> Load Scorers (weight-
free analytic scorers) -> Score Images -> Filter Best Per Prompt -> Save Training Set. Expected
results are recomputed here from the same images with the library, not hard-coded.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from harness import PromptFailed, PromptRejected
from PIL import Image

from versat2i.training_set.layout import CAPTION_SUFFIX, MANIFEST_NAME, SUMMARY_NAME

pytestmark = pytest.mark.server

OUR_NODES = {
    "VersaT2I_LoadScorers": "VersaT2I/score",
    "VersaT2I_ScoreImages": "VersaT2I/score",
    "VersaT2I_FilterBestPerPrompt": "VersaT2I/dataset",
    "VersaT2I_SaveTrainingSet": "VersaT2I/dataset",
}
SCORER_CHOICES = {"aesthetics": "analytic:contrast", "alignment": "disabled", "geometry": "disabled",
                  "lowlevel": "analytic:sharpness"}
PROMPTS = ["a red fox in the snow", "a blue bird on a branch"]
CANDIDATES = 3  # per prompt; the batch holds them consecutively


def candidate_frames(count: int = len(PROMPTS) * CANDIDATES, size: int = 32) -> list[np.ndarray]:
    """uint8 RGB frames with different blur and contrast, so the analytic scores differ."""
    rng = np.random.default_rng(7)
    frames = []
    for i in range(count):
        noise = rng.random((size, size, 3))
        for _ in range(i % 3):  # box blur, more for later candidates of a prompt
            noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) / 4
        contrast = 0.4 + 0.6 * ((i * 5) % 7) / 6
        frames.append(np.clip((0.5 + (noise - 0.5) * contrast) * 255, 0, 255).round().astype(np.uint8))
    return frames


def multi_frame_image(frames: list[np.ndarray]) -> bytes:
    """One file holding the whole batch: LoadImage returns every frame of an animated image. A
    lossless animated WebP (exact pixels): ComfyUI 0.33 reads images with pyav first, which returns
    one page of a multi-page TIFF, and falls back to PIL (every frame) for animated WebP."""
    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], lossless=True, duration=100)
    return buffer.getvalue()


def pipeline_graph(image_name: str, dataset_name: str, **overrides) -> dict:
    """API-format graph: LoadImage -> Load Scorers -> Score Images -> Filter -> Save Training Set."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VersaT2I_LoadScorers", "inputs": {**SCORER_CHOICES, "device": "auto"}},
        "3": {"class_type": "VersaT2I_ScoreImages", "inputs": {
            "images": ["1", 0], "scorers": ["2", 0], "prompts": "\n".join(PROMPTS), "seeds": "1001 2002",
            "offload_after_scoring": True}},
        "4": {"class_type": "VersaT2I_FilterBestPerPrompt", "inputs": {
            "scores": ["3", 0], "images": ["1", 0], "threshold_kind": "none", "threshold": 50.0,
            "aspect_thresholds": "", "images_for": "all aspects"}},
        "5": {"class_type": "VersaT2I_SaveTrainingSet", "inputs": {
            "selection": ["4", 0], "images": ["1", 0], "name": dataset_name, "repeats": 4, "overwrite": False}},
    }
    for key, value in overrides.items():  # "3.prompts": "..." sets node 3's input "prompts"
        node, _, name = key.partition(".")
        graph[node]["inputs"][name] = value
    return graph


@pytest.fixture(scope="module")
def uploaded(comfy_server) -> tuple[str, list[np.ndarray]]:
    frames = candidate_frames()
    return comfy_server.upload_input("candidates.webp", multi_frame_image(frames)), frames


def test_pack_imports_and_lists_its_nodes(comfy_server):
    imported = comfy_server.pack_import()
    assert imported.seen, f"ComfyUI did not load the pack\n{comfy_server.log_tail()}"
    assert not imported.failed, "the pack failed to import:\n" + "\n".join(imported.messages)
    listed = comfy_server.nodes_of_pack()
    for node_id, category in OUR_NODES.items():
        assert node_id in listed, f"{node_id} missing from /object_info; ours: {sorted(listed)}"
        assert listed[node_id]["category"] == category
    load = listed["VersaT2I_LoadScorers"]["input"]["required"]
    assert "analytic:sharpness" in load["lowlevel"][1]["options"]
    # the embedded demo world's scorers (demo:<aspect>) are only registered by `versat2i demo`
    assert not [o for a in ("aesthetics", "alignment", "geometry", "lowlevel") for o in load[a][1]["options"]
                if o.startswith("demo:")]
    assert listed["VersaT2I_SaveTrainingSet"]["output_node"] is True
    assert listed["VersaT2I_ScoreImages"]["output"][0] == "VERSAT2I_SCORES"


def test_score_filter_save_graph_writes_the_training_set(comfy_server, uploaded, server_output):
    image_name, frames = uploaded
    entry = comfy_server.run(pipeline_graph(image_name, "server/run1"), timeout=300)

    previews = entry["outputs"]["3"]["images"]  # Score Images' labelled previews, in the temp folder
    assert len(previews) == len(frames)
    assert all((comfy_server.base_dir / "temp" / p["subfolder"] / p["filename"]).is_file() for p in previews)
    save_ui = entry["outputs"]["5"]["text"][0]
    assert "server/run1" in save_ui
    dataset = server_output / "server" / "run1"
    assert dataset.is_dir(), f"no dataset written; outputs: {entry['outputs']}"

    # Expected selection, recomputed here with the library from the same pixels.
    from versat2i.rewards.registry import get_scorer

    pixels = torch.from_numpy(np.stack(frames)).float() / 255
    prompts = [p for p in PROMPTS for _ in range(CANDIDATES)]
    expected = {}
    for aspect in ("aesthetics", "lowlevel"):
        values = get_scorer(SCORER_CHOICES[aspect]).score(pixels, prompts).tolist()
        expected[aspect] = {
            prompt: max(range(prompt * CANDIDATES, (prompt + 1) * CANDIDATES), key=lambda r: (values[r], -r))
            for prompt in range(len(PROMPTS))
        }
        assert len(set(values)) == len(values), "the test frames must score differently"

    manifest = [json.loads(line) for line in (dataset / MANIFEST_NAME).read_text().splitlines()]
    assert sorted((e["aspect"], e["prompt_index"]) for e in manifest) == [
        (a, p) for a in ("aesthetics", "lowlevel") for p in range(len(PROMPTS))
    ]
    files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(
        [MANIFEST_NAME, SUMMARY_NAME]
        + [e["file"] for e in manifest] + [e["file"][:-4] + CAPTION_SUFFIX for e in manifest]
    )
    for e in manifest:
        row = expected[e["aspect"]][e["prompt_index"]]
        assert e["candidate_index"] == row % CANDIDATES
        assert e["prompt"] == PROMPTS[e["prompt_index"]] and e["seed"] == [1001, 2002][e["prompt_index"]]
        assert e["scorer"] == {"id": SCORER_CHOICES[e["aspect"]], "weights_hash": "none"}
        assert e["file"].startswith(f"4_{e['aspect']}/")
        assert (dataset / e["file"][:-4]).with_suffix(CAPTION_SUFFIX).read_text() == e["prompt"]
        saved = np.array(Image.open(dataset / e["file"]).convert("RGB"))
        assert np.array_equal(saved, frames[row]), f"{e['file']} is not candidate frame {row}"
    summary = json.loads((dataset / SUMMARY_NAME).read_text())
    assert summary["images_scored"] == len(frames) and summary["images_kept"] == len(manifest)


def test_unknown_scorer_in_a_combo_is_one_error_naming_the_input(comfy_server, uploaded, server_output):
    """ComfyUI 0.33 checks V3 combo values when the prompt is queued (one error, on that input);
    0.3.64 lets them through, and Load Scorers refuses the value when it runs, naming the input.
    Nothing is written either way."""
    graph = pipeline_graph(uploaded[0], "server/never", **{"2.lowlevel": "analytic:no-such-stat"})
    try:
        prompt_id = comfy_server.queue(graph)
    except PromptRejected as refused:
        (error,) = refused.node_errors["2"]["errors"]
        assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == "lowlevel"
        assert "analytic:no-such-stat" in error["details"]
    else:
        with pytest.raises(PromptFailed, match=r"node 2 \(VersaT2I_LoadScorers\) raised ValueError: lowlevel: unknown "
                                               r"scorer 'analytic:no-such-stat'"):
            comfy_server.wait(prompt_id, timeout=120)
    assert not (server_output / "server" / "never").exists()


@pytest.mark.parametrize("name", ["../escaped", "/tmp/versat2i-escaped", "a/../../escaped"])
def test_dataset_name_outside_output_is_refused(comfy_server, uploaded, server_output, name):
    with pytest.raises(PromptRejected) as refused:
        comfy_server.queue(pipeline_graph(uploaded[0], name))
    assert "name" in refused.value.details()
    assert not (server_output.parent / "escaped").exists()
    assert not (comfy_server.base_dir.parent / "escaped").exists()


def test_node_errors_reach_the_user(comfy_server, uploaded, server_output):
    # 4 prompt lines can't be matched with 6 images: the run fails with the node's message.
    graph = pipeline_graph(uploaded[0], "server/bad-prompts", **{"3.prompts": "a\nb\nc\nd"})
    with pytest.raises(PromptFailed, match=r"4 prompt line\(s\) for 6 image"):
        comfy_server.run(graph, timeout=120)
    assert not (server_output / "server" / "bad-prompts").exists()


def file_states(folder) -> dict:
    """Every file's bytes and identity (inode, mtime): a rewrite with equal bytes still changes it."""
    return {p: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_saving_the_same_set_again_after_a_cache_clear_rewrites_nothing(comfy_server, uploaded, server_output):
    """Queued again unchanged after ComfyUI's cache was cleared, Save Training Set runs again and
    finds the set it wrote (same content fingerprint): no error, nothing rewritten. A different set
    under the same name is refused, in the words of the node's inputs, with a readable error type."""
    graph = pipeline_graph(uploaded[0], "server/requeue")
    comfy_server.run(graph, timeout=300)
    dataset = server_output / "server" / "requeue"
    written = file_states(dataset)
    comfy_server.clear_cache()  # drops ComfyUI's cached outputs
    again = comfy_server.run(graph, timeout=300)
    assert "unchanged, reused (same content)" in again["outputs"]["5"]["text"][0]
    assert file_states(dataset) == written
    with pytest.raises(PromptFailed) as refused:
        comfy_server.run(pipeline_graph(uploaded[0], "server/requeue", **{"5.repeats": 7}), timeout=300)
    message = str(refused.value)
    assert "(VersaT2I_SaveTrainingSet) raised versat2i.safe_io.TargetExistsError:" in message
    assert "holds other content" in message and "turn on 'overwrite' in Save Training Set" in message
    assert file_states(dataset) == written


def test_missing_weights_error_names_the_file_and_folder(comfy_server, uploaded):
    graph = pipeline_graph(uploaded[0], "server/no-weights", **{"2.aesthetics": "laion-aesthetic-v2"})
    with pytest.raises(PromptFailed) as failed:
        comfy_server.run(graph, timeout=120)
    message = str(failed.value)
    assert "raised versat2i.rewards.weights.MissingWeightsError:" in message  # a readable type, not a path
    assert str(comfy_server.base_dir / "models" / "versat2i") in message
    assert "turn on 'download_missing' in Load Scorers" in message


def ui_workflow(image_name: str, dataset_name: str) -> dict:
    """The same pipeline as a UI-format workflow (format 0.4, as the frontend saves it), with a
    Reroute on the image wire and a Note, to check ``workflow_to_api`` against the real node
    definitions (widget order and counts come from /object_info)."""
    def node(node_id, kind, widgets=None, inputs=(), outputs=(), mode=0):
        return {"id": node_id, "type": kind, "mode": mode, "widgets_values": widgets,
                "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
                "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs]}

    nodes = [
        node(1, "LoadImage", [image_name, "image"], outputs=[("IMAGE", "IMAGE", [1, 2]), ("MASK", "MASK", [])]),
        node(9, "Reroute", inputs=[("", "*", 2)], outputs=[("", "IMAGE", [3, 4])]),
        node(2, "VersaT2I_LoadScorers", [*SCORER_CHOICES.values(), "auto", "clip/open_clip_model.safetensors",
                                         "aesthetic/sac+logos+ava1-l14-linearMSE.pth", False],
             outputs=[("scorers", "VERSAT2I_SCORERS", [5])]),
        node(3, "VersaT2I_ScoreImages", ["\n".join(PROMPTS), "1001 2002", True],
             inputs=[("images", "IMAGE", 1), ("scorers", "VERSAT2I_SCORERS", 5),
                     ("candidates", "VERSAT2I_CANDIDATES", None)],
             outputs=[("scores", "VERSAT2I_SCORES", [6])]),
        node(4, "VersaT2I_FilterBestPerPrompt", ["percentile", 0.0, "lowlevel = none", "lowlevel"],
             inputs=[("scores", "VERSAT2I_SCORES", 6), ("images", "IMAGE", 3)],
             outputs=[("selection", "VERSAT2I_SELECTION", [7])]),
        node(5, "VersaT2I_SaveTrainingSet", [dataset_name, 2, False],
             inputs=[("selection", "VERSAT2I_SELECTION", 7), ("images", "IMAGE", 4)]),
        node(6, "Note", ["converted and queued by tests/server/harness.py"]),
    ]
    links = [[1, 1, 0, 3, 0, "IMAGE"], [2, 1, 0, 9, 0, "IMAGE"], [3, 9, 0, 4, 1, "IMAGE"], [4, 9, 0, 5, 1, "IMAGE"],
             [5, 2, 0, 3, 1, "VERSAT2I_SCORERS"], [6, 3, 0, 4, 0, "VERSAT2I_SCORES"],
             [7, 4, 0, 5, 0, "VERSAT2I_SELECTION"]]
    return {"version": 0.4, "last_node_id": 9, "last_link_id": 7, "nodes": nodes, "links": links, "groups": []}


def test_ui_format_workflow_converts_and_runs(comfy_server, uploaded, server_output):
    from harness import workflow_to_api

    graph = workflow_to_api(ui_workflow(uploaded[0], "server/from-ui"), comfy_server.object_info())
    assert set(graph) == {"1", "2", "3", "4", "5"}  # Reroute and Note are frontend-only
    assert graph["4"]["inputs"]["images"] == ["1", 0]  # through the Reroute
    assert graph["3"]["inputs"]["offload_after_scoring"] is True and "candidates" not in graph["3"]["inputs"]
    comfy_server.run(graph, timeout=300)
    summary = json.loads((server_output / "server" / "from-ui" / SUMMARY_NAME).read_text())
    assert {a: s["folder"] for a, s in summary["aspects"].items()} == {"aesthetics": "2_aesthetics",
                                                                       "lowlevel": "2_lowlevel"}
    assert summary["aspects"]["lowlevel"]["threshold"]["kind"] == "none"  # the per-aspect override
    from versat2i.rewards.registry import get_scorer

    pixels = torch.from_numpy(np.stack(uploaded[1])).float() / 255
    contrast = get_scorer(SCORER_CHOICES["aesthetics"]).score(pixels, [""] * len(uploaded[1]))
    threshold = summary["aspects"]["aesthetics"]["threshold"]
    assert threshold["kind"] == "percentile" and threshold["value"] == 0.0
    assert threshold["resolved"] == pytest.approx(float(contrast.min()), rel=1e-6)  # p0 = the pool's minimum
    assert summary["images_kept"] == 2 * len(PROMPTS)  # p0 keeps every best


def test_workflow_with_wrong_widget_count_is_refused(comfy_server, uploaded):
    from harness import WorkflowError, workflow_to_api

    workflow = ui_workflow(uploaded[0], "server/never")
    workflow["nodes"][2]["widgets_values"].append("stray")  # Load Scorers gets one value too many
    with pytest.raises(WorkflowError, match="VersaT2I_LoadScorers"):
        workflow_to_api(workflow, comfy_server.object_info())


# -- the harness's UI -> API converter on frontend quirks (no server needed) -------------------------------

FAKE_OBJECT_INFO = {
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20}], "sampler_name": [["euler", "ddim"], {}],
    }}, "input_order": {"required": ["model", "seed", "steps", "sampler_name"]}},
    "LoadModel": {"input": {"required": {"name": [["a.ckpt", "b.ckpt"], {}]}},
                  "input_order": {"required": ["name"]}},
    "Upscale": {"input": {"required": {"model": ["MODEL", {}], "factor": ["FLOAT", {"default": 2.0}]}},
                "input_order": {"required": ["model", "factor"]}},
}


def fake_workflow(seed_widgets, *, upscale_mode=0, with_primitive=False):
    nodes = [
        {"id": 1, "type": "LoadModel", "mode": 0, "widgets_values": ["b.ckpt"],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
        {"id": 2, "type": "Upscale", "mode": upscale_mode, "widgets_values": [1.5],
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}]},
        {"id": 3, "type": "KSampler", "mode": 0, "widgets_values": seed_widgets,
         "inputs": [{"name": "model", "type": "MODEL", "link": 2},
                    {"name": "steps", "type": "INT", "link": 3 if with_primitive else None,
                     "widget": {"name": "steps"}}]},
    ]
    links = [{"id": 1, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "MODEL"},
             {"id": 2, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "MODEL"}]
    if with_primitive:
        nodes.append({"id": 4, "type": "PrimitiveNode", "mode": 0, "widgets_values": [7, "fixed"],
                      "outputs": [{"name": "INT", "type": "INT", "links": [3]}]})
        links.append({"id": 3, "origin_id": 4, "origin_slot": 0, "target_id": 3, "target_slot": 1, "type": "INT"})
    return {"version": 1, "nodes": nodes, "links": links}


@pytest.mark.parametrize("seed_widgets", [[5, "randomize", 30, "ddim"], [5, True, 30, "ddim"], [5, 30, "ddim"]],
                         ids=["control-value", "old-boolean-control", "no-control-value"])
def test_converter_skips_frontend_only_seed_control_values(seed_widgets):
    from harness import workflow_to_api

    graph = workflow_to_api(fake_workflow(seed_widgets), FAKE_OBJECT_INFO)
    assert graph["3"]["inputs"] == {"model": ["2", 0], "seed": 5, "steps": 30, "sampler_name": "ddim"}
    assert graph["1"]["inputs"] == {"name": "b.ckpt"}


def test_converter_bypass_mute_primitive_and_defaults():
    from harness import WorkflowError, workflow_to_api

    bypassed = workflow_to_api(fake_workflow([5, "fixed", 30, "ddim"], upscale_mode=4), FAKE_OBJECT_INFO)
    assert "2" not in bypassed and bypassed["3"]["inputs"]["model"] == ["1", 0]  # fed from the bypassed input
    muted = workflow_to_api(fake_workflow([5, "fixed", 30, "ddim"], upscale_mode=2), FAKE_OBJECT_INFO)
    assert "2" not in muted and "model" not in muted["3"]["inputs"]
    primitive = workflow_to_api(fake_workflow([5, "fixed", 30, "ddim"], with_primitive=True), FAKE_OBJECT_INFO)
    assert primitive["3"]["inputs"]["steps"] == 7 and "4" not in primitive
    no_values = fake_workflow(None)
    assert workflow_to_api(no_values, FAKE_OBJECT_INFO)["3"]["inputs"] == {
        "model": ["2", 0], "seed": 0, "steps": 20, "sampler_name": "euler"}  # the frontend's defaults
    with pytest.raises(WorkflowError, match="KSampler"):
        workflow_to_api(fake_workflow([5, "fixed", 30]), FAKE_OBJECT_INFO)  # one widget value missing
    unknown = fake_workflow([5, 30, "ddim"])
    unknown["nodes"][0]["type"] = "NotInstalled"
    with pytest.raises(WorkflowError, match="not installed"):
        workflow_to_api(unknown, FAKE_OBJECT_INFO)
