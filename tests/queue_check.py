"""ComfyUI's own queue-time validation, in-process (``execution.validate_prompt``, what the server runs
on POST /prompt before anything executes), for tests/comfy. Import after the ``comfy`` fixture.

``api_node`` writes one node of an API prompt with every required input at its default (a combo's
default, else its first choice) and the given values; ``queue_errors`` validates a prompt with the
pack's nodes registered, returning ComfyUI's errors per node id as the server would answer them.
"""

from __future__ import annotations

import asyncio
from typing import Any


def api_node(cls, **values: Any) -> dict[str, Any]:
    """``{"class_type": ..., "inputs": ...}``: required widget inputs at their default, then ``values``
    (a link is ``[node_id, output_index]``; None leaves an input out)."""
    inputs: dict[str, Any] = {}
    for name, spec in cls.INPUT_TYPES().get("required", {}).items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if "default" in options:
            inputs[name] = options["default"]
        elif isinstance(kind, list) or kind == "COMBO":
            choices = kind if isinstance(kind, list) else options.get("options", [])
            if choices:
                inputs[name] = choices[0]
    inputs.update(values)
    return {"class_type": cls.define_schema().node_id, "inputs": {k: v for k, v in inputs.items() if v is not None}}


def queue_errors(monkeypatch, node_classes, prompt: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """ComfyUI's validation of ``prompt`` (node id -> API node) with ``node_classes`` registered:
    ``{node id: [error, ...]}`` for every node with errors of its own ({} when the prompt is valid)."""
    import execution

    import nodes

    for cls in node_classes:
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, cls.define_schema().node_id, cls)
    result = asyncio.run(execution.validate_prompt("queue-check", prompt, None))
    node_errors = result[3]
    errors = {node_id: entry["errors"] for node_id, entry in node_errors.items() if entry["errors"]}
    assert result[0] == (not errors and not result[1]), result
    return errors
