"""The shipped workflows in ComfyUI's own frontend, in a real (headless) chromium, as a user meets
them: open one from the template browser, see no missing-node / missing-model / validation dialog,
set small values, press Run, wait for it to finish, check the outputs on disk. Run with
``make test-browser COMFYUI_PATH=...`` (both supported ComfyUI versions: 0.3.64 ships frontend 1.27,
0.33 frontend 1.49); ``make test`` leaves this tier out.

The server is a real ComfyUI with the pack and the test-only pack (tests/server/versat2i_test_nodes)
in its custom_nodes. What differs from a user's machine, and why:

* models/checkpoints holds the tiny SD1.5-shaped checkpoint under the name the workflows use
  (v1-5-pruned-emaonly-fp16.safetensors), and the prompt the page posts gets
  ``VersaT2ITest_TinyCheckpointLoader`` for ``CheckpointLoaderSimple`` (ComfyUI's model detection
  only knows real-size checkpoints; the training nodes read the same file);
* models/versat2i holds stand-in files under the scorer weights' published names: the workflows run
  with weight-free analytic scorers (set like the other small values), and the files are there so
  the frontend finds every declared model;
* sizes, steps and ranks are set small (seconds on a CPU).

``test_a_new_user_is_shown_the_missing_model_files`` opens a workflow on a server without those
files: the frontend's missing-models dialog (1.27) or error panel (1.49) must list every file.
A screenshot of each finished workflow goes to ``$VERSAT2I_SCREENSHOTS`` (docs/screenshots with
``make test-browser``), else the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from frontend import Frontend, write_settings
from harness import ComfyServer, comfyui_version, min_comfyui_version, supports
from safetensors import safe_open
from tiny_models.sd import build_tiny_sd15

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEST_PACK = REPO / "tests" / "server" / "versat2i_test_nodes"
TINY_LOADER = "VersaT2ITest_TinyCheckpointLoader"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"  # what the shipped workflows name
SCORER_FILES = ("clip/open_clip_model.safetensors", "aesthetic/sac+logos+ava1-l14-linearMSE.pth")
LOOP, INFERENCE, QUICK = "versat2i_self_improvement_loop", "versat2i_gated_inference", "versat2i_quick_loop_one_aspect"
ZIMAGE_INFERENCE, ZIMAGE_QUICK = "versat2i_zimage_gated_inference", "versat2i_zimage_quick_loop_one_aspect"
# Z-Image Turbo's files under the names the Z-Image workflows declare (tiny ones put there by the tests).
ZIMAGE_FILES = {"diffusion_models": "z_image_turbo_bf16.safetensors", "text_encoders": "qwen_3_4b.safetensors",
                "vae": "ae.safetensors"}
# ComfyUI's model detection only knows real-size models: test-only loaders with the same inputs and
# outputs load the tiny files (tests/server/versat2i_test_nodes).
TINY_LOADERS = {"CheckpointLoaderSimple": TINY_LOADER, "UNETLoader": "VersaT2ITest_TinyUNETLoader",
                "CLIPLoader": "VersaT2ITest_TinyCLIPLoader", "VAELoader": "VersaT2ITest_TinyVAELoader"}
ASPECTS = ("aesthetics", "alignment", "geometry", "lowlevel")
ANALYTIC = {"aesthetics": "analytic:contrast", "alignment": "analytic:colourfulness", "geometry": "analytic:sharpness",
            "lowlevel": "analytic:exposure"}
TRAINING = {"steps": 3, "learning_rate": 2e-2, "rank": 4, "alpha": 4.0, "resolution": 64}
SMALL = {
    "VersaT2I_GenerateCandidates": {"k": 2, "steps": 2, "width": 64, "height": 64, "batch_size": 2},
    "VersaT2I_TrainAspectLoRA": TRAINING,
    "VersaT2I_TrainGate": {"steps": 3, "resolution": 64},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
}
VIEWPORT = {"width": 2400, "height": 2200}  # a whole workflow at a readable zoom (about 0.8)


def start_server(comfyui_path: Path, base: Path, *, with_models: bool) -> ComfyServer:
    if with_models:
        tiny = build_tiny_sd15(base.parent / f"{base.name}-tiny")
        checkpoints = base / "models" / "checkpoints"
        checkpoints.mkdir(parents=True)
        shutil.copy(tiny.checkpoint, checkpoints / CHECKPOINT)
        shutil.copytree(tiny.folder, checkpoints / (Path(CHECKPOINT).stem + ".configs"),
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))  # the tiny loader's configs
        for name in SCORER_FILES:
            path = base / "models" / "versat2i" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"stand-in: these tests score with analytic scorers")
    write_settings(base)
    return ComfyServer.start(comfyui_path, base, extra_packs={"versat2i-test-nodes": TEST_PACK})


@pytest.fixture(scope="module")
def server(comfyui_path, browser, tmp_path_factory):
    started = start_server(comfyui_path, tmp_path_factory.mktemp("browser-server"), with_models=True)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def frontend(browser, server):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        yield Frontend(page, server.url)
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("VERSAT2I_SCREENSHOTS")
    return Path(folder).resolve() if folder else tmp_path_factory.mktemp("screenshots")


def run_workflow(frontend: Frontend, server: ComfyServer, workflow: str, screenshots: Path, *,
                 timeout: float = 900, values: dict | None = None) -> dict:
    """Open ``workflow`` from the template browser, check nothing stops the user, set small values,
    press Run, wait until it finished and save a screenshot; returns ComfyUI's history entry."""
    frontend.open()
    frontend.open_template(workflow)
    assert frontend.problems() == [], f"{workflow}: the frontend shows problems on load"
    enabled = frontend.page.evaluate("""() => {
        const nodes = window.app.graph._nodes || window.app.graph.nodes;
        const scorers = nodes.find(n => n.type === 'VersaT2I_LoadScorers');
        return scorers ? scorers.widgets.filter(w => w.value !== 'disabled').map(w => w.name) : [];
    }""")
    scorers = {aspect: ANALYTIC[aspect] for aspect in ASPECTS if aspect in enabled}
    frontend.set_widgets({**SMALL, **({"VersaT2I_LoadScorers": scorers} if scorers else {}), **(values or {})})
    frontend.replace_in_queued_prompts(TINY_LOADERS)
    queued = frontend.press_run()
    assert queued["status"] == 200, f"the server refused the prompt: {queued['answer']}"
    entry = server.wait(queued["prompt_id"], timeout=timeout)
    frontend.page.wait_for_timeout(2000)  # the page shows the last outputs
    assert frontend.problems() == [], f"{workflow}: the frontend shows problems after the run"
    frontend.fit_view()
    frontend.screenshot(screenshots / f"{workflow}.comfyui-{comfyui_version(server.comfyui_path)}.jpg")
    return entry


