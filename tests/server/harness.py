"""A real ComfyUI server with this pack installed, for integration tests. Reusable by every test
that queues a graph (or a shipped UI-format workflow) through ComfyUI's HTTP API.

What it does, and why:

* ``ComfyServer.start(comfyui_path, base_dir)`` runs ``<sys.executable> <comfyui>/main.py --cpu
  --listen 127.0.0.1 --port <free port> --base-directory <base_dir>``, with
  ``<base_dir>/custom_nodes/ComfyUI-VersaT2I`` a symlink to the installed pack (found from the
  ``versat2i`` package's location). ``--base-directory`` gives the server its own ``custom_nodes``,
  ``models``, ``input``, ``output`` and ``temp`` folders, so nothing is ever linked or written into
  the shared ComfyUI checkout. The server runs in its own process group (``start_new_session``) and
  ``stop()`` signals that whole group, so no worker outlives a test.
* It waits for ``/object_info`` with a timeout; if the server dies or never answers, the error
  carries the tail of its log.
* ``queue(graph)`` posts an API-format graph to ``/prompt`` (a refusal raises ``PromptRejected``
  with ComfyUI's ``node_errors``); ``wait(prompt_id)`` polls ``/history/<id>`` until the prompt
  finished (an execution error raises ``PromptFailed`` with the node's exception message);
  ``run(graph)`` does both.
* ``workflow_to_api(workflow, object_info)`` converts a UI-format workflow (what users save and
  what ``workflows/`` ships) into the API format, because ComfyUI has no Python converter (the
  frontend does it); see its docstring for what it supports.

Only the standard library: the harness must run wherever the tests run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACK_LINK_NAME = "ComfyUI-VersaT2I"
PACK_NODE_PREFIX = "VersaT2I_"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colours in ComfyUI 0.33's log lines
LOG_LEVEL = re.compile(r"^\[(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\] ?")  # and the level it starts them with
DEFAULT_START_TIMEOUT_S = 180.0
# Keeps a test's server off the network and off the GPU, and its start-up short: API nodes (paid
# cloud services) are not needed to test a local pack.
DEFAULT_SERVER_ARGS = ("--cpu", "--disable-api-nodes", "--disable-auto-launch")


class ServerError(RuntimeError):
    """The server did not start, died, or answered something unexpected. The message ends with the
    tail of the server log."""


class PromptRejected(ServerError):
    """``POST /prompt`` refused the graph (HTTP 400): validation failed before anything ran."""

    def __init__(self, message: str, response: Mapping[str, Any]):
        super().__init__(message)
        self.response = dict(response)
        self.error = dict(response.get("error") or {})
        self.node_errors = dict(response.get("node_errors") or {})

    def error_types(self) -> set[str]:
        """Every error ``type`` in the response (e.g. ``custom_validation_failed``)."""
        types = {self.error.get("type")} if self.error.get("type") else set()
        for node in self.node_errors.values():
            types.update(e.get("type") for e in node.get("errors", []))
        return types

    def details(self) -> str:
        """All error messages and details as one string, for assertions on what the user sees."""
        parts = [str(self.error.get("message", "")), str(self.error.get("details", ""))]
        for node_id, node in self.node_errors.items():
            for e in node.get("errors", []):
                parts.append(f"{node_id} {node.get('class_type')}: {e.get('message')} {e.get('details')}")
        return "\n".join(p for p in parts if p)


class PromptFailed(ServerError):
    """The graph was accepted but a node raised while running (or the run timed out)."""

    def __init__(self, message: str, history: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.history = dict(history or {})


@dataclass
class PackImport:
    """What ComfyUI logged about loading one custom-node folder."""

    seen: bool  # the "Import times for custom nodes" block lists it
    failed: bool  # "(IMPORT FAILED)" on that line, or a traceback/warning naming the pack
    seconds: float | None
    messages: list[str] = field(default_factory=list)  # the warning/traceback lines naming the pack


def pack_root() -> Path:
    """The pack's folder, from the installed ``versat2i`` package (``pip install -e .`` maps the
    repository root to it). Never put that folder on ``sys.path``: its ``nodes/`` would shadow
    ComfyUI's ``nodes.py``."""
    import versat2i  # the root __init__ imports nothing heavy

    return Path(versat2i.__file__).resolve().parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _link_folder(link: Path, target: Path) -> Path:
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise ServerError(f"{link} exists and is not a symlink; refusing to replace it")
    link.symlink_to(Path(target).resolve(), target_is_directory=True)
    return link


def make_base_directory(base_dir: Path, pack_dir: Path | None = None, *, link_pack: bool = True,
                        link_name: str = PACK_LINK_NAME,
                        extra_packs: Mapping[str, str | os.PathLike] | None = None) -> Path | None:
    """Create ComfyUI's per-server folders under ``base_dir`` and (``link_pack``) link the pack into
    its ``custom_nodes`` (a symlink, where a user's ``git clone`` would put a folder). ``extra_packs``
    (``{folder name: path}``) are linked beside it, e.g. a test-only node pack. Returns the link."""
    base_dir = Path(base_dir)
    for name in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (base_dir / name).mkdir(parents=True, exist_ok=True)
    for name, path in (extra_packs or {}).items():
        _link_folder(base_dir / "custom_nodes" / name, Path(path))
    if not link_pack:
        return None
    return _link_folder(base_dir / "custom_nodes" / link_name, Path(pack_dir or pack_root()))


