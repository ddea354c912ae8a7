"""Train Gate's LoRA inputs in real ComfyUI (skipped without COMFYUI_PATH): the four sockets
lora_1..lora_4 (what a workflow links Train Aspect LoRA outputs into) and the ``loras`` list (typed
names, or more than four) are joined in that order into the gate's experts. No training here: the
node's inputs are resolved against ComfyUI's folders (empty placeholder files), and the run
fingerprint shows that linking and typing the same LoRAs is the same run. Training through the
node is in test_gated_loader.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from versat2i.aspects import ASPECTS

pytestmark = pytest.mark.comfy

# The four aspects and one more: one LoRA more than the node has sockets for.
LORA_ASPECTS = (*ASPECTS, "style")
SETTINGS = {"granularity": "token", "balance_loss": "mole", "balance_weight": 0.01, "steps": 5,
            "learning_rate": 1e-3, "batch_size": 1, "resolution": 64, "seed": 0}


@pytest.fixture
def train_gate(comfy, comfy_dirs):
    """The node module, with a checkpoint, five LoRA files and a training set in ComfyUI's folders."""
    import folder_paths

    from versat2i.nodes import train_gate

    (comfy_dirs["models"] / "checkpoints").mkdir()
    (comfy_dirs["models"] / "checkpoints" / "base.safetensors").write_bytes(b"checkpoint")
    loras = comfy_dirs["models"] / "loras" / "versat2i"
    loras.mkdir(parents=True)
    for aspect in LORA_ASPECTS:  # the node reads each LoRA's aspect from its metadata
        save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(loras / f"loop_{aspect}.safetensors"),
                  metadata={"versat2i_aspect": aspect})
    (comfy_dirs["output"] / "versat2i" / "loop" / "10_aesthetics").mkdir(parents=True)
    folder_paths.filename_list_cache.clear()
    return train_gate


def lora(aspect: str) -> str:
    return f"versat2i/loop_{aspect}.safetensors"


def resolved_names(train_gate, loras: str = "", **sockets) -> list[str]:
    linked = [sockets.get(name) for name in train_gate.LORA_SOCKETS]
    paths = train_gate.resolve_paths("versat2i/loop", "base.safetensors", loras, "loop", linked)
    return [path.name for path in paths["loras"]]


def test_sockets_come_first_in_their_order_then_the_list(train_gate):
    names = resolved_names(train_gate, loras=f"{lora('style')}\n# a comment\n\n",
                           lora_1=lora("aesthetics"), lora_2=lora("alignment"), lora_4=lora("lowlevel"))
    # An unconnected socket (lora_3) is skipped; the typed list follows the sockets.
    assert names == ["loop_aesthetics.safetensors", "loop_alignment.safetensors", "loop_lowlevel.safetensors",
                     "loop_style.safetensors"]


def test_the_list_alone_works_as_before(train_gate):
    # Saved workflows that join the names into `loras` (newlines or commas) keep working.
    assert resolved_names(train_gate, loras=f"{lora('geometry')}, {lora('aesthetics')}") == [
        "loop_geometry.safetensors", "loop_aesthetics.safetensors"]


def test_the_mol_file_goes_next_to_the_loras(train_gate, comfy_dirs):
    linked = [lora("aesthetics"), lora("geometry"), None, None]
    paths = train_gate.resolve_paths("versat2i/loop", "base.safetensors", "", "loop", linked)
    assert paths["mol"] == (comfy_dirs["models"] / "loras" / "versat2i" / "loop.mol.safetensors").resolve()
    assert train_gate.mol_combo_name(paths["mol"]) == "versat2i/loop.mol.safetensors"


@pytest.mark.parametrize("loras, sockets, message", [
    ("", {"lora_1": lora("aesthetics")}, "at least two aspect LoRAs"),
    ("", {}, "connect Train Aspect LoRA's lora_name"),
    (lora("aesthetics"), {"lora_1": lora("aesthetics")}, "given twice"),
    ("", {"lora_1": lora("aesthetics"), "lora_2": "versat2i/missing.safetensors"}, "is not in models/loras"),
    ("", {"lora_1": lora("aesthetics"), "lora_2": "versat2i//loop_aesthetics.safetensors"},
     "given already"),
])
def test_bad_lora_inputs_name_the_input_and_the_fix(train_gate, loras, sockets, message):
    with pytest.raises(ValueError, match=message):
        resolved_names(train_gate, loras=loras, **sockets)


