"""What a ComfyUI user sees of every VersaT2I node, read from the definitions real ComfyUI serves
(``GET_NODE_INFO_V1``, the ``/object_info`` entry the frontend builds the node from). Skipped
without COMFYUI_PATH.

Every node explains itself (display name, description), every input and output has a tooltip,
every output a name of its own, and no node of ours changes its own inputs after a queue: frontend
1.27 gives an INT a "control after generate" widget defaulting to "randomize" when the definition
asks for one, or when it says nothing and the input is named ``seed`` / ``noise_seed``
(``useIntWidget``: ``control_after_generate ?? ['seed', 'noise_seed'].includes(name)``). A
randomized seed would make every queue train the LoRAs and the gate again and draw new candidates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import (
    comfyui_version,
    load_snapshot,
    snapshot_node_definition,
    snapshot_version,
    with_core_choices_named,
)

pytestmark = pytest.mark.comfy

TESTS = Path(__file__).resolve().parents[1]

SNAPSHOT = load_snapshot()

EXPECTED_NODES = {"VersaT2I_GenerateCandidates", "VersaT2I_LoadScorers", "VersaT2I_ScoreImages",
                  "VersaT2I_FilterBestPerPrompt", "VersaT2I_SaveTrainingSet", "VersaT2I_DiTModelFiles",
                  "VersaT2I_TrainAspectLoRA", "VersaT2I_TrainGate", "VersaT2I_GatedMultiLoRALoader",
                  "VersaT2I_LoopReport"}


def node_inputs(info: dict) -> dict[str, tuple]:
    """name -> (type, options) of every visible input of an /object_info entry."""
    return {name: (spec[0], spec[1] if len(spec) > 1 else {})
            for group in ("required", "optional") for name, spec in info["input"].get(group, {}).items()}


def gets_control_widget(name: str, io_type, options: dict) -> bool:
    """The frontend 1.27 rule (module docstring); COMBOs get one only when they ask for it."""
    if io_type == "INT":
        flag = options.get("control_after_generate")
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return bool(options.get("control_after_generate"))


@pytest.fixture(scope="module")
def infos(comfy_nodes):
    return {node_id: node.GET_NODE_INFO_V1() for node_id, node in comfy_nodes.items()}


def test_every_node_of_the_pack_is_covered(comfy_nodes):
    assert set(comfy_nodes) == EXPECTED_NODES


def test_the_snapshot_holds_the_definitions_this_comfyui_serves_for_our_nodes(comfy, comfyui_path, infos):
    """tests/data/object_info.json (what the workflows are validated against without ComfyUI) against
    the definitions of this pack in this ComfyUI, exactly, as the snapshot reduces them. This also
    catches what its key (the code of nodes/*.py) cannot see: a value a node takes from another
    module. Choices taken from ComfyUI's KSampler are compared as "the same as this version's
    KSampler" (``harness.with_core_choices_named``); the snapshot's entry of this ComfyUI version
    is compared. The server tier compares the core nodes in it too."""
    import nodes as comfy_core_nodes

    live_core = {"KSampler": {"input": comfy_core_nodes.KSampler.INPUT_TYPES()}}
    version = comfyui_version(comfyui_path)
    entry = snapshot_version(SNAPSHOT, version)
    ours = {kind: spec for kind, spec in entry["nodes"].items() if kind.startswith("VersaT2I_")}
    assert set(infos) == set(ours), "node set changed: rerun tests/data/make_object_info.py"
    stale = [kind for kind, info in sorted(infos.items())
             if with_core_choices_named(snapshot_node_definition(info, entry["dynamic_combos"].get(kind, ())),
                                        live_core)
             != with_core_choices_named(ours[kind], entry["nodes"])]
    assert stale == [], (f"definitions changed for {stale} (ComfyUI {version}'s entry of the snapshot): rerun "
                         "tests/data/make_object_info.py with this ComfyUI")


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_has_a_display_name_description_and_category(infos, node_id):
    info = infos[node_id]
    assert info["display_name"] and info["display_name"] != node_id
    assert info["category"].startswith("VersaT2I/")
    assert len(info["description"]) >= 60, f"{node_id}: the description does not say what the node does"


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_every_input_has_a_tooltip(infos, node_id):
    inputs = node_inputs(infos[node_id])
    assert inputs
    missing = [name for name, (_, options) in inputs.items() if not str(options.get("tooltip") or "").strip()]
    assert missing == [], f"{node_id}: inputs without a tooltip: {missing}"


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_every_output_has_a_name_and_a_tooltip(comfy_nodes, infos, node_id):
    info = infos[node_id]
    assert info["output"], f"{node_id} has no output"
    assert len(info["output_tooltips"]) == len(info["output"])
    missing = [name for name, tip in zip(info["output_name"], info["output_tooltips"]) if not str(tip or "").strip()]
    assert missing == [], f"{node_id}: outputs without a tooltip: {missing}"
    # Without a display name the frontend labels an output with its type ("IMAGE", "STRING"): say what it is.
    unnamed = [o.io_type for o in comfy_nodes[node_id].define_schema().outputs if not o.display_name]
    assert unnamed == [], f"{node_id}: outputs without a display name: {unnamed}"
    names = info["output_name"]
    assert len(set(names)) == len(names), f"{node_id}: two outputs share a name: {names}"


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_no_input_changes_itself_after_a_queue(infos, node_id):
    controlled = [name for name, (io_type, options) in node_inputs(infos[node_id]).items()
                  if gets_control_widget(name, io_type, options)]
    assert controlled == [], f"{node_id}: the frontend adds 'control after generate' (randomize) to {controlled}"


def test_the_rule_above_matches_the_frontend_default_for_a_plain_seed(comfy):
    """Guard for the test above: a seed that says nothing gets the control widget (this is the core
    KSampler's case), one that says False does not."""
    import nodes as comfy_core_nodes

    ksampler = comfy_core_nodes.KSampler.INPUT_TYPES()["required"]["seed"]
    assert gets_control_widget("seed", ksampler[0], ksampler[1])
    assert not gets_control_widget("seed", "INT", {"control_after_generate": False})
    assert not gets_control_widget("steps", "INT", {})


def test_train_gate_takes_four_linkable_lora_sockets_and_the_list(infos):
    info = infos["VersaT2I_TrainGate"]
    optional = info["input"]["optional"]
    for name in ("lora_1", "lora_2", "lora_3", "lora_4"):
        io_type, options = optional[name]
        # A socket only (no text box): Train Aspect LoRA's lora_name output links into it.
        assert io_type == "STRING" and options.get("forceInput") is True, (name, options)
    # The list stays a required text widget in its old place, so saved workflows keep their values.
    assert info["input_order"]["required"][:3] == ["dataset", "ckpt_name", "loras"]
    assert info["input"]["required"]["loras"][1].get("multiline") is True


def test_dit_model_files_feeds_both_trainers_on_one_socket(infos):
    """DiT Model Files picks a DiT's files as ComfyUI's loaders list them (text_encoder_2, FLUX.1's
    T5, may be 'none') and outputs them on one VERSAT2I_MODEL_FILES socket; each trainer takes it
    as an optional socket beside its ckpt_name, which keeps a 'none' choice (no checkpoint needed)."""
    info = infos["VersaT2I_DiTModelFiles"]
    assert info["input_order"]["required"] == ["diffusion_model", "text_encoder", "text_encoder_2", "vae"]
    assert info["input"]["required"]["text_encoder_2"][1]["options"][0] == "none"
    assert all("none" not in info["input"]["required"][name][1]["options"]
               for name in ("diffusion_model", "text_encoder", "vae"))
    assert info["output"] == ["VERSAT2I_MODEL_FILES"] and info["output_name"] == ["model_files"]
    assert info["category"] == infos["VersaT2I_TrainAspectLoRA"]["category"]
    for trainer in ("VersaT2I_TrainAspectLoRA", "VersaT2I_TrainGate"):
        inputs = node_inputs(infos[trainer])
        assert inputs["model_files"][0] == "VERSAT2I_MODEL_FILES", trainer
        assert "model_files" in infos[trainer]["input"]["optional"], trainer
        assert inputs["ckpt_name"][1]["options"][-1] == "none", trainer
        assert not {"diffusion_model", "text_encoder", "text_encoder_2", "vae"} & set(inputs), trainer


@pytest.mark.parametrize("node_id, combo_after_seed", [("VersaT2I_TrainAspectLoRA", "lr_scheduler"),
                                                       ("VersaT2I_TrainGate", "mixed_precision")])
def test_a_save_from_before_the_seed_lost_its_control_box_gets_a_hint(comfy_nodes, infos, node_id, combo_after_seed):
    """The frontend assigns saved widget values by position: in a node saved when its seed still had
    a control box, the control value ('fixed') lands in the widget after seed, a combo the node
    checks when queued. The refusal then says what happened."""
    info = infos[node_id]
    widgets = [name for group in ("required", "optional") for name in info["input_order"].get(group, [])
               if not info["input"][group][name][1].get("forceInput")]
    assert widgets[widgets.index("seed") + 1] == combo_after_seed
    from versat2i.nodes.train_aspect_lora import TRAINING_COMBOS, check_combos
    from versat2i.nodes.train_gate import GATE_COMBOS

    choices = TRAINING_COMBOS if node_id == "VersaT2I_TrainAspectLoRA" else GATE_COMBOS
    with pytest.raises(ValueError, match="older version.*moved by one"):  # checked when the node runs
        check_combos({combo_after_seed: "fixed"}, choices)
    with pytest.raises(ValueError) as plain:
        check_combos({combo_after_seed: "fast"}, choices)
    assert "older version" not in str(plain.value)