class ComfyServer:
    """One ComfyUI server process. Use ``ComfyServer.start(...)`` and always ``stop()`` it (or use
    it as a context manager)."""

    def __init__(self, comfyui_path: Path, base_dir: Path, port: int, process: subprocess.Popen,
                 log_path: Path, link_name: str = PACK_LINK_NAME):
        self.comfyui_path = Path(comfyui_path)
        self.base_dir = Path(base_dir)
        self.port = port
        self.process = process
        self.log_path = Path(log_path)
        self.link_name = link_name
        self.url = f"http://127.0.0.1:{port}"
        self._object_info: dict[str, Any] | None = None

    # -- life cycle --------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        comfyui_path: str | os.PathLike,
        base_dir: str | os.PathLike,
        *,
        pack_dir: str | os.PathLike | None = None,
        link_pack: bool = True,
        extra_packs: Mapping[str, str | os.PathLike] | None = None,
        port: int | None = None,
        timeout: float = DEFAULT_START_TIMEOUT_S,
        server_args: Iterable[str] = DEFAULT_SERVER_ARGS,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> ComfyServer:
        """Start a server and wait until ``/object_info`` answers. ``link_pack=False`` starts
        ComfyUI without the pack (a baseline); ``extra_packs`` (``{folder name: path}``) are linked
        into custom_nodes too. Raises ServerError with the log tail on failure; the process is
        stopped then."""
        comfyui_path = Path(comfyui_path).resolve()
        base_dir = Path(base_dir).resolve()
        if not (comfyui_path / "main.py").is_file():
            raise ServerError(f"{comfyui_path} is not a ComfyUI checkout (no main.py)")
        make_base_directory(base_dir, Path(pack_dir) if pack_dir else None, link_pack=link_pack,
                            extra_packs=extra_packs)
        child_env = dict(os.environ if env is None else env)
        # One thread (2 shared cores), offline model hubs; the server never needs the network.
        child_env.setdefault("OMP_NUM_THREADS", "1")
        child_env.setdefault("MKL_NUM_THREADS", "1")
        child_env["HF_HUB_OFFLINE"] = "1"
        child_env["TRANSFORMERS_OFFLINE"] = "1"
        child_env["PYTHONUNBUFFERED"] = "1"
        attempts = 1 if port is not None else 3  # an OS-picked port can be taken before we bind it
        last_error: ServerError | None = None
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            log_path = base_dir / f"server-{chosen}.log"
            command = [
                python, str(comfyui_path / "main.py"), *server_args,
                "--listen", "127.0.0.1", "--port", str(chosen), "--base-directory", str(base_dir),
                # ComfyUI's default database lives in the checkout's user/ folder: keep it in ours.
                "--database-url", f"sqlite:///{base_dir / 'user' / 'comfyui.db'}", *extra_args,
            ]
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    command, cwd=str(comfyui_path), env=child_env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: stop() kills it all
                )
            server = cls(comfyui_path, base_dir, chosen, process, log_path)
            try:
                server.wait_until_up(timeout)
                return server
            except ServerError as exc:
                server.stop()
                last_error = exc
                if "address already in use" not in server.log_text().lower() or attempt == attempts - 1:
                    raise
        raise last_error  # pragma: no cover - loop always returns or raises

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"ComfyUI exited with code {self.process.returncode} during start-up\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as response:
                    if response.status == 200:
                        self._object_info = json.load(response)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything left in the group (workers the server started), even if the leader is gone
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- the log -------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def pack_import(self, link_name: str | None = None) -> PackImport:
        """Parse ComfyUI's "Import times for custom nodes" block and warnings for one pack. ComfyUI
        0.33 prefixes its log lines with a coloured level ("[INFO]" in ANSI colour codes), which is
        removed first."""
        name = link_name or self.link_name
        lines = [LOG_LEVEL.sub("", ANSI_ESCAPE.sub("", line)) for line in self.log_text().splitlines()]
        seen, failed, seconds, messages = False, False, None, []
        timing = re.compile(r"^\s*([\d.]+) seconds( \(IMPORT FAILED\))?:\s.*custom_nodes[/\\]"
                            + re.escape(name) + r"\s*$")
        for index, line in enumerate(lines):
            match = timing.match(line)
            if match:
                seen, seconds = True, float(match.group(1))
                failed = failed or bool(match.group(2))
            elif name in line and re.search(r"Cannot import|Error while calling comfy_entrypoint|Skip .* module|"
                                            r"comfy_entrypoint in|IMPORT FAILED", line):
                failed = True
                start = index
                if line.startswith("Cannot import"):  # ComfyUI logs the traceback just before it
                    probe = index - 1
                    while (probe >= 0 and index - probe < 200
                           and not lines[probe].startswith(("Traceback", "Cannot import"))):
                        probe -= 1
                    if probe >= 0 and lines[probe].startswith("Traceback"):
                        start = probe
                messages.extend(lines[start:index + 1])
        return PackImport(seen=seen, failed=failed, seconds=seconds, messages=messages)

    # -- HTTP ----------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> tuple[int, Any]:
        """One HTTP request; returns (status, decoded JSON or text). HTTP errors are returned, not
        raised; a dead server raises ServerError with the log tail."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ServerError(f"{method} {path} failed: {exc}\n{self.log_tail()}") from exc
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def get_json(self, path: str, *, timeout: float = 60.0) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path}: HTTP {status}: {body}")
        return body

    def object_info(self, *, refresh: bool = False) -> dict[str, Any]:
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def nodes_of_pack(self, link_name: str | None = None) -> dict[str, dict[str, Any]]:
        """``/object_info`` entries whose ``python_module`` is this pack's folder."""
        name = link_name or self.link_name
        return {k: v for k, v in self.object_info().items()
                if str(v.get("python_module", "")).split(".", 1)[-1] == name}

    def upload_input(self, name: str, data: bytes) -> str:
        """Put a file into the server's input folder (what the image upload button does, without
        multipart): tests write it directly since the folder is theirs. Returns the name."""
        target = self.base_dir / "input" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return name

    def queue(self, graph: Mapping[str, Any], *, client_id: str | None = None,
              extra_data: Mapping[str, Any] | None = None, allow_partial: bool = False) -> str:
        """POST an API-format graph to /prompt; returns its prompt id.

        Raises PromptRejected when ComfyUI refuses it (HTTP 400: every output node failed
        validation). ComfyUI *accepts* a graph where only some output nodes fail validation: it
        runs the valid ones and reports the others in ``node_errors``. Unless ``allow_partial``,
        that is a PromptRejected too, raised after the partial run finished (so the server is idle
        for the next test)."""
        body: dict[str, Any] = {"prompt": dict(graph), "client_id": client_id or uuid.uuid4().hex}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        status, response = self.request("POST", "/prompt", body)
        if status == 400 and isinstance(response, Mapping):
            rejected = PromptRejected("", response)
            raise PromptRejected(f"ComfyUI refused the prompt: {rejected.details()}", response)
        if status != 200 or not isinstance(response, Mapping) or "prompt_id" not in response:
            raise ServerError(f"POST /prompt: HTTP {status}: {response}\n{self.log_tail()}")
        prompt_id = str(response["prompt_id"])
        if response.get("node_errors") and not allow_partial:
            try:
                self.wait(prompt_id)
            except PromptFailed:
                pass
            rejected = PromptRejected("", response)
            raise PromptRejected(
                f"ComfyUI refused part of the prompt (it ran only the valid outputs): {rejected.details()}", response
            )
        return prompt_id

    def wait(self, prompt_id: str, *, timeout: float = 300.0, poll_s: float = 0.25) -> dict[str, Any]:
        """Poll /history/<prompt_id> until the prompt finished; return its history entry
        (``outputs``: per-node ui outputs, ``status``: messages). Raises PromptFailed when a node
        raised (message: node id, type and exception) or on timeout (the prompt is interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")
            history = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
            entry = history.get(prompt_id) if isinstance(history, Mapping) else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise PromptFailed(f"prompt {prompt_id} failed: {execution_error(entry)}\n{self.log_tail(30)}",
                                       entry)
                return entry
            time.sleep(poll_s)
        self.interrupt()
        raise PromptFailed(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run(self, graph: Mapping[str, Any], *, timeout: float = 300.0) -> dict[str, Any]:
        """Queue a graph and wait for it; returns the history entry."""
        return self.wait(self.queue(graph), timeout=timeout)

    def clear_cache(self) -> None:
        """What the Free memory button does (POST /free): ComfyUI drops its cached outputs, so the next
        prompt runs every node again. The worker reads that flag only after its next wake-up, which may
        be the execution of a prompt queued right after: under load, the next prompt then ran on the
        old cache (seen on 0.3.64 with the other core busy). A trivial prompt run here takes that turn,
        so the flag is read, and the cache reset, before the caller queues anything."""
        status, _ = self.request("POST", "/free", {"free_memory": True, "unload_models": True})
        assert status == 200, status
        self.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                  "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, timeout=60)

    def interrupt(self) -> None:
        """What the Cancel button does: interrupt the running prompt."""
        self.request("POST", "/interrupt", {})


def execution_error(entry: Mapping[str, Any]) -> str:
    """The ``execution_error`` (or interruption) message of a history entry, in one line."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                    f"{data.get('exception_type')}: {data.get('exception_message')}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"status {entry.get('status')}"