def test_linking_or_typing_the_same_loras_is_the_same_run(train_gate):
    """ComfyUI's cache key (fingerprint_inputs) depends on which LoRAs, in which order, not on
    whether they were linked or typed: the finished MoL file is reused either way."""
    node = train_gate.TrainGate
    linked = node.fingerprint_inputs("versat2i/loop", "base.safetensors", "", "loop",
                                     lora_1=lora("aesthetics"), lora_2=lora("geometry"), **SETTINGS)
    typed = node.fingerprint_inputs("versat2i/loop", "base.safetensors", f"{lora('aesthetics')}\n{lora('geometry')}",
                                    "loop", lora_3=None, **SETTINGS)
    swapped = node.fingerprint_inputs("versat2i/loop", "base.safetensors", "", "loop",
                                      lora_1=lora("geometry"), lora_2=lora("aesthetics"), **SETTINGS)
    assert isinstance(linked, tuple) and linked == typed
    assert swapped != linked  # the order is the gate's expert order
    invalid = node.fingerprint_inputs("versat2i/loop", "base.safetensors", "", "loop", lora_1=lora("geometry"),
                                      **SETTINGS)
    assert math.isnan(invalid)  # run again, so that execute reports the problem


def test_two_loras_of_one_aspect_are_refused_in_the_nodes_words_before_anything_is_written(train_gate, comfy_dirs):
    """Before, the run started and failed after 11-16 s asking to "set `aspects` in the config", an
    input the node does not have, leaving a run folder behind (issue 15)."""
    loras = comfy_dirs["models"] / "loras" / "versat2i"
    save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(loras / "other_geometry.safetensors"),
              metadata={"versat2i_aspect": "geometry"})
    node = train_gate.TrainGate
    before = sorted(comfy_dirs["output"].rglob("*"))
    typed = f"{lora('geometry')}\nversat2i/other_geometry.safetensors"
    linked = {"lora_1": lora("geometry"), "lora_2": "versat2i/other_geometry.safetensors"}
    for loras_box, sockets in ((typed, {}), ("", linked)):  # checked first thing when the node runs
        with pytest.raises(ValueError) as info:
            node.execute("versat2i/loop", "base.safetensors", loras_box, "loop", **sockets, **SETTINGS)
        assert str(info.value) == (
            "loras: loop_geometry.safetensors, other_geometry.safetensors are all LoRAs of aspect 'geometry'; a "
            "mixture needs one LoRA per aspect: connect (or list) LoRAs trained on different aspects")
    assert sorted(comfy_dirs["output"].rglob("*")) == before  # no gate_runs folder
    assert not list(loras.glob("*.mol.safetensors"))


@pytest.mark.parametrize("mol_name, message", [
    ("m" * 230, "mol_name: 'mmmm"),  # 230 + ".mol.safetensors" = 246 bytes: its temporary name would not fit
    ("AUX", "reserved device name on Windows"),
    ("../elsewhere", "'..' is not allowed"),
    (".mix", "a name starting with '.' is hidden"),
])
def test_mol_names_that_cannot_be_saved_are_refused_before_training_starts(train_gate, comfy_dirs, mol_name, message):
    """Checked when the prompt is queued (validate_inputs takes mol_name only: ComfyUI attaches its
    message to every input it takes) and again first thing when the node runs."""
    problem = train_gate.TrainGate.validate_inputs(mol_name=mol_name)
    assert isinstance(problem, str) and problem.startswith("mol_name") and message in problem, problem
    before = sorted(comfy_dirs["output"].rglob("*"))
    linked = {"lora_1": lora("aesthetics"), "lora_2": lora("geometry")}
    with pytest.raises(ValueError) as info:
        train_gate.TrainGate.execute("versat2i/loop", "base.safetensors", "", mol_name, **linked, **SETTINGS)
    problem = str(info.value)
    assert problem.startswith("mol_name") and message in problem, problem
    assert sorted(comfy_dirs["output"].rglob("*")) == before
    paths = train_gate.resolve_paths("versat2i/loop", "base.safetensors", "", "m" * 225,
                                     [lora("aesthetics"), lora("geometry")])
    assert paths["mol"].name == "m" * 225 + ".mol.safetensors"


def test_validate_inputs_takes_mol_name_only(train_gate, comfy_dirs):
    """A missing checkpoint is ComfyUI 0.33's own one error on ckpt_name (tests/server/test_workflows.py);
    ComfyUI 0.3.64 checks no V3 combo value, so the node refuses it when it runs, naming ckpt_name, as
    it does 'none' without a DiT on model_files. Both before anything is written."""
    import inspect

    node = train_gate.TrainGate
    assert list(inspect.signature(node.validate_inputs).parameters) == ["mol_name"]
    assert node.validate_inputs(mol_name="aspects") is True
    assert node.validate_inputs(mol_name="") is True  # "aspects"
    assert node.validate_inputs() is True  # linked
    options = node.INPUT_TYPES()["required"]["ckpt_name"][1]["options"]
    assert options[-1] == "none" and "base.safetensors" in options
    linked = {"lora_1": lora("aesthetics"), "lora_2": lora("geometry")}
    before = sorted(comfy_dirs["output"].rglob("*"))
    for ckpt_name in ("missing.safetensors", "none"):
        with pytest.raises(ValueError, match=f"ckpt_name '{ckpt_name}': not in models/checkpoints"):
            node.execute("versat2i/loop", ckpt_name, "", "loop", **linked, **SETTINGS)
    assert sorted(comfy_dirs["output"].rglob("*")) == before