def lora_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_a_new_user_is_shown_the_missing_model_files(browser, comfyui_path, tmp_path, screenshots):
    """No model file yet: opening a workflow lists each one it needs (the declared name, folder and
    download link), so nothing has to be looked up or renamed by hand."""
    bare = start_server(comfyui_path, tmp_path / "bare", with_models=False)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        frontend = Frontend(context.new_page(), bare.url)
        frontend.open()
        frontend.open_template(QUICK)
        listed = frontend.missing_models()
        assert sorted(listed) == sorted([f"checkpoints / {CHECKPOINT}", *(f"versat2i / {n}" for n in SCORER_FILES)])
        frontend.screenshot(screenshots / f"missing-models.comfyui-{comfyui_version(comfyui_path)}.jpg")
    finally:
        context.close()
        bare.stop()


def test_quick_loop(frontend, server, screenshots):
    run_workflow(frontend, server, QUICK, screenshots)
    dataset = server.base_dir / "output" / "versat2i" / "quick"
    assert len(list((dataset / "10_aesthetics").glob("*.png"))) == 4  # the best of each of the 4 prompts
    lora = server.base_dir / "models" / "loras" / "versat2i" / "quick_aesthetics.safetensors"
    assert any(key.startswith("lora_unet_") for key in lora_keys(lora))