# -- UI-format workflow -> API-format graph ------------------------------------------------------------

# Frontend-only node types: never sent to the server.
_VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
_UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "file_upload")
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4


class WorkflowError(ValueError):
    """A UI-format workflow that cannot be converted (names the node and what is wrong)."""


def _widget_inputs(spec: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, type, options) of the inputs the frontend shows as widgets, in widget order."""
    order = spec.get("input_order") or {k: list(v) for k, v in spec.get("input", {}).items()}
    widgets = []
    for category in ("required", "optional"):
        for name in order.get(category, []):
            definition = spec["input"][category][name]
            io_type = definition[0]
            options = definition[1] if len(definition) > 1 and isinstance(definition[1], Mapping) else {}
            if isinstance(io_type, list):  # V1 combo: the type is the list of choices
                io_type, options = "COMBO", {**options, "options": io_type}
            if io_type in _WIDGET_TYPES and not options.get("forceInput") and not options.get("rawLink"):
                widgets.append((name, io_type, dict(options)))
    return widgets


def has_control_widget(name: str, io_type: str, options: Mapping[str, Any]) -> bool:
    """Whether the frontend adds a "control after generate" combo after this widget: an INT with
    ``control_after_generate``, or -- when the option is absent, the frontend's legacy rule -- an INT
    named ``seed`` or ``noise_seed`` (frontend 1.27 ``useIntWidget``: ``control_after_generate ??
    ['seed', 'noise_seed'].includes(name)``); a COMBO with ``control_after_generate``."""
    if io_type == "INT":
        flag = options.get("control_after_generate")
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return io_type == "COMBO" and bool(options.get("control_after_generate"))


def has_upload_widget(io_type: str, options: Mapping[str, Any]) -> bool:
    """Whether the frontend adds an upload button (its saved value: "image") after this combo."""
    return io_type == "COMBO" and any(options.get(flag) for flag in _UPLOAD_FLAGS)


def _skip_frontend_values(name: str, io_type: str, options: Mapping[str, Any], values: list, position: int) -> int:
    """How many frontend-only values follow this widget's value at ``values[position]``: the
    "control after generate" combo of seeds and controlled combos (``has_control_widget``), and the
    upload button's value ("image") of upload combos."""
    if position >= len(values):
        return 0
    # older saves store True/False ("randomize"/"fixed"), or nothing at all
    if has_control_widget(name, io_type, options):
        value = values[position]
        return 1 if isinstance(value, bool) or (isinstance(value, str) and value in _CONTROL_VALUES) else 0
    if has_upload_widget(io_type, options):
        return 1
    return 0


