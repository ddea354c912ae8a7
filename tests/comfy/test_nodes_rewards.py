"""The four score/dataset nodes inside a real ComfyUI (imported in-process, CPU): Load Scorers,
Score Images, Filter Best Per Prompt, Save Training Set.

The node classes are the ones ComfyUI registers; tests call their ``execute`` / ``validate_inputs``
directly with small images and the weight-free analytic scorers. Expected values are computed
independently (each image scored alone, best-per-prompt by hand), never hard-coded. Skipped with a
printed reason when ``COMFYUI_PATH`` is not set. Offline: no weights, no network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from versat2i.training_set.layout import CAPTION_SUFFIX, MANIFEST_NAME, SUMMARY_NAME

pytestmark = pytest.mark.comfy

LOAD, SCORE, FILTER, SAVE = (
    "VersaT2I_LoadScorers", "VersaT2I_ScoreImages", "VersaT2I_FilterBestPerPrompt", "VersaT2I_SaveTrainingSet",
)
ANALYTIC = {"aesthetics": "analytic:contrast", "alignment": "disabled", "geometry": "analytic:colourfulness",
            "lowlevel": "analytic:sharpness"}


def textured_images(count: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """``count`` RGB images [B,H,W,3] in 0..1 with different amounts of blur, colour and contrast,
    so the analytic scores differ from image to image."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        noise = torch.rand(1, 3, size, size, generator=generator)
        blur = 1 + (i * 7) % 5
        if blur > 1:
            noise = torch.nn.functional.avg_pool2d(noise, blur, stride=1, padding=blur // 2, count_include_pad=False)
            noise = noise[..., :size, :size]
        tint = torch.rand(3, 1, 1, generator=generator)
        image = (noise[0] * (0.3 + 0.7 * tint)).clamp(0, 1)
        images.append(image.permute(1, 2, 0))
    return torch.stack(images)


def with_nan(images: torch.Tensor) -> torch.Tensor:
    images = images.clone()
    images[1, 3, 3, 0] = float("nan")
    return images


def with_inf(images: torch.Tensor) -> torch.Tensor:
    images = images.clone()
    images[0, 2, 5, 1] = float("inf")
    return images


# The same batch of 4 scored images made unusable in each of the ways the issue lists.
BAD_IMAGE_BATCHES = {
    "nan": (lambda: with_nan(textured_images(4)), "NaN"),
    "inf": (lambda: with_inf(textured_images(4)), "inf"),
    "rgba": (lambda: torch.rand(4, 24, 24, 4), "RGBA"),
    "gray": (lambda: torch.rand(4, 24, 24, 1), "grayscale"),
    "empty": (lambda: torch.rand(0, 24, 24, 3), "empty"),
}


@pytest.fixture
def nodes(comfy_nodes, comfy_dirs):
    return comfy_nodes


@pytest.fixture
def scorers(nodes):
    return nodes[LOAD].execute(device="auto", **ANALYTIC)[0]


def score(nodes, scorers, images, prompts, seeds="", **kwargs):
    return nodes[SCORE].execute(images=images, scorers=scorers, prompts=prompts, seeds=seeds, **kwargs)


# -- registration ----------------------------------------------------------------------------------

def test_nodes_have_stable_ids_categories_and_tooltips(comfy_nodes):
    expected = {LOAD: "VersaT2I/score", SCORE: "VersaT2I/score", FILTER: "VersaT2I/dataset", SAVE: "VersaT2I/dataset"}
    for node_id, category in expected.items():
        assert node_id in comfy_nodes, f"{node_id} is not registered"
        schema = comfy_nodes[node_id].GET_SCHEMA()
        assert schema.category == category
        assert schema.description
        for socket in [*schema.inputs, *schema.outputs]:
            assert socket.tooltip, f"{node_id}.{socket.id} has no tooltip"
    assert comfy_nodes[SAVE].GET_SCHEMA().is_output_node
    # V1 info as /object_info serves it: our custom socket types are wired between our nodes.
    assert comfy_nodes[LOAD].RETURN_TYPES[0] == "VERSAT2I_SCORERS"
    assert comfy_nodes[SCORE].RETURN_TYPES[0] == "VERSAT2I_SCORES"
    assert comfy_nodes[FILTER].RETURN_TYPES[0] == "VERSAT2I_SELECTION"


def test_loading_the_pack_in_comfyui_imports_no_heavy_library(comfyui_path, tmp_path):
    """ComfyUI's own load_custom_node on a custom_nodes link, in a fresh interpreter: the node list
    is built without importing diffusers, open_clip, peft, pyiqa, mediapipe or accelerate (they load
    when a node runs, so ComfyUI start-up stays fast)."""
    import subprocess
    import sys

    import versat2i

    link = tmp_path / "custom_nodes" / "ComfyUI-VersaT2I"
    link.parent.mkdir()
    link.symlink_to(Path(versat2i.__file__).resolve().parent, target_is_directory=True)
    code = (
        "import asyncio, json, sys\n"
        f"sys.path.insert(0, {str(comfyui_path)!r})\n"
        "from comfy.cli_args import args\n"
        "args.cpu = True\n"
        "import nodes\n"
        "before = set(sys.modules)\n"
        f"ok = asyncio.run(nodes.load_custom_node({str(link)!r}, module_parent='custom_nodes'))\n"
        "added = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "print('RESULT', json.dumps({'ok': ok, 'added': added, 'nodes': sorted(nodes.NODE_CLASS_MAPPINGS)}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    report = json.loads(lines[-1][len("RESULT "):])
    assert report["ok"], f"ComfyUI failed to load the pack:\n{result.stderr[-3000:]}"
    assert {LOAD, SCORE, FILTER, SAVE} <= set(report["nodes"])
    heavy = {"diffusers", "open_clip", "peft", "pyiqa", "mediapipe", "accelerate"} & set(report["added"])
    assert not heavy, f"building the node list imported {sorted(heavy)}; import them inside functions"


# -- Load Scorers ------------------------------------------------------------------------------------

def test_load_scorers_builds_enabled_aspects_and_caches_them(nodes):
    first = nodes[LOAD].execute(device="auto", **ANALYTIC)[0]
    assert set(first) == {"aesthetics", "geometry", "lowlevel"}  # "disabled" is skipped
    assert first["lowlevel"].scorer_id == "analytic:sharpness"
    assert str(first["lowlevel"].device) == "cpu"  # auto = ComfyUI's device, CPU under --cpu
    again = nodes[LOAD].execute(device="cpu", **ANALYTIC)[0]
    assert all(again[aspect] is first[aspect] for aspect in first), "a second load must reuse the cached scorers"


def test_load_scorers_defaults_come_from_the_registry(nodes):
    from versat2i.rewards.registry import DEFAULT_SCORERS

    schema = nodes[LOAD].GET_SCHEMA()
    defaults = {i.id: i.default for i in schema.inputs}
    assert {a: defaults[a] for a in DEFAULT_SCORERS} == DEFAULT_SCORERS
    options = next(i for i in schema.inputs if i.id == "lowlevel").options
    assert "disabled" in options and "analytic:sharpness" in options
    # the embedded demo world's scorers are registered by `versat2i demo` only, never in ComfyUI
    for aspect in DEFAULT_SCORERS:
        assert not [o for o in next(i for i in schema.inputs if i.id == aspect).options if o.startswith("demo:")]


def test_load_scorers_refuses_unknown_values_naming_the_input(nodes):
    """ComfyUI 0.3.64 lets V3 combo values through (0.33 checks them itself): the node refuses them
    when it runs, naming the input. Its validate_inputs only takes the weight-file inputs, to turn off
    0.33's list check for them (a missing published file can be downloaded), and never fails."""
    import inspect

    load = nodes[LOAD]
    assert list(inspect.signature(load.validate_inputs).parameters) == ["clip_weights", "aesthetic_weights"]
    assert load.validate_inputs(clip_weights="clip/not-there.safetensors") is True
    with pytest.raises(ValueError, match="lowlevel: unknown scorer 'analytic:sharpnes'.*analytic:sharpness"):
        load.execute(device="auto", **{**ANALYTIC, "lowlevel": "analytic:sharpnes"})
    with pytest.raises(ValueError, match="device: 'gpu9'"):
        load.execute(device="gpu9", **ANALYTIC)
    everything_off = {aspect: "disabled" for aspect in ANALYTIC}
    with pytest.raises(ValueError, match="at least one"):
        load.execute(device="auto", **everything_off)


def test_load_scorers_missing_weights_names_file_and_folder(nodes, comfy_dirs):
    from versat2i.rewards.weights import MissingWeightsError

    with pytest.raises(MissingWeightsError) as caught:
        nodes[LOAD].execute(device="cpu", **{**ANALYTIC, "aesthetics": "laion-aesthetic-v2"})
    message = str(caught.value)
    assert "sac+logos+ava1-l14-linearMSE.pth" in message or "ViT-L-14" in message
    assert str(comfy_dirs["models"] / "versat2i") in message  # the folder to put it in
    assert listing(comfy_dirs["models"]) == listing(comfy_dirs["output"]) == listing(comfy_dirs["temp"]) == []


# -- Score Images -------------------------------------------------------------------------------------

def test_score_images_scores_each_image_as_if_alone(nodes, scorers):
    images = textured_images(6)
    out = score(nodes, scorers, images, "a red fox\n\na blue bird\n", seeds="11, 22")
    table, aesthetics, alignment, geometry, lowlevel, text, preview = out.args
    # 2 prompt lines for 6 images: 2 groups of 3 consecutive candidates; one seed per prompt line.
    assert table.prompts == ["a red fox"] * 3 + ["a blue bird"] * 3
    assert table.prompt_indices == [0, 0, 0, 1, 1, 1]
    assert table.candidate_indices == [0, 1, 2, 0, 1, 2]
    assert table.seeds == [11, 11, 11, 22, 22, 22]
    assert alignment == []  # disabled aspect: empty list
    for aspect, values in (("aesthetics", aesthetics), ("geometry", geometry), ("lowlevel", lowlevel)):
        alone = [float(scorers[aspect].score(images[i:i + 1], [table.prompts[i]])[0]) for i in range(6)]
        assert values == pytest.approx(alone, rel=1e-5, abs=1e-6)
        assert len({round(v, 6) for v in values}) > 1, f"{aspect}: the test images must not all score the same"
    assert "analytic:sharpness" in text and "a red fox" in text
    # Preview: same batch, upscaled to >= 256 px, labelled (so it differs from a plain upscale).
    assert preview.shape[0] == 6 and preview.shape[2] >= 256 and preview.shape[-1] == 3
    plain = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=preview.shape[1:3], mode="nearest")
    assert not torch.allclose(preview, plain.permute(0, 2, 3, 1), atol=1 / 255)
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0


def test_score_images_ui_preview_and_table(nodes, scorers, comfy_dirs):
    out = score(nodes, scorers, textured_images(2), "one\ntwo")
    ui = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    assert len(ui["images"]) == 2
    for item in ui["images"]:
        assert (comfy_dirs["temp"] / item["subfolder"] / item["filename"]).is_file()
    assert "one" in ui["text"][0]


def test_score_images_prompt_and_seed_layouts(nodes, scorers):
    images = textured_images(4)
    per_image = score(nodes, scorers, images, "a\nb\na\nc", seeds="1 2 3 4")[0]
    assert per_image.prompt_indices == [0, 1, 0, 2]  # identical lines are one prompt
    assert per_image.candidate_indices == [0, 0, 1, 0]
    assert per_image.seeds == [1, 2, 3, 4]
    one_seed = score(nodes, scorers, images, "a single prompt", seeds="7")[0]
    assert one_seed.prompts == ["a single prompt"] * 4 and one_seed.seeds == [7] * 4
    no_seed = score(nodes, scorers, images, "x\ny")[0]
    assert no_seed.seeds == [None] * 4


def test_score_images_takes_prompts_and_seeds_from_candidates(nodes, scorers):
    candidates = {"prompts": ["p", "p", "q", "q"], "seeds": [5, 6, 7, 8],
                  "prompt_indices": [0, 0, 1, 1], "candidate_indices": [0, 1, 0, 1]}
    table = score(nodes, scorers, textured_images(4), "ignored when candidates are connected",
                  candidates=candidates)[0]
    assert table.prompts == candidates["prompts"] and table.seeds == candidates["seeds"]
    assert table.candidate_indices == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="candidates: 4 seeds for 3 image"):
        score(nodes, scorers, textured_images(3), "", candidates={**candidates, "prompts": ["p", "p", "q"]})


@pytest.mark.parametrize(
    ("prompts", "seeds", "images", "match"),
    [
        ("a\nb\nc", "", textured_images(4), r"3 prompt line\(s\) for 4 image"),
        ("", "", textured_images(2), "no prompt given"),
        ("a\nb", "1 2 3", textured_images(4), "3 seeds for 4 image"),
        ("a", "twelve", textured_images(2), "'twelve' is not a whole number"),
        ("a", "", with_nan(textured_images(2)), "NaN"),
        ("a", "", with_inf(textured_images(2)), "inf"),
        ("a", "", torch.rand(2, 24, 24, 4), "RGBA"),
        ("a", "", torch.rand(2, 24, 24, 1), "grayscale"),
        ("a", "", torch.rand(0, 24, 24, 3), "empty"),
    ],
    ids=["prompt-count", "no-prompt", "seed-count", "seed-text", "nan", "inf", "rgba", "gray", "empty"],
)
def test_score_images_bad_inputs_are_clear_errors(nodes, scorers, comfy_dirs, prompts, seeds, images, match):
    with pytest.raises(ValueError, match=match):
        score(nodes, scorers, images, prompts, seeds=seeds)
    assert listing(comfy_dirs["temp"]) == [] and listing(comfy_dirs["output"]) == [], "no preview may be written"


def test_score_images_needs_load_scorers_output(nodes):
    with pytest.raises(ValueError, match="Load Scorers"):
        score(nodes, {"lowlevel": "analytic:sharpness"}, textured_images(2), "a")


def test_score_images_honours_cancel(nodes, scorers, comfy):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            score(nodes, scorers, textured_images(2), "a")
    finally:
        mm.interrupt_current_processing(False)


# -- Filter Best Per Prompt ------------------------------------------------------------------------------

def best_rows(values, prompt_indices):
    """Best row per prompt, ties to the earliest row, computed without the library."""
    best = {}
    for row, (value, prompt) in enumerate(zip(values, prompt_indices)):
        if prompt not in best or value > values[best[prompt]]:
            best[prompt] = row
    return best


def test_filter_keeps_best_image_of_each_prompt_per_aspect(nodes, scorers):
    images = textured_images(6)
    table = score(nodes, scorers, images, "fox\nbird")[0]
    out = nodes[FILTER].execute(scores=table, images=images, threshold_kind="none", threshold=0.0)
    selected, kept, discarded, summary = out.args
    assert selected.table is table
    for aspect in table.aspects:
        expected = best_rows(table.scores[aspect], table.prompt_indices)
        assert list(selected.selection.aspects[aspect].kept) == [expected[0], expected[1]]
    union = sorted({row for s in selected.selection.aspects.values() for row in s.kept})
    assert torch.equal(kept, images[union])
    assert torch.equal(discarded, images[[r for r in range(6) if r not in union]])
    assert "kept 2 of 2 prompts" in summary and "*" in summary


def test_filter_absolute_percentile_and_per_aspect_thresholds(nodes, scorers):
    images = textured_images(6)
    table = score(nodes, scorers, images, "fox\nbird")[0]
    sharp = table.scores["lowlevel"]
    bests = best_rows(sharp, table.prompt_indices)
    cut = (sharp[bests[0]] + sharp[bests[1]]) / 2  # between the two bests: exactly one passes
    out = nodes[FILTER].execute(scores=table, images=images, threshold_kind="absolute", threshold=1e9,
                                aspect_thresholds=f"lowlevel = {cut!r}\ngeometry: none", images_for="lowlevel")
    selection = out[0].selection
    assert list(selection.aspects["lowlevel"].kept) == [max(bests.values(), key=lambda r: sharp[r])]
    assert len(selection.aspects["geometry"].kept) == 2  # override "none" keeps every best
    assert selection.aspects["aesthetics"].kept == ()  # the shared absolute 1e9 keeps nothing
    assert out[1].shape[0] == 1 and out[2].shape[0] == 5  # images_for = lowlevel
    # percentile 100 keeps only a best equal to the pool's maximum
    top = nodes[FILTER].execute(scores=table, images=images, threshold_kind="percentile", threshold=100.0)[0]
    assert list(top.selection.aspects["lowlevel"].kept) == [max(range(6), key=lambda r: sharp[r])]


def test_filter_blocks_empty_image_outputs(nodes, scorers):
    from comfy_execution.graph_utils import ExecutionBlocker

    images = textured_images(2)
    table = score(nodes, scorers, images, "a\nb")[0]  # one candidate per prompt: every image is a best
    out = nodes[FILTER].execute(scores=table, images=images, threshold_kind="none", threshold=0.0)
    assert out[1].shape[0] == 2 and isinstance(out[2], ExecutionBlocker)


def test_filter_bad_inputs(nodes, scorers):
    images = textured_images(4)
    table = score(nodes, scorers, images, "a\nb")[0]
    filt = nodes[FILTER]
    with pytest.raises(ValueError, match="4 were scored"):
        filt.execute(scores=table, images=images[:3], threshold_kind="none", threshold=0.0)
    with pytest.raises(ValueError, match="Score Images"):
        filt.execute(scores={"lowlevel": [1.0]}, images=images, threshold_kind="none", threshold=0.0)
    with pytest.raises(ValueError, match="alignment.*not scored"):
        filt.execute(scores=table, images=images, threshold_kind="none", threshold=0.0,
                     aspect_thresholds="alignment = p50")
    # validate_inputs takes the free-text thresholds only (one input: its message lands there alone)
    assert filt.validate_inputs(aspect_thresholds="") is True
    for bad in ("beauty = 3", "lowlevel 3", "lowlevel = high"):
        assert isinstance(filt.validate_inputs(aspect_thresholds=bad), str), bad
    for bad, message in (({"threshold_kind": "median", "threshold": 1.0}, "threshold_kind: 'median'"),
                         ({"threshold_kind": "percentile", "threshold": 150.0}, "between 0 and 100"),
                         ({"images_for": "everything"}, "images_for: 'everything'")):
        with pytest.raises(ValueError, match=message):  # checked when the node runs, naming the input
            filt.execute(scores=table, images=images, **{"threshold_kind": "none", "threshold": 0.0, **bad})


# -- Save Training Set ------------------------------------------------------------------------------------

def filtered(nodes, scorers, images, prompts="fox\nbird", **kwargs):
    table = score(nodes, scorers, images, prompts, seeds="100 200")[0]
    kwargs.setdefault("threshold_kind", "none")
    kwargs.setdefault("threshold", 0.0)
    return nodes[FILTER].execute(scores=table, images=images, **kwargs)[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_save_training_set_writes_kohya_layout_and_manifest(nodes, scorers, comfy_dirs):
    images = textured_images(6)
    selected = filtered(nodes, scorers, images)
    out = nodes[SAVE].execute(selection=selected, images=images, name="runs/first", repeats=3, overwrite=False)
    assert out[0] == "runs/first"
    dataset = comfy_dirs["output"] / "runs" / "first"
    manifest = [json.loads(line) for line in (dataset / MANIFEST_NAME).read_text().splitlines()]
    table = selected.table
    assert len(manifest) == sum(len(s.kept) for s in selected.selection.aspects.values()) == 6
    for entry in manifest:
        aspect = entry["aspect"]
        assert entry["file"].startswith(f"3_{aspect}/")
        row = next(r for r in selected.selection.aspects[aspect].kept
                   if (table.prompt_indices[r], table.candidate_indices[r]) == (entry["prompt_index"],
                                                                                entry["candidate_index"]))
        assert entry["prompt"] == table.prompts[row] and entry["caption"] == table.prompts[row]
        assert entry["seed"] == table.seeds[row]
        assert entry["score"] == pytest.approx(table.scores[aspect][row])
        assert entry["scorer"]["id"] == ANALYTIC[aspect]
        assert set(entry["scores"]) == set(table.aspects)
        image_file = dataset / entry["file"]
        assert (image_file.with_suffix(CAPTION_SUFFIX)).read_text() == table.prompts[row]
        saved = torch.from_numpy(np.array(Image.open(image_file).convert("RGB"))).float() / 255
        assert torch.allclose(saved, images[row], atol=0.5 / 255 + 1e-6), "the saved PNG must be the kept image"
    assert json.loads((dataset / SUMMARY_NAME).read_text())["images_kept"] == 6
    assert not [p for p in (comfy_dirs["output"] / "runs").iterdir() if p.name.startswith(".")], "temp folder left"


def test_save_reuses_the_same_set_and_refuses_another_unless_asked(nodes, scorers, comfy_dirs):
    images = textured_images(4)
    selected = filtered(nodes, scorers, images)
    save = nodes[SAVE]
    save.execute(selection=selected, images=images, name="set", repeats=2, overwrite=False)
    dataset = comfy_dirs["output"] / "set"
    before = listing(dataset)
    manifest_before = (dataset / MANIFEST_NAME).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    # the same selection again (a re-queue after ComfyUI's cache was cleared): reused, nothing written
    again = save.execute(selection=filtered(nodes, scorers, images), images=images, name="set", repeats=2,
                         overwrite=False)
    assert again.result[0] == "set" and "unchanged, reused (same content)" in again.ui["text"][0]
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == stamps
    with pytest.raises(ValueError, match="holds other content.*turn on 'overwrite' in Save Training Set to replace "
                                         "the training set, or change 'name' to keep both") as refused:
        save.execute(selection=selected, images=images, name="set", repeats=5, overwrite=False)
    error_type = type(refused.value)
    assert f"{error_type.__module__}.{error_type.__qualname__}" == "versat2i.safe_io.TargetExistsError"
    assert listing(dataset) == before and (dataset / MANIFEST_NAME).read_bytes() == manifest_before
    save.execute(selection=selected, images=images, name="set", repeats=5, overwrite=True)
    assert any(name.startswith("5_") for name in os.listdir(dataset))
    assert not any(name.startswith("2_") for name in os.listdir(dataset))


@pytest.mark.parametrize("name", ["../escape", "/tmp/versat2i-escape", "a/../../escape", "", "out\x00x"])
def test_save_refuses_names_outside_the_output_folder(nodes, scorers, comfy_dirs, name):
    images = textured_images(2)
    selected = filtered(nodes, scorers, images, prompts="a\nb")
    outside_before = listing(comfy_dirs["output"].parent)
    assert isinstance(nodes[SAVE].validate_inputs(name=name), str)
    with pytest.raises(ValueError):
        nodes[SAVE].execute(selection=selected, images=images, name=name, repeats=1, overwrite=True)
    assert listing(comfy_dirs["output"].parent) == outside_before, "nothing may be written"
    assert not Path("/tmp/versat2i-escape").exists()


def test_save_refuses_symlink_escape(nodes, scorers, comfy_dirs, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (comfy_dirs["output"] / "link").symlink_to(outside, target_is_directory=True)
    images = textured_images(2)
    selected = filtered(nodes, scorers, images, prompts="a\nb")
    assert "outside" in nodes[SAVE].validate_inputs(name="link/set")
    with pytest.raises(ValueError, match="outside"):
        nodes[SAVE].execute(selection=selected, images=images, name="link/set", repeats=1, overwrite=False)
    assert list(outside.iterdir()) == []


def test_save_bad_inputs_write_nothing(nodes, scorers, comfy_dirs):
    images = textured_images(4)
    selected = filtered(nodes, scorers, images)
    save = nodes[SAVE]
    with pytest.raises(ValueError, match="Filter Best Per Prompt"):
        save.execute(selection=selected.selection, images=images, name="x", repeats=1, overwrite=False)
    with pytest.raises(ValueError, match="4 scored"):
        save.execute(selection=selected, images=images[:3], name="x", repeats=1, overwrite=False)
    nothing = filtered(nodes, scorers, images, threshold_kind="absolute", threshold=1e12)
    with pytest.raises(ValueError, match="threshold"):
        save.execute(selection=nothing, images=images, name="x", repeats=1, overwrite=False)
    assert listing(comfy_dirs["output"]) == []


@pytest.mark.parametrize("case", list(BAD_IMAGE_BATCHES))
def test_filter_and_save_refuse_bad_images_and_write_nothing(nodes, scorers, comfy_dirs, case):
    good = textured_images(4)
    selected = filtered(nodes, scorers, good)
    make, match = BAD_IMAGE_BATCHES[case]
    with pytest.raises(ValueError, match=match):
        nodes[FILTER].execute(scores=selected.table, images=make(), threshold_kind="none", threshold=0.0)
    with pytest.raises(ValueError, match=match):
        nodes[SAVE].execute(selection=selected, images=make(), name="bad", repeats=1, overwrite=False)
    assert listing(comfy_dirs["output"]) == []


def test_save_cancelled_mid_write_leaves_nothing(nodes, scorers, comfy_dirs, comfy, monkeypatch):
    import comfy.model_management as mm

    from versat2i.training_set import writer as training_set

    images = textured_images(6)
    selected = filtered(nodes, scorers, images)
    real_save_png, saved = training_set.save_png, []

    def save_then_cancel(pixels, path):  # the user presses Cancel while the second image is written
        real_save_png(pixels, path)
        saved.append(path)
        if len(saved) == 2:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(training_set, "save_png", save_then_cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes[SAVE].execute(selection=selected, images=images, name="runs/cancelled", repeats=1, overwrite=False)
    finally:
        mm.interrupt_current_processing(False)
    assert len(saved) == 2  # it stopped at the next progress update, not after all 6
    assert listing(comfy_dirs["output"]) == [], "a cancelled write must leave no dataset, temp or parent folder"


def test_load_scorers_corrupt_weights_name_the_file_and_write_nothing(nodes, comfy_dirs):
    from versat2i.rewards.weights import WeightsFormatError

    clip = comfy_dirs["models"] / "versat2i" / "clip" / "ViT-L-14-openai.safetensors"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"<html>404: this download failed</html>")
    before = listing(comfy_dirs["models"])
    with pytest.raises(WeightsFormatError) as caught:
        nodes[LOAD].execute(device="cpu", **{**ANALYTIC, "alignment": "clip-score"})
    assert str(clip) in str(caught.value) and "truncated, corrupt" in str(caught.value)
    assert listing(comfy_dirs["models"]) == before
    assert listing(comfy_dirs["output"]) == [] and listing(comfy_dirs["temp"]) == []


def test_load_scorers_takes_no_scorer_options_from_its_inputs(nodes, comfy_dirs):
    """Node inputs come from a web page; scorer options can name files anywhere (clip_weights=
    '/abs/path'), so Load Scorers passes only its weight-file inputs, and only values that are files
    of ComfyUI's own models/versat2i listing or the published names; every input is checked
    against its list even when it arrives through a link."""
    import inspect

    from versat2i.aspects import ASPECTS

    load = nodes[LOAD]
    inputs = [*ASPECTS, "device", "clip_weights", "aesthetic_weights", "download_missing"]
    assert [i.id for i in load.GET_SCHEMA().inputs] == inputs
    assert list(inspect.signature(load.execute).parameters) == inputs
    for path in ("/etc/passwd", "../../etc/passwd", "clip/../../x.safetensors"):
        with pytest.raises(ValueError, match="clip_weights .*not a file in models/versat2i/clip/"):
            load.execute(device="cpu", clip_weights=path, **{**ANALYTIC, "alignment": "clip-score"})
    for name in ("clip-score:/etc/passwd", "analytic:sharpness,clip_weights=/x", "pyiqa:../../x"):
        with pytest.raises(ValueError, match="unknown scorer"):
            load.execute(device="cpu", **{**ANALYTIC, "aesthetics": name})
    with pytest.raises(ValueError, match="device"):
        load.execute(device="cuda:7", **ANALYTIC)


def test_default_filter_never_keeps_images_without_a_person_for_geometry(nodes, comfy_dirs):
    pytest.importorskip("mediapipe", reason="mediapipe (extra [geometry]) is not installed")
    from tiny_models.figures import draw_figure, no_person_images

    from versat2i.rewards.registry import DEFAULT_SCORERS

    assert DEFAULT_SCORERS["geometry"] == "mediapipe-anatomy"
    scorers = nodes[LOAD].execute(device="auto", **{**ANALYTIC, "geometry": DEFAULT_SCORERS["geometry"]})[0]
    nobody = no_person_images()
    images = torch.cat([draw_figure(), nobody[[0, 1, 3]]])  # prompt 0: person + blank; prompt 1: nobody
    table = score(nodes, scorers, images, "a person waving\nan empty room")[0]
    assert table.scores["geometry"][0] > 0 and table.scores["geometry"][1:] == [0.0, 0.0, 0.0]
    defaults = {i.id: getattr(i, "default", None) for i in nodes[FILTER].GET_SCHEMA().inputs}
    filter_inputs = {k: defaults[k] for k in ("threshold_kind", "threshold")}
    selected = nodes[FILTER].execute(scores=table, images=images, **filter_inputs)[0]
    assert selected.selection.aspects["geometry"].kept == (0,)
    nodes[SAVE].execute(selection=selected, images=images, name="geo", repeats=1, overwrite=False)
    manifest = [json.loads(line) for line in (comfy_dirs["output"] / "geo" / MANIFEST_NAME).read_text().splitlines()]
    geometry = [e for e in manifest if e["aspect"] == "geometry"]
    assert [(e["prompt_index"], e["candidate_index"]) for e in geometry] == [(0, 0)]
    assert table.judged["geometry"] == [True, False, False, False]
    assert geometry[0]["judged"]["geometry"] is True
    # Images kept for another aspect say their geometry score is no judgement.
    others = [e for e in manifest if e["aspect"] != "geometry" and (e["prompt_index"], e["candidate_index"]) != (0, 0)]
    assert others and all(e["judged"]["geometry"] is False for e in others)


# -- the same images all the way --------------------------------------------------------------------------

def test_filter_and_save_refuse_another_batch_of_the_same_size(nodes, scorers, comfy_dirs):
    """Score Images records each image's pixels (sha256 of the 8-bit image): Filter and Save refuse
    a batch that is not the scored one, even with the same number of images."""
    images = textured_images(4)
    selected = filtered(nodes, scorers, images)
    for other in (textured_images(4, seed=1), images.flip(0)):
        with pytest.raises(ValueError, match="not the images that were scored"):
            nodes[FILTER].execute(scores=selected.table, images=other, threshold_kind="none", threshold=0.0)
        with pytest.raises(ValueError, match="not the images that were scored"):
            nodes[SAVE].execute(selection=selected, images=other, name="wrong", repeats=1, overwrite=False)
    assert listing(comfy_dirs["output"]) == []
    nodes[SAVE].execute(selection=selected, images=images, name="right", repeats=1, overwrite=False)
    assert (comfy_dirs["output"] / "right" / MANIFEST_NAME).is_file()


def test_filter_threshold_text_errors_say_what_format_is_expected(nodes):
    message = nodes[FILTER].validate_inputs(aspect_thresholds="lowlevel = 5,5")
    assert "decimal comma" in message and "'lowlevel = 5.5'" in message, message
    message = nodes[FILTER].validate_inputs(aspect_thresholds="lowlevel 3")
    assert "'aspect = threshold'" in message and "aesthetics = 5.5" in message, message
    assert nodes[FILTER].validate_inputs(aspect_thresholds="lowlevel = 5.5, aesthetics = p75") is True


# -- weight files: fingerprints and extra model folders ------------------------------------------------------

def _stat_bumped(path: Path) -> None:
    """Move a rewritten file's mtime on by a second (a rewrite within the clock's resolution)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_load_scorers_fingerprint_follows_the_weight_files(nodes, comfy_dirs):
    """ComfyUI reuses Load Scorers' cached output while its fingerprint_inputs value is the same:
    the value must stay put for unchanged files and change when a weight file is replaced."""
    pytest.importorskip("pyiqa", reason="pyiqa (extra [iqa]) is not installed")
    import hashlib

    from comfy_api.internal import first_real_override
    from tiny_models.iqa import write_pyiqa_checkpoint

    load = nodes[LOAD]
    assert first_real_override(load, "fingerprint_inputs") is not None  # what ComfyUI's execution looks for
    path = write_pyiqa_checkpoint(comfy_dirs["models"] / "versat2i", "cnniqa", seed=0)
    inputs = {**ANALYTIC, "lowlevel": "pyiqa:cnniqa", "device": "cpu"}
    first = load.fingerprint_inputs(**inputs)
    assert load.fingerprint_inputs(**inputs) == first
    scorers = load.execute(**inputs)[0]
    assert scorers["lowlevel"].weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()

    write_pyiqa_checkpoint(comfy_dirs["models"] / "versat2i", "cnniqa", seed=1)
    _stat_bumped(path)
    changed = load.fingerprint_inputs(**inputs)
    assert changed != first, "a replaced weight file must make ComfyUI run Load Scorers again"
    again = load.execute(**inputs)[0]
    assert again["lowlevel"] is not scorers["lowlevel"]
    new_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    assert again["lowlevel"].weights_hash == new_hash != scorers["lowlevel"].weights_hash
    assert load.fingerprint_inputs(**inputs) == changed
    # Weight-free scorers have no files: a stable value, so ComfyUI keeps reusing the output.
    weight_free = {**ANALYTIC, "device": "cpu"}
    assert load.fingerprint_inputs(**weight_free) == load.fingerprint_inputs(**weight_free)


def test_load_scorers_finds_weights_in_a_folder_added_by_extra_model_paths(nodes, comfy_dirs, comfyui_path, tmp_path):
    """A second `versat2i` folder registered the way ComfyUI reads extra_model_paths.yaml (its own
    loader, utils/extra_config.py, which calls folder_paths.add_model_folder_path) is searched too:
    a weight file that only exists there is found and loaded."""
    pytest.importorskip("pyiqa", reason="pyiqa (extra [iqa]) is not installed")
    import importlib.util

    import folder_paths
    from tiny_models.iqa import write_pyiqa_checkpoint

    # By file path: another library's top-level `utils` module may already sit in sys.modules.
    spec = importlib.util.spec_from_file_location("comfyui_extra_config", comfyui_path / "utils" / "extra_config.py")
    extra_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extra_config)
    load_extra_path_config = extra_config.load_extra_path_config

    extra_root = tmp_path / "shared-models"
    path = write_pyiqa_checkpoint(extra_root / "versat2i", "cnniqa", seed=0)
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"shared:\n  base_path: {extra_root}\n  versat2i: versat2i\n", encoding="utf-8")
    inputs = {**ANALYTIC, "lowlevel": "pyiqa:cnniqa", "device": "cpu"}
    from versat2i.rewards.weights import MissingWeightsError

    with pytest.raises(MissingWeightsError):  # not in the default folder
        nodes[LOAD].execute(**inputs)
    load_extra_path_config(str(config))
    assert str(extra_root / "versat2i") in folder_paths.get_folder_paths("versat2i")
    scorers = nodes[LOAD].execute(**inputs)[0]
    assert scorers["lowlevel"].weight_files() == (path,)
    assert not (comfy_dirs["models"] / "versat2i").exists() or listing(comfy_dirs["models"] / "versat2i") == []


# -- Load Scorers: downloading missing weight files (opt-in) ---------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in for the Hugging Face Hub on 127.0.0.1 (tests/fake_hub.py), set up as HF_ENDPOINT
    would point huggingface_hub at it; HF_HUB_OFFLINE (on for the whole test session) turned off."""
    from fake_hub import FakeHub
    from huggingface_hub import constants

    hub = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.close()


def test_load_scorers_downloads_missing_published_weights_only_when_asked(nodes, comfy_dirs, fake_hub, monkeypatch):
    """download_missing off: the missing file is an error saying the switch exists. On: each missing
    published file is fetched into models/versat2i under its published name (a ComfyUI progress bar
    follows the bytes), then the scorer loads (here the stand-in CLIP file is no model: the load
    error names it). HF_HUB_OFFLINE keeps it off."""
    import io

    import comfy.utils
    from fake_hub import HubFile
    from huggingface_hub import constants

    from versat2i.rewards.aesthetic_laion import AestheticMLP
    from versat2i.rewards.weights import HUB_FILES, MissingWeightsError, WeightsFormatError

    buffer = io.BytesIO()
    torch.save(AestheticMLP(768).state_dict(), buffer)
    served = {"aesthetic/sac+logos+ava1-l14-linearMSE.pth": buffer.getvalue(),
              "clip/open_clip_model.safetensors": b"not an open_clip model"}
    for name, content in served.items():
        fake_hub.files[(HUB_FILES[name].repo_id, HUB_FILES[name].filename)] = HubFile(content)
    bars = []

    class RecordingBar:
        def __init__(self, total):
            self.updates = []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, total))

    monkeypatch.setattr(comfy.utils, "ProgressBar", RecordingBar)
    inputs = {**{aspect: "disabled" for aspect in ANALYTIC}, "aesthetics": "laion-aesthetic-v2", "device": "cpu"}
    with pytest.raises(MissingWeightsError, match="turn on 'download_missing' in Load Scorers"):
        nodes[LOAD].execute(**inputs)
    assert fake_hub.requests == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError, match="'download_missing' is on, but HF_HUB_OFFLINE is set"):
        nodes[LOAD].execute(**inputs, download_missing=True)
    assert fake_hub.requests == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    with pytest.raises(WeightsFormatError, match="open_clip_model.safetensors"):
        nodes[LOAD].execute(**inputs, download_missing=True)
    folder = comfy_dirs["models"] / "versat2i"
    for name, content in served.items():
        assert (folder / name).read_bytes() == content
    assert [bar.updates[-1] for bar in bars] == [(len(c), len(c)) for c in served.values()]
    fetched = len(fake_hub.requests)
    with pytest.raises(WeightsFormatError):  # present now: nothing is fetched again
        nodes[LOAD].execute(**inputs, download_missing=True)
    assert len(fake_hub.requests) == fetched