def test_self_improvement_loop(frontend, server, screenshots):
    run_workflow(frontend, server, LOOP, screenshots)
    dataset = server.base_dir / "output" / "versat2i" / "loop"
    assert sorted(p.name for p in dataset.iterdir() if p.is_dir()) == [f"10_{a}" for a in ASPECTS]
    loras = server.base_dir / "models" / "loras" / "versat2i"
    for aspect in ASPECTS:
        assert any(key.startswith("lora_unet_") for key in lora_keys(loras / f"loop_{aspect}.safetensors"))
    from versat2i.trainer.mol_file import read_mol

    assert list(read_mol(loras / "loop.mol.safetensors").aspects) == list(ASPECTS)


def test_gated_inference(frontend, server, screenshots):
    if not (server.base_dir / "models" / "loras" / "versat2i" / "loop.mol.safetensors").is_file():
        pytest.skip("needs the self-improvement loop's MoL file: run the whole module")
    entry = run_workflow(frontend, server, INFERENCE, screenshots)
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])
              if image.get("type") == "output"]
    assert len(images) == 1 and images[0]["filename"].startswith("gated_")
    assert (server.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


# -- the Z-Image Turbo workflows (ComfyUI 0.3.74 and newer) ---------------------------------------------

@pytest.fixture(scope="module")
def zimage(server, tmp_path_factory):
    """Tiny Z-Image files under Z-Image Turbo's published names in the server's model folders (the
    diffusion model with its ``.configs`` sidecar), so the frontend finds every file the workflows
    declare; skipped on a ComfyUI without Z-Image."""
    workflow = json.loads((REPO / "workflows" / f"{ZIMAGE_QUICK}.json").read_text())
    version = comfyui_version(server.comfyui_path)
    if not supports(workflow, version):
        pytest.skip(f"the Z-Image workflows need ComfyUI >= {min_comfyui_version(workflow)}; ComfyUI {version} has "
                    "no Z-Image")
    from tiny_models.dit import write_tiny_dit

    tiny = write_tiny_dit("zimage", tmp_path_factory.mktemp("tiny-zimage"))
    models = server.base_dir / "models"
    for folder, source in (("diffusion_models", tiny.diffusion_model), ("text_encoders", tiny.text_encoders[0]),
                           ("vae", tiny.vae)):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, models / folder / ZIMAGE_FILES[folder])
    sidecar = Path(ZIMAGE_FILES["diffusion_models"]).stem + ".configs"
    shutil.copytree(tiny.configs, models / "diffusion_models" / sidecar)
    return tiny


def test_zimage_quick_loop(frontend, server, zimage, screenshots):
    """Opens with no problem (each file Primitive feeds a core loader and DiT Model Files), trains a
    Z-Image LoRA on the DiT files in its diffusers keys."""
    run_workflow(frontend, server, ZIMAGE_QUICK, screenshots)
    dataset = server.base_dir / "output" / "versat2i" / "zimage_quick"
    assert len(list((dataset / "10_aesthetics").glob("*.png"))) == 4  # the best of each of the 4 prompts
    lora = server.base_dir / "models" / "loras" / "versat2i" / "zimage_quick_aesthetics.safetensors"
    keys = lora_keys(lora)
    assert keys and all(key.startswith("transformer.") for key in keys), keys[:5]


def test_zimage_gated_inference(frontend, server, zimage, screenshots):
    from tiny_models.mixture import write_mixture

    # Under the name the workflow opens with (a missing mol_file is a problem the page shows on load):
    # the MoL file names its LoRAs relative to its own folder, so they move along.
    loras = server.base_dir / "models" / "loras"
    mol_file, lora_files = write_mixture("zimage", zimage, loras, ["aesthetics", "lowlevel"], "token",
                                         tag="zimage-browser")
    for name in lora_files:
        shutil.copy(loras / name, loras / "versat2i" / Path(name).name)
    shutil.copy(loras / mol_file, loras / "versat2i" / "zimage_loop.mol.safetensors")
    entry = run_workflow(frontend, server, ZIMAGE_INFERENCE, screenshots)
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])
              if image.get("type") == "output"]
    assert len(images) == 1 and images[0]["filename"].startswith("zimage_gated_")
    assert (server.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()