def _links(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot); both the 0.4 list form and the 1.0 object form."""
    links = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, Mapping):
            links[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]))
        else:
            links[int(link[0])] = (int(link[1]), int(link[2]))
    return links


def workflow_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any], *,
                    strict: bool = True) -> dict[str, dict[str, Any]]:
    """Convert a UI-format workflow (format 0.4 or 1.0, as the frontend saves it) to the API format
    ``{node_id: {"class_type", "inputs"}}`` that ``POST /prompt`` takes, as the frontend would.

    Supported: widget values (positional ``widgets_values`` or a name->value dict), the frontend's
    extra values after seeds/controlled combos/upload combos, links, widgets converted to inputs,
    Reroute chains, PrimitiveNode values, muted nodes (mode 2, dropped) and bypassed nodes (mode 4:
    each output is fed from the first input of the same type). Notes are dropped. Subgraphs and
    group nodes are not supported (WorkflowError).

    ``strict`` (for the pack's own workflows): the number of widget values must match the node's
    definition exactly. ``strict=False`` ignores trailing values that frontend extensions add
    (preview or refresh widgets), as the frontend itself does.
    """
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        raise WorkflowError("not a UI-format workflow (expected an object with a 'nodes' list)")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by workflow_to_api; flatten the workflow first")
    nodes = {int(node["id"]): node for node in workflow.get("nodes", [])}
    links = _links(workflow)

    def resolve(link_id: int, seen: frozenset[int] = frozenset()) -> tuple[str, Any] | None:
        """Follow a link through reroutes/bypassed nodes: ("link", [id, slot]) or ("value", v);
        None when it ends at a muted node or nowhere."""
        if link_id in seen or link_id not in links:
            return None
        origin_id, slot = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} starts at node {origin_id}, which is not in the workflow")
        kind = origin.get("type")
        if kind == "Reroute":
            upstream = [i.get("link") for i in origin.get("inputs", []) if i.get("link") is not None]
            return resolve(upstream[0], seen | {link_id}) if upstream else None
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"PrimitiveNode {origin_id} has no value")
            return ("value", values[0])
        mode = origin.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            out_type = (origin.get("outputs") or [{}] * (slot + 1))[slot].get("type")
            for inp in origin.get("inputs", []):
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], seen | {link_id})
            return None
        return ("link", [str(origin_id), slot])

    graph: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        kind = node.get("type")
        if kind in _VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        spec = object_info.get(kind)
        if spec is None:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not installed in this ComfyUI (/object_info)")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        widgets = _widget_inputs(spec)
        if isinstance(values, Mapping):
            for name, _type, _options in widgets:
                if name in values:
                    inputs[name] = values[name]
        elif values:
            position, assigned = 0, 0
            for name, io_type, options in widgets:
                if position >= len(values):
                    break
                inputs[name] = values[position]
                assigned += 1
                position += 1
                position += _skip_frontend_values(name, io_type, options, values, position)
            if strict and (assigned < len(widgets) or position < len(values)):
                raise WorkflowError(
                    f"node {node_id} ({kind}): {len(values)} widget values for {len(widgets)} widgets "
                    f"({[w[0] for w in widgets]}); the workflow does not match this node's definition"
                )
        for name, _type, options in widgets:  # no saved value: the frontend uses the default
            if name not in inputs:
                if "default" in options:
                    inputs[name] = options["default"]
                elif options.get("options"):
                    inputs[name] = options["options"][0]
        for inp in node.get("inputs", []) or []:
            link_id = inp.get("link")
            name = inp.get("name")
            if name is None:
                continue
            if isinstance(inp.get("widget"), Mapping):
                name = inp["widget"].get("name", name)
            if link_id is None:
                continue
            resolved = resolve(int(link_id))
            if resolved is None:
                inputs.pop(name, None)
            else:
                inputs[name] = resolved[1]
        graph[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return graph


def load_workflow(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# -- node-definition snapshots (tests/data/object_info.json) -------------------------------------------

# Keyword arguments whose values the snapshot leaves out (``snapshot_node_definition``): editing a
# tooltip or a description changes nothing the snapshot holds, so it must not change its key.
_TEXT_ONLY_KEYWORDS = frozenset({"tooltip", "description"})


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return body[1:]
    return body


def _canonical_ast(node: Any) -> Any:
    """A JSON-able form of an AST that is the same on every Python >= 3.10: node type and fields,
    leaving out fields that are None or empty lists (3.12 added ``type_params=[]`` to every function
    and class, and ``ast.dump`` prints empty fields differently across versions), docstrings and the
    text-only keywords above. No line or column numbers: re-wrapping a line changes nothing."""
    if isinstance(node, ast.AST):
        fields = {}
        for name, value in ast.iter_fields(node):
            if name == "body" and isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                value = _without_docstring(value)
            elif name == "keywords":
                value = [keyword for keyword in value if keyword.arg not in _TEXT_ONLY_KEYWORDS]
            if value is None or (isinstance(value, list) and not value):
                continue
            fields[name] = _canonical_ast(value)
        return [type(node).__name__, fields]
    if isinstance(node, list):
        return [_canonical_ast(item) for item in node]
    return repr(node)  # a constant's value: str, bytes, int, float, complex, bool, Ellipsis


def node_code_sha256(repo: Path) -> str:
    """sha256 of the code of the pack's ``nodes/*.py``: names plus syntax trees without comments,
    docstrings, tooltips and descriptions (none of which the snapshot holds) or layout. Recorded in
    the snapshot, so a test without ComfyUI sees that node code changed after the snapshot was made,
    while a comment or docstring edit needs no ComfyUI run. Values a node takes from modules outside
    ``nodes/`` (a scorer list, a default) are not covered: the comfy and server tiers compare the
    live definitions with the snapshot."""
    digest = hashlib.sha256()
    for path in sorted((Path(repo) / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        code = json.dumps(_canonical_ast(tree), separators=(",", ":"))
        digest.update(path.name.encode() + b"\0" + code.encode() + b"\0")
    return digest.hexdigest()


# What the snapshot keeps of an /object_info entry: what validating a UI-format workflow needs (and
# the display name the thumbnails show). Tooltips and descriptions are left out, so editing them
# does not make the snapshot stale.
_SNAPSHOT_NODE_KEYS = ("name", "display_name", "category", "input", "input_order", "output", "output_is_list",
                       "output_name", "output_node")


def snapshot_node_definition(spec: Mapping[str, Any], dynamic_inputs: Iterable[str] = ()) -> dict[str, Any]:
    """One /object_info entry reduced to ``_SNAPSHOT_NODE_KEYS``, without tooltips; the choices of
    ``dynamic_inputs`` (combos listing files, e.g. ``ckpt_name``) are emptied, since they depend on
    the models folder of whoever runs ComfyUI."""
    dynamic = set(dynamic_inputs)
    node: dict[str, Any] = {key: spec[key] for key in _SNAPSHOT_NODE_KEYS if key in spec}
    inputs: dict[str, Any] = {}
    for category, entries in (spec.get("input") or {}).items():
        if category == "hidden":
            continue
        inputs[category] = {}
        for name, definition in entries.items():
            io_type = definition[0]
            options = dict(definition[1]) if len(definition) > 1 and isinstance(definition[1], Mapping) else None
            if options is not None:
                options.pop("tooltip", None)
            if name in dynamic:
                if isinstance(io_type, list):
                    io_type = []
                elif options is not None and "options" in options:
                    options["options"] = []
                if options is not None and "default" in options:
                    options.pop("default")
            inputs[category][name] = [io_type] if options is None else [io_type, options]
    node["input"] = inputs
    if "input_order" in node:
        node["input_order"] = {k: v for k, v in node["input_order"].items() if k != "hidden"}
    return node


# The ComfyUI versions the pack supports (pyproject's requires-comfyui spans them): the snapshot holds
# the node definitions of each, and the shipped workflows are validated against every one.
SUPPORTED_COMFYUI_VERSIONS = ("0.3.64", "0.33.0")
SNAPSHOT_PATH = Path(__file__).resolve().parents[1] / "data" / "object_info.json"


def load_snapshot(path: str | os.PathLike = SNAPSHOT_PATH) -> dict[str, Any]:
    """tests/data/object_info.json: ``{"versions": {comfyui version: {"nodes", "dynamic_combos",
    "node_code_sha256"}}}``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def snapshot_version(snapshot: Mapping[str, Any], version: str | None = None) -> dict[str, Any]:
    """One version's entry of the snapshot (default: the oldest supported one, whose frontend the
    shipped workflows are written for). A version the snapshot lacks is a ServerError saying how to
    add it."""
    version = version or SUPPORTED_COMFYUI_VERSIONS[0]
    versions = snapshot.get("versions") or {}
    if version not in versions:
        raise ServerError(f"tests/data/object_info.json has no entry for ComfyUI {version} (it has "
                          f"{', '.join(versions) or 'none'}); run `COMFYUI_PATH=<ComfyUI {version}> "
                          ".venv/bin/python tests/data/make_object_info.py`")
    return versions[version]


def version_key(version: str) -> tuple[int, ...]:
    """A ComfyUI version as numbers, to compare versions ("0.3.64" < "0.3.74" < "0.33.0")."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


def min_comfyui_version(workflow: Mapping[str, Any]) -> str | None:
    """The oldest ComfyUI a shipped workflow loads in, as tools/build_workflows.py records it in the
    workflow's ``extra`` (None: every supported version)."""
    return workflow.get("extra", {}).get("versat2i", {}).get("min_comfyui_version")


def supports(workflow: Mapping[str, Any], version: str) -> bool:
    """Whether ComfyUI ``version`` is one a shipped workflow loads in (``min_comfyui_version``)."""
    needed = min_comfyui_version(workflow)
    return needed is None or version_key(version) >= version_key(needed)


def comfyui_version(comfyui_path: str | os.PathLike) -> str:
    """The version a ComfyUI checkout declares (comfyui_version.py)."""
    text = (Path(comfyui_path) / "comfyui_version.py").read_text(encoding="utf-8")
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return match.group(1) if match else "unknown"


def snapshot_definitions(object_info: Mapping[str, Any], node_types: Iterable[str],
                         dynamic_combos: Mapping[str, Iterable[str]]) -> dict[str, dict[str, Any]]:
    """``snapshot_node_definition`` of each of ``node_types`` (sorted)."""
    missing = sorted(set(node_types) - set(object_info))
    if missing:
        raise ServerError(f"node types not in /object_info: {missing}")
    return {kind: snapshot_node_definition(object_info[kind], dynamic_combos.get(kind, ()))
            for kind in sorted(set(node_types))}


# Combo inputs whose choices our nodes take from ComfyUI itself (Generate Candidates offers exactly
# the core KSampler's samplers and schedulers). Their lists differ between ComfyUI versions (0.33
# added samplers), so comparing our nodes with a snapshot from another version names the core input
# instead of its list: the node must still offer the same choices as this version's KSampler.
CORE_CHOICE_SOURCES = (("KSampler", "sampler_name"), ("KSampler", "scheduler"))


def _choices(definition: list) -> list | None:
    """The choices of an input definition: old style ``[[choices], {...}]`` or ``["COMBO", {"options"}]``."""
    if isinstance(definition[0], list):
        return definition[0]
    options = definition[1] if len(definition) > 1 and isinstance(definition[1], Mapping) else {}
    return options.get("options")


def with_core_choices_named(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` (a snapshot-reduced definition) with every choice list equal to one of
    ``CORE_CHOICE_SOURCES`` in ``definitions`` (the /object_info or snapshot it comes with) replaced
    by that source's name."""
    sources = {}
    for kind, name in CORE_CHOICE_SOURCES:
        spec = (definitions.get(kind) or {}).get("input", {}).get("required", {}).get(name)
        if spec and _choices(spec):
            sources[tuple(_choices(spec))] = f"<the choices of {kind}.{name}>"
    named = json.loads(json.dumps(node))
    for entries in named.get("input", {}).values():
        for definition in entries.values():
            choices = _choices(definition)
            if choices and tuple(choices) in sources:
                if isinstance(definition[0], list):
                    definition[0] = [sources[tuple(choices)]]
                else:
                    definition[1]["options"] = [sources[tuple(choices)]]
    return named


# -- UI-format workflow validation against node definitions ---------------------------------------------

_REQUIRED_NODE_MODES = {MODE_ALWAYS, MODE_NEVER, MODE_BYPASS}


def types_compatible(received: str, expected: str) -> bool:
    """ComfyUI's link type rule (``comfy_execution.validation.validate_node_input``, non-strict):
    equal, either is ``*``, or the comma-separated type sets overlap."""
    if received == expected or received == "*" or expected == "*":
        return True
    received_set = {t.strip() for t in str(received).split(",")}
    expected_set = {t.strip() for t in str(expected).split(",")}
    return bool(received_set & expected_set)


def _input_definitions(spec: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, Any], bool]]:
    """name -> (type, options, required) of a node definition's inputs; a V1 combo (list of
    choices) becomes ``("COMBO", {"options": [...]})``."""
    found = {}
    for category in ("required", "optional"):
        for name, definition in ((spec.get("input") or {}).get(category) or {}).items():
            io_type = definition[0]
            options = dict(definition[1]) if len(definition) > 1 and isinstance(definition[1], Mapping) else {}
            if isinstance(io_type, list):
                io_type, options = "COMBO", {**options, "options": io_type}
            found[name] = (io_type, options, category == "required")
    return found


def _widget_value_problem(value: Any, io_type: str, options: Mapping[str, Any], *, dynamic: bool) -> str | None:
    """Why ``value`` is not a valid value of a widget, or None."""
    if io_type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not a whole number"
    elif io_type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
    elif io_type == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not text"
    elif io_type == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not true/false"
    elif io_type == "COMBO":
        if not isinstance(value, str) or (not value and dynamic):
            return f"{value!r} is not a choice"
        choices = options.get("options") or []
        if not dynamic and value not in choices:
            shown = ", ".join(map(str, choices[:8])) + ("..." if len(choices) > 8 else "")
            return f"{value!r} is not one of its choices ({shown})"
    if io_type in ("INT", "FLOAT"):
        if options.get("min") is not None and value < options["min"]:
            return f"{value!r} is below its minimum {options['min']}"
        if options.get("max") is not None and value > options["max"]:
            return f"{value!r} is above its maximum {options['max']}"
    return None


def validate_workflow(workflow: Mapping[str, Any], object_info: Mapping[str, Any], *,
                      dynamic_combos: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """Check a UI-format workflow (format 0.4, as the frontend saves it) against node definitions
    (``/object_info`` or a snapshot of it) the way the frontend reads it; returns the problems found
    (empty: valid).

    Checked: every node type exists (or is frontend-only: Note, MarkdownNote, PrimitiveNode,
    Reroute); inputs and outputs match the definition (names, types, order of outputs; a core node
    may lack trailing outputs a newer ComfyUI added); every
    required socket input is linked; ``widgets_values`` has one value per widget plus the
    frontend-only values (a seed's "control after generate", an upload button), each of the right
    type and range, combos one of their choices (except ``dynamic_combos``, whose choices are files
    on someone's disk, linked widgets, whose value comes from the link, and muted nodes' combos);
    links are consistent on both ends and their types match the output and the input (ComfyUI's own
    rule); Primitive nodes feed widget inputs with a valid value; the graph has an active output
    node; the id counters cover every id.
    """
    dynamic = {kind: set(names) for kind, names in (dynamic_combos or {}).items()}
    problems: list[str] = []
    nodes_list = workflow.get("nodes")
    if not isinstance(nodes_list, list):
        return ["not a UI-format workflow: no 'nodes' list"]
    nodes: dict[int, Mapping[str, Any]] = {}
    for node in nodes_list:
        if node.get("id") in nodes:
            problems.append(f"node id {node.get('id')} is used twice")
        nodes[node.get("id")] = node

    def where(node: Mapping[str, Any]) -> str:
        return f"node {node.get('id')} ({node.get('type')}{' ' + repr(node['title']) if node.get('title') else ''})"

    # -- links: both ends exist and agree ---------------------------------------------------------------
    links: dict[int, tuple[int, int, int, int, str]] = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, Mapping):
            entry = (raw.get("id"), raw.get("origin_id"), raw.get("origin_slot"), raw.get("target_id"),
                     raw.get("target_slot"), raw.get("type"))
        else:
            entry = tuple(raw[:6]) if len(raw) >= 6 else None
        if entry is None or not all(isinstance(v, int) for v in entry[:5]):
            problems.append(f"link {raw!r}: expected [id, origin id, origin slot, target id, target slot, type]")
            continue
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = entry
        if link_id in links:
            problems.append(f"link id {link_id} is used twice")
        links[link_id] = (origin_id, origin_slot, target_id, target_slot, link_type)
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id}: connects node {origin_id} to node {target_id}, which do not both exist")
            continue
        outputs, inputs = origin.get("outputs") or [], target.get("inputs") or []
        if not 0 <= origin_slot < len(outputs) or link_id not in (outputs[origin_slot].get("links") or []):
            problems.append(f"link {link_id}: {where(origin)} output {origin_slot} does not list it")
        if not 0 <= target_slot < len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"link {link_id}: {where(target)} input {target_slot} does not point back at it")
    for node in nodes.values():
        for slot, entry in enumerate(node.get("outputs") or []):
            for link_id in entry.get("links") or []:
                if link_id not in links or links[link_id][:2] != (node.get("id"), slot):
                    problems.append(f"{where(node)}: output {entry.get('name')!r} lists link {link_id}, which does "
                                    "not start there")
        for entry in node.get("inputs") or []:
            if entry.get("link") is not None and entry["link"] not in links:
                problems.append(f"{where(node)}: input {entry.get('name')!r} points at link {entry['link']}, which "
                                "does not exist")

    def target_widget_spec(link_id: int) -> tuple[Mapping[str, Any], str, dict[str, Any]] | None:
        """(target node, type, options) of the widget input a link ends at, if it is one."""
        _, _, target_id, target_slot, _ = links[link_id]
        target = nodes.get(target_id)
        spec = object_info.get(target.get("type")) if target else None
        inputs = (target or {}).get("inputs") or []
        if spec is None or not 0 <= target_slot < len(inputs):
            return None
        name = (inputs[target_slot].get("widget") or {}).get("name") or inputs[target_slot].get("name")
        definition = _input_definitions(spec).get(name)
        return (target, definition[0], definition[1]) if definition else None

    # -- nodes ----------------------------------------------------------------------------------------
    active_outputs = 0
    for node in nodes.values():
        kind = node.get("type")
        mode = node.get("mode", MODE_ALWAYS)
        if mode not in _REQUIRED_NODE_MODES:
            problems.append(f"{where(node)}: mode {mode!r} is not 0 (always), 2 (muted) or 4 (bypassed)")
        if kind in ("Note", "MarkdownNote"):
            values = node.get("widgets_values") or []
            if len(values) != 1 or not isinstance(values[0], str):
                problems.append(f"{where(node)}: a note holds one text value, found {values!r}")
            continue
        if kind == "PrimitiveNode":
            outputs = node.get("outputs") or []
            link_ids = [i for o in outputs for i in (o.get("links") or [])]
            values = node.get("widgets_values") or []
            if not link_ids:
                problems.append(f"{where(node)}: a Primitive node that feeds nothing")
            for link_id in link_ids:
                if link_id not in links:
                    continue
                found = target_widget_spec(link_id)
                if found is None or not ((found[0].get("inputs") or [])[links[link_id][3]].get("widget")):
                    problems.append(f"{where(node)}: link {link_id} does not end at a widget input")
                    continue
                target, io_type, options = found
                if outputs and outputs[0].get("type") != io_type:
                    problems.append(f"{where(node)}: feeds a {io_type} input of {where(target)} "
                                    f"but is {outputs[0].get('type')}")
                name = (target.get("inputs") or [])[links[link_id][3]]["widget"]["name"]
                problem = _widget_value_problem(values[0] if values else None, io_type, options,
                                                dynamic=name in dynamic.get(target.get("type"), ()))
                if problem:
                    problems.append(f"{where(node)}: value for {where(target)}.{name}: {problem}")
            if len(values) > 1 and values[1] not in _CONTROL_VALUES:
                problems.append(f"{where(node)}: control value {values[1]!r} is not one of {sorted(_CONTROL_VALUES)}")
            continue
        if kind == "Reroute":
            continue
        spec = object_info.get(kind)
        if spec is None:
            problems.append(f"{where(node)}: node type {kind!r} does not exist")
            continue
        definitions = _input_definitions(spec)
        widgets = _widget_inputs(spec)
        widget_names = {w[0] for w in widgets}
        active = mode == MODE_ALWAYS
        if spec.get("output_node") and active:
            active_outputs += 1

        # inputs
        seen = set()
        for entry in node.get("inputs") or []:
            name = entry.get("name")
            widget_name = (entry.get("widget") or {}).get("name")
            key = widget_name or name
            if key in seen:
                problems.append(f"{where(node)}: input {key!r} listed twice")
            seen.add(key)
            if key not in definitions:
                problems.append(f"{where(node)}: input {key!r} is not an input of {kind} ({', '.join(definitions)})")
                continue
            io_type = definitions[key][0]
            if entry.get("type") != io_type:
                problems.append(f"{where(node)}: input {key!r} is typed {entry.get('type')!r}, "
                                f"the definition says {io_type!r}")
            if widget_name and key not in widget_names:
                problems.append(f"{where(node)}: input {key!r} is marked as a widget but {kind} has no such widget")
            if not widget_name and key in widget_names:
                problems.append(f"{where(node)}: input {key!r} is a widget of {kind} but has no 'widget' entry")
            link_id = entry.get("link")
            if link_id in links:
                origin_id, origin_slot, _, _, link_type = links[link_id]
                origin = nodes.get(origin_id) or {}
                origin_type = ((origin.get("outputs") or [{}] * (origin_slot + 1))[origin_slot] or {}).get("type") \
                    if 0 <= origin_slot < len(origin.get("outputs") or []) else None
                if link_type != origin_type:
                    problems.append(f"{where(node)}: link {link_id} is typed {link_type!r} but starts at an output "
                                    f"of type {origin_type!r}")
                if origin_type is not None and not types_compatible(str(origin_type), str(io_type)):
                    problems.append(f"{where(node)}: input {key!r} ({io_type}) is linked to a {origin_type} output "
                                    f"of {where(origin)}")
        for name, (io_type, _options, required) in definitions.items():
            if name in widget_names:
                continue
            listed = [e for e in node.get("inputs") or [] if e.get("name") == name and not e.get("widget")]
            if not listed:
                problems.append(f"{where(node)}: socket input {name!r} ({io_type}) is missing from its inputs")
            elif required and active and listed[0].get("link") is None:
                problems.append(f"{where(node)}: required input {name!r} ({io_type}) is not connected")

        # outputs
        outputs = node.get("outputs") or []
        expected = list(zip(spec.get("output") or [], spec.get("output_name") or spec.get("output") or []))
        # A core node may have fewer: a newer ComfyUI can add outputs to it (0.33's PreviewImage has
        # one), and the frontend adds them to a saved node when it loads it.
        if len(outputs) > len(expected) or (len(outputs) < len(expected) and str(kind).startswith(PACK_NODE_PREFIX)):
            problems.append(f"{where(node)}: {len(outputs)} outputs, the definition has {len(expected)}")
        for slot, (entry, (out_type, out_name)) in enumerate(zip(outputs, expected)):
            if entry.get("type") != out_type or entry.get("name") != out_name:
                problems.append(f"{where(node)}: output {slot} is {entry.get('name')!r}: {entry.get('type')!r}, the "
                                f"definition says {out_name!r}: {out_type!r}")

        # widget values, positionally, with the frontend-only values between them
        values = node.get("widgets_values")
        if isinstance(values, Mapping):
            problems.append(f"{where(node)}: widgets_values is an object; the shipped format is a list")
            continue
        values = list(values or [])
        expected_count = sum(1 + has_control_widget(n, t, o) + has_upload_widget(t, o) for n, t, o in widgets)
        if len(values) != expected_count:
            names = [n for n, _, _ in widgets]
            problems.append(f"{where(node)}: {len(values)} widget values, {kind} needs {expected_count} "
                            f"(widgets {names}, plus a control value after each seed)")
            continue
        linked = {(e.get("widget") or {}).get("name") for e in node.get("inputs") or [] if e.get("link") is not None}
        position = 0
        for name, io_type, options in widgets:
            # A linked widget keeps a stale value in the file (the link's value replaces it when
            # queued, a Primitive's is checked above): only its type must fit.
            # A muted node is not queued: the files it names need not exist yet.
            problem = _widget_value_problem(values[position], io_type, {} if name in linked else options,
                                            dynamic=name in dynamic.get(kind, ()) or name in linked or (
                                                mode == MODE_NEVER and io_type == "COMBO"))
            if problem:
                problems.append(f"{where(node)}: widget {name!r}: {problem}")
            position += 1
            if has_control_widget(name, io_type, options):
                if values[position] not in _CONTROL_VALUES:
                    problems.append(f"{where(node)}: the control value after {name!r} is {values[position]!r}, not "
                                    f"one of {sorted(_CONTROL_VALUES)}")
                position += 1
            if has_upload_widget(io_type, options):
                position += 1

    if active_outputs == 0:
        problems.append("no active output node (ComfyUI refuses a prompt without one)")
    node_ids = [k for k in nodes if isinstance(k, int)]
    if node_ids and (not isinstance(workflow.get("last_node_id"), int) or workflow["last_node_id"] < max(node_ids)):
        problems.append(f"last_node_id {workflow.get('last_node_id')!r} is below the largest node id")
    if links and (not isinstance(workflow.get("last_link_id"), int) or workflow["last_link_id"] < max(links)):
        problems.append(f"last_link_id {workflow.get('last_link_id')!r} is below the largest link id")
    for group in workflow.get("groups") or []:
        bounding = group.get("bounding")
        if not (isinstance(bounding, list) and len(bounding) == 4
                and all(isinstance(v, (int, float)) for v in bounding)):
            problems.append(f"group {group.get('title')!r}: bounding {bounding!r} is not [x, y, width, height]")
    return problems
