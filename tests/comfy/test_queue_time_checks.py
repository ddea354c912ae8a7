"""The trainers' names through ComfyUI's own queue-time validation (``execution.validate_prompt``, in
process; both ComfyUI versions): a LoRA or MoL name that cannot be saved (too long once its temporary
sibling ``.<name>.tmp-<8 hex>`` is counted, a reserved name, a path out of the folder) is one error, on
the name's input, before anything runs (issue 15; issue 14: one error per problem, on the input at
fault). Before, validate_inputs took other inputs (ComfyUI attaches its message to every input it
takes), so the names were checked only when the node ran, after the rest of the loop.
"""

from __future__ import annotations

import pytest
from queue_check import api_node, queue_errors

pytestmark = pytest.mark.comfy

LONG = "x" * 250  # 250 bytes: the name alone fits 255, not with its suffix and temporary sibling


@pytest.fixture
def trainers(comfy, comfy_dirs, comfy_nodes):
    """The node classes, with a checkpoint file (not read at queue time) and two LoRA files."""
    import folder_paths

    (comfy_dirs["models"] / "checkpoints").mkdir()
    (comfy_dirs["models"] / "checkpoints" / "base.safetensors").write_bytes(b"checkpoint")
    folder_paths.filename_list_cache.clear()
    return comfy_nodes


def only_error(errors: dict, node_id: str) -> dict:
    assert list(errors) == [node_id], errors
    (error,) = errors[node_id]
    return error


@pytest.mark.parametrize("lora_name, message", [
    (LONG, "is 262 bytes long"),
    ("CON", "reserved device name on Windows"),
    ("../elsewhere", "'..' is not allowed"),
    (".hidden", "a name starting with '.' is hidden"),
])
def test_a_lora_name_that_cannot_be_saved_is_one_error_on_lora_name(trainers, monkeypatch, comfy_dirs, lora_name,
                                                                   message):
    node = trainers["VersaT2I_TrainAspectLoRA"]
    before = sorted(comfy_dirs["output"].rglob("*"))
    prompt = {"1": api_node(node, ckpt_name="base.safetensors", lora_name=lora_name)}
    error = only_error(queue_errors(monkeypatch, [node], prompt), "1")
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "lora_name", error
    assert error["details"].startswith("lora_name - lora_name") and message in error["details"], error
    assert sorted(comfy_dirs["output"].rglob("*")) == before  # nothing ran


def test_a_mol_name_that_cannot_be_saved_is_one_error_on_mol_name(trainers, monkeypatch, comfy_dirs):
    node = trainers["VersaT2I_TrainGate"]
    before = sorted(comfy_dirs["output"].rglob("*"))
    prompt = {"1": api_node(node, ckpt_name="base.safetensors", mol_name=LONG,
                            loras="versat2i/a.safetensors\nversat2i/b.safetensors")}
    error = only_error(queue_errors(monkeypatch, [node], prompt), "1")
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "mol_name", error
    assert "mol_name: 'xxxx" in error["details"] and "is 266 bytes long" in error["details"], error
    assert sorted(comfy_dirs["output"].rglob("*")) == before


def test_good_names_and_the_empty_default_pass(trainers, monkeypatch):
    lora, gate = trainers["VersaT2I_TrainAspectLoRA"], trainers["VersaT2I_TrainGate"]
    prompt = {"1": api_node(lora, ckpt_name="base.safetensors", lora_name=""),
              "2": api_node(lora, ckpt_name="base.safetensors", lora_name="sub/" + "x" * 200),
              "3": api_node(gate, ckpt_name="base.safetensors", mol_name="mix", lora_1=["1", 0], lora_2=["2", 0])}
    assert queue_errors(monkeypatch, [lora, gate], prompt) == {}


def test_a_linked_lora_name_is_checked_when_the_node_runs(trainers, monkeypatch):
    """A name from another node is not known at queue time: no error then (the node checks it when it runs)."""
    lora = trainers["VersaT2I_TrainAspectLoRA"]
    prompt = {"1": api_node(lora, ckpt_name="base.safetensors", lora_name=""),
              "2": api_node(lora, ckpt_name="base.safetensors", lora_name=["1", 0])}
    assert queue_errors(monkeypatch, [lora], prompt) == {}
