"""Train Aspect LoRA in real ComfyUI (skipped without COMFYUI_PATH).

The node trains a tiny SD1.5-shaped single-file checkpoint from ComfyUI's checkpoints folder in a
child process under ``accelerate launch``; these tests check what the user sees: the LoRA name the
stock loaders list, progress, re-queue reuse, Cancel killing the child's process group, a child
crash surfacing as an error, and bad inputs refused with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models.lora_training import make_kohya_dataset
from tiny_models.sd import build_tiny_sd15

pytestmark = [pytest.mark.comfy, pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")]

TRAINING = dict(steps=6, learning_rate=1e-2, rank=4, alpha=4.0, batch_size=2, resolution=64, seed=3,
                mixed_precision="no", checkpoint_every=3, cache_latents=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15-node"))


@pytest.fixture
def node(comfy, comfy_dirs, tiny_model, monkeypatch):
    """The node module, with a tiny checkpoint in models/checkpoints and a training set in output/."""
    import folder_paths

    from versat2i.nodes import train_aspect_lora

    checkpoints = comfy_dirs["models"] / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(tiny_model.checkpoint, checkpoints / "tiny.safetensors")
    make_kohya_dataset(comfy_dirs["output"] / "versat2i" / "ds", images_per_aspect=4)
    folder_paths.filename_list_cache.clear()
    # The tiny checkpoint's shapes are not the real SD1.5's: point the loader at the tiny configs
    # (users' real checkpoints use the configs shipped in the pack).
    original = train_aspect_lora.build_config
    monkeypatch.setattr(train_aspect_lora, "build_config", lambda *a, **k: original(*a, **k).replace(
        model_config_dir=str(tiny_model.folder)))
    return train_aspect_lora


def run_node(node, **overrides):
    inputs = dict(dataset="versat2i/ds", aspect="aesthetics", ckpt_name="tiny.safetensors", lora_name="", **TRAINING)
    inputs.update(overrides)
    return node.TrainAspectLora.execute(**inputs)


def alive_members(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.info["pid"])
        except (ProcessLookupError, psutil.Error):
            pass
    return found


@pytest.fixture
def progress(comfy, monkeypatch):
    import comfy.utils

    # ComfyUI 0.33 passes a bar's updates on at most every so often (time and percent thresholds; 0.3.64
    # has none): off here, so the test sees every update the node makes, however fast the steps run.
    for throttle in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, throttle):
            monkeypatch.setattr(comfy.utils, throttle, 0)
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    yield updates
    comfy.utils.set_progress_bar_global_hook(None)


@pytest.fixture
def children(monkeypatch):
    """Every training child the launcher starts."""
    from versat2i.trainer import launcher

    started = []
    original = launcher.TrainingProcess.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        started.append(self)

    monkeypatch.setattr(launcher.TrainingProcess, "__init__", record)
    return started


def test_schema(node):
    schema = node.TrainAspectLora.define_schema()
    assert schema.node_id == "VersaT2I_TrainAspectLoRA" and schema.category == "VersaT2I/train"
    schema.validate()  # what ComfyUI runs when it loads the pack (input and output ids must differ)
    assert [o.id for o in schema.outputs] == ["lora_file", "loss_curve"]
    assert schema.outputs[0].display_name == "lora_name"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)


def test_trains_a_lora_the_loaders_list_then_reuses_it(node, comfy_dirs, progress, children, monkeypatch):
    import folder_paths

    output = run_node(node)
    name, curve = output.result
    assert name == "versat2i/ds_aesthetics.safetensors"
    folder_paths.filename_list_cache.clear()
    assert name in folder_paths.get_filename_list("loras")  # what LoraLoader offers
    lora = load_file(folder_paths.get_full_path_or_raise("loras", name))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min() <= curve.max() <= 1
    assert len(children) == 1
    assert progress[-1] == (6, 6) and any(value == 3 for value, _ in progress)
    # checkpoints are dropped after success; the log stays for the user
    run_dirs = list((comfy_dirs["output"] / "versat2i" / "lora_runs" / "versat2i").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "train_log.jsonl").is_file()
    assert not (run_dirs[0] / "checkpoints").exists()

    # Same inputs again: the finished LoRA comes back, no child is started.
    fingerprint = node.TrainAspectLora.fingerprint_inputs(dataset="versat2i/ds", aspect="aesthetics",
                                                          ckpt_name="tiny.safetensors", lora_name="", **TRAINING)
    again = run_node(node)
    assert again.result[0] == name and len(children) == 1
    assert again.result[1].shape == curve.shape  # the curve comes back from the LoRA's metadata
    from versat2i.trainer.lora_job import read_finished_lora

    _, stored_curve = read_finished_lora(Path(folder_paths.get_full_path_or_raise("loras", name)))
    assert [step for step, _ in stored_curve] == list(range(1, 7))
    same = node.TrainAspectLora.fingerprint_inputs(dataset="versat2i/ds", aspect="aesthetics",
                                                   ckpt_name="tiny.safetensors", lora_name="", **TRAINING)
    assert same == fingerprint
    # A changed setting with the same name is refused rather than overwriting the LoRA, in the
    # words of the node's inputs, with a readable type (ComfyUI shows module.Class).
    with pytest.raises(ValueError, match="already exists and was trained from other inputs.*turn on 'overwrite' "
                                         "in Train Aspect LoRA to replace the LoRA, or change 'lora_name'") as refused:
        run_node(node, learning_rate=5e-3)
    error_type = type(refused.value)
    assert f"{error_type.__module__}.{error_type.__qualname__}" == "versat2i.safe_io.TargetExistsError"
    assert len(children) == 1


def test_comfyuis_loaded_models_are_freed_before_the_child_starts(node, comfy_dirs, monkeypatch):
    import comfy.model_management as mm
    import comfy.model_patcher

    from versat2i.trainer import launcher

    model = comfy.model_patcher.ModelPatcher(torch.nn.Linear(64, 64), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    mm.load_models_gpu([model])
    assert [m.model for m in mm.current_loaded_models] == [model]  # what a workflow's earlier nodes leave loaded

    class Stop(Exception):
        """Stops the launch once the state is recorded (the trainer itself runs in the tests above)."""

    at_start = {}

    def record(self, command, **kwargs):
        at_start["loaded"] = list(mm.current_loaded_models)
        at_start["command"] = command
        raise Stop()

    monkeypatch.setattr(launcher.TrainingProcess, "__init__", record)
    try:
        with pytest.raises(Stop):
            run_node(node)
    finally:
        mm.unload_all_models()
    assert at_start["loaded"] == []
    assert at_start["command"][:3] == [launcher.sys.executable, "-m", "accelerate.commands.launch"]


def test_cancel_kills_the_child_and_keeps_a_checkpoint(node, comfy_dirs, progress, children):
    import comfy.model_management as mm

    outcome = {}

    def target():
        try:
            run_node(node, steps=400, checkpoint_every=1)
        except BaseException as exc:  # noqa: BLE001 - we want to see exactly what escapes
            outcome["error"] = exc
        outcome["finished_at"] = time.monotonic()

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 240
    while not any(value >= 2 for value, _ in progress) and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert any(value >= 2 for value, _ in progress), outcome
    cancelled_at = time.monotonic()
    mm.interrupt_current_processing(True)  # what the Cancel button does
    thread.join(timeout=30)
    try:
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), mm.InterruptProcessingException), outcome
        assert outcome["finished_at"] - cancelled_at < 5.0
        assert alive_members(children[0].pgid) == []
    finally:
        mm.interrupt_current_processing(False)
    from versat2i.trainer.training_loop import find_resume_checkpoint

    run_dir = next((comfy_dirs["output"] / "versat2i" / "lora_runs" / "versat2i").iterdir())
    assert find_resume_checkpoint(run_dir, "latest") is not None  # queueing again resumes from here
    assert not (comfy_dirs["models"] / "loras" / "versat2i" / "ds_aesthetics.safetensors").exists()


def test_a_crashing_child_surfaces_its_error(node, comfy_dirs, tiny_model):
    # Loadable keys (the up-front architecture check passes) but a UNet tensor of the wrong shape: the
    # child fails while loading the model.
    checkpoint = comfy_dirs["models"] / "checkpoints" / "broken.safetensors"
    state_dict = load_file(str(tiny_model.checkpoint))
    key = "model.diffusion_model.out.2.weight"
    state_dict[key] = torch.zeros(state_dict[key].shape[0] + 1, *state_dict[key].shape[1:])
    save_file(state_dict, str(checkpoint))
    import folder_paths

    folder_paths.filename_list_cache.clear()
    with pytest.raises(RuntimeError) as err:
        run_node(node, ckpt_name="broken.safetensors")
    message = str(err.value)
    assert "exited with code" in message and "do not fit" in message and "last output lines" in message
    assert not list((comfy_dirs["models"] / "loras").rglob("*.safetensors"))
    assert not (comfy_dirs["output"] / "versat2i" / "lora_runs").exists() or not any(
        (comfy_dirs["output"] / "versat2i" / "lora_runs").rglob("checkpoint-*"))


@pytest.mark.parametrize("case, overrides, message", [
    ("missing dataset", dict(dataset="versat2i/nope"), "no such folder"),
    ("dataset escaping output", dict(dataset="../elsewhere"), "'..' is not allowed"),
    ("empty dataset", dict(), "no images"),
    ("unreadable image", dict(), "can't be read as an image"),
    ("unknown architecture", dict(ckpt_name="unknown.safetensors"), "unsupported checkpoint architecture"),
    ("resolution not divisible by 8", dict(resolution=100), "resolution=100: must be a multiple of 8"),
    ("lora name escaping", dict(lora_name="../../evil"), "'..' is not allowed"),
    ("lora name absolute", dict(lora_name="/tmp/evil"), "absolute paths are not allowed"),
    ("several aspects, none chosen", dict(aspect=""), "several aspects"),
    ("a combo value 0.3.64 let through", dict(lr_scheduler="sometimes"), "lr_scheduler 'sometimes': must be one of"),
])
def test_bad_inputs_are_refused_with_nothing_written(node, comfy_dirs, children, case, overrides, message):
    import folder_paths

    images = comfy_dirs["output"] / "versat2i" / "ds" / "5_aesthetics"
    if case == "empty dataset":
        for image in images.glob("*.png"):
            image.unlink()
    elif case == "unreadable image":
        (images / "p00001_c000.png").write_bytes(b"\x89PNG but not really")
    elif case == "unknown architecture":
        save_file({"some.other.model.weight": torch.zeros(4, 4)},
                  str(comfy_dirs["models"] / "checkpoints" / "unknown.safetensors"))
        folder_paths.filename_list_cache.clear()
    elif case == "several aspects, none chosen":
        make_kohya_dataset(comfy_dirs["output"] / "versat2i" / "ds", aspects={"alignment": 2}, images_per_aspect=1)
    before = sorted(p.relative_to(comfy_dirs["output"]) for p in comfy_dirs["output"].rglob("*"))
    with pytest.raises(ValueError, match=message):
        run_node(node, **overrides)
    assert children == []
    assert not (comfy_dirs["models"] / "loras").exists() or not any((comfy_dirs["models"] / "loras").rglob("*"))
    assert sorted(p.relative_to(comfy_dirs["output"]) for p in comfy_dirs["output"].rglob("*")) == before


def test_an_aspect_the_training_set_kept_no_image_for_is_skipped_not_an_error(node, comfy_dirs, children):
    """The training set records the aspect with no image (dataset.json, as Save Training Set writes
    it when a threshold keeps nothing, or geometry finds no person): nothing is trained, the
    lora_name output is empty (Train Gate leaves it out), and the node says why."""
    dataset = comfy_dirs["output"] / "versat2i" / "ds"
    summary = {"format": "versat2i-training-set", "version": 1, "aspects": {
        "aesthetics": {"folder": "5_aesthetics", "repeats": 5, "kept": 2, "discarded": 2,
                       "threshold": {"kind": "none"}},
        "geometry": {"folder": "5_geometry", "repeats": 5, "kept": 0, "discarded": 4,
                     "threshold": {"kind": "absolute", "value": 0.9, "resolved": 0.9}}}}
    (dataset / "dataset.json").write_text(json.dumps(summary))
    before = sorted(p.relative_to(comfy_dirs["output"]) for p in comfy_dirs["output"].rglob("*"))
    result = run_node(node, aspect="geometry")
    assert result.result[0] == ""
    assert result.ui["text"][0].startswith("NOT TRAINED: aspect 'geometry' kept no image (threshold absolute 0.9; 4 ")
    curve = result.result[1]
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert children == []
    assert sorted(p.relative_to(comfy_dirs["output"]) for p in comfy_dirs["output"].rglob("*")) == before
    with pytest.raises(ValueError, match="no folder for aspect 'lowlevel'"):  # not in the set at all: an error
        run_node(node, aspect="lowlevel")


def test_validate_inputs_takes_lora_name_only(node):
    """ComfyUI attaches a validate_inputs message to every input the function takes: taking only
    lora_name, a name that cannot be saved is one error, on lora_name, when the prompt is queued
    (tests/comfy/test_queue_time_checks.py). A DiT's files are checked on DiT Model Files
    (tests/comfy/test_dit_families.py); a missing checkpoint is ComfyUI 0.33's own one error on
    ckpt_name (tests/server/test_workflows.py), refused here when the node runs. The rest is checked
    when the node runs (test_bad_inputs_are_refused_with_nothing_written), each error naming its input."""
    import inspect

    validate = node.TrainAspectLora.validate_inputs
    assert list(inspect.signature(validate).parameters) == ["lora_name"]
    assert validate(lora_name="") is True  # the default, <dataset>_<aspect>, is checked when the node runs
    assert validate(lora_name="sub/my_lora") is True
    assert validate() is True  # linked: checked when the node runs
    with pytest.raises(ValueError, match="ckpt_name 'missing.safetensors': not in models/checkpoints"):
        run_node(node, ckpt_name="missing.safetensors")
    with pytest.raises(ValueError, match="ckpt_name 'none': not in models/checkpoints.*connect a DiT Model Files"):
        run_node(node, ckpt_name="none")


@pytest.mark.parametrize("lora_name, message", [
    ("x" * 240, "lora_name: 'xxxx"),  # 240 + ".safetensors" fits 255, its temporary name does not
    ("sub/" + "x" * 230, "is 242 bytes long"),
    ("CON", "reserved device name on Windows"),
    ("versat2i/nul.final", "reserved device name on Windows"),
    ("sub/.hidden", "a name starting with '.' is hidden"),  # before: the config's 'output_name' error
])
def test_names_that_cannot_be_saved_are_refused_before_training_starts(node, lora_name, message, comfy_dirs):
    """Before, a 242-255-byte name trained to the last step and then failed to save (issue 15). The
    check runs when the prompt is queued (validate_inputs) and again first thing when the node runs
    (ComfyUI 0.3.64 or a prompt that skips validation; the default name derived from the dataset)."""
    problem = node.TrainAspectLora.validate_inputs(lora_name=lora_name)
    assert isinstance(problem, str) and problem.startswith("lora_name") and message in problem, problem
    before = sorted(comfy_dirs["output"].rglob("*"))
    with pytest.raises(ValueError) as refused:
        run_node(node, lora_name=lora_name)
    problem = str(refused.value)
    assert problem.startswith("lora_name") and message in problem, problem
    assert sorted(comfy_dirs["output"].rglob("*")) == before
    assert not list(comfy_dirs["models"].rglob("*.safetensors*")) or \
        {p.name for p in comfy_dirs["models"].rglob("*.safetensors*")} == {"tiny.safetensors"}
    assert node.resolve_paths("versat2i/ds", "aesthetics", "tiny.safetensors", "x" * 229)["lora"].name == \
        "x" * 229 + ".safetensors"
