"""Regenerate tests/data/object_info.json: the node definitions the shipped workflows are validated
against when ComfyUI is not installed (tests/unit/test_workflows_schema.py).

    COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python tests/data/make_object_info.py

It starts a real ComfyUI server (tests/server/harness.py) with this pack linked into a temporary
custom_nodes folder, reads /object_info and keeps every VersaT2I node plus the core nodes the
shipped workflows (workflows/*.json) and CORE_NODES use, reduced to what validation needs
(``harness.snapshot_node_definition``). Combos that list files (checkpoints, LoRAs...) are found by
asking twice, with empty model folders and with a dummy file in each: the inputs whose choices
change are recorded as ``dynamic_combos`` and their choices emptied, so the snapshot does not
depend on anyone's models folder.

The file holds one entry per ComfyUI version (``versions``: core nodes change between versions,
e.g. PreviewImage declares an output in 0.33); a run replaces the entry of the version it ran
against and keeps the others. Run it once per supported version (harness.SUPPORTED_COMFYUI_VERSIONS)
when the tests below ask for it.

It cannot go stale silently: tests/comfy/test_node_schemas.py (our nodes, in-process) and
tests/server/test_workflows.py (every node, live server) compare it with the running ComfyUI, and
without ComfyUI tests/unit/test_workflows_schema.py checks each entry's ``node_code_sha256``, a hash
of the code of nodes/*.py that a comment, docstring, tooltip or description edit leaves unchanged
(``harness.node_code_sha256``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # a script: pytest's pythonpath does not apply

from harness import ComfyServer, comfyui_version, node_code_sha256, snapshot_definitions, supports

REPO = Path(__file__).resolve().parents[2]

SNAPSHOT = Path(__file__).resolve().parent / "object_info.json"
# Core nodes the workflows use or that a user typically adds to them (kept even when no shipped
# workflow uses one today, so a new workflow can be validated without regenerating).
CORE_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
              "PreviewImage", "LoraLoader", "StringConcatenate",
              # the DiT workflows' split loaders (ComfyUI's Z-Image template graph); in every supported version
              "UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingAuraFlow", "EmptySD3LatentImage",
              "ConditioningZeroOut", "LoraLoaderModelOnly")
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# Where a dummy file makes file-listing combos change (found by comparing the two answers).
DUMMY_FILES = ("models/checkpoints/dummy.safetensors", "models/loras/dummy.safetensors",
               "models/loras/dummy.mol.safetensors", "models/vae/dummy.safetensors", "input/dummy.png",
               "models/versat2i/clip/dummy.safetensors", "models/versat2i/aesthetic/dummy.pth",
               "models/diffusion_models/dummy.safetensors", "models/text_encoders/dummy.safetensors")


def workflow_node_types(folder: Path, version: str) -> set[str]:
    """The node types of the workflows that support ComfyUI ``version`` (a workflow records the oldest
    version it needs in ``extra.versat2i.min_comfyui_version``, tools/build_workflows.py)."""
    types = set()
    for path in sorted(folder.glob("*.json")):
        workflow = json.loads(path.read_text())
        if supports(workflow, version):
            types.update(node["type"] for node in workflow["nodes"])
    return types - FRONTEND_ONLY


def dynamic_combos(before: dict, after: dict) -> dict[str, list[str]]:
    """Inputs whose definition changed when dummy files appeared."""
    found: dict[str, list[str]] = {}
    for kind, spec in before.items():
        for category in ("required", "optional"):
            for name, definition in (spec.get("input", {}).get(category) or {}).items():
                if after[kind]["input"][category][name] != definition:
                    found.setdefault(kind, []).append(name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (COMFYUI_PATH)")
    parser.add_argument("--output", type=Path, default=SNAPSHOT)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("set COMFYUI_PATH or pass --comfyui")
    comfyui = Path(args.comfyui).resolve()
    with tempfile.TemporaryDirectory(prefix="versat2i-object-info-") as tmp, \
            ComfyServer.start(comfyui, Path(tmp)) as server:
        before = server.object_info(refresh=True)
        for relative in DUMMY_FILES:
            dummy = Path(tmp) / relative
            dummy.parent.mkdir(parents=True, exist_ok=True)
            dummy.write_bytes(b"")
        after = server.object_info(refresh=True)
        ours = sorted(server.nodes_of_pack())
    version = comfyui_version(comfyui)
    wanted = set(ours) | set(CORE_NODES) | workflow_node_types(REPO / "workflows", version)
    dynamic = {k: v for k, v in dynamic_combos(before, after).items() if k in wanted}
    entry = {"dynamic_combos": dynamic, "node_code_sha256": node_code_sha256(REPO),
             "nodes": snapshot_definitions(before, wanted, dynamic)}
    try:
        versions = json.loads(args.output.read_text()).get("versions", {})
    except (FileNotFoundError, json.JSONDecodeError):
        versions = {}
    snapshot = {
        "comment": "Generated by tests/data/make_object_info.py from live ComfyUI servers, one entry per version; "
                   "do not edit by hand.",
        "versions": {**versions, version: entry},
    }
    args.output.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    stale = [v for v, e in snapshot["versions"].items() if e["node_code_sha256"] != entry["node_code_sha256"]]
    print(f"wrote ComfyUI {version}'s entry of {args.output}: {len(entry['nodes'])} node types ({len(ours)} VersaT2I), "
          f"dynamic combos {dynamic}" + (f"; made from older node files, rerun for: {', '.join(stale)}" if stale
                                         else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
