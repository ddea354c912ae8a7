"""Progress events of a training run, one JSON object per line.

The training program writes them (main process only) to its log file and to stdout; the launcher
parses the child's stdout and hands them to the node (progress bar, loss curve) or the CLI (progress.Progress).
Everything else on stdout/stderr (library warnings, tracebacks) is plain text and is kept only for
the error tail.

Schema (``"v": 1``; every event has ``"event"``, ``"v"``, ``"time"`` (unix seconds))::

    start       total_steps, start_step, num_examples, output        (+ resumed_from)
    step        step, total, loss, lr, eta_s                         (+ epoch)
    checkpoint  step, path
    sample      step, paths (preview images written to the run folder)  (+ prompts)
    done        step, lora_path                                      (+ elapsed_s)
    error       message                                              (+ error_type)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

SCHEMA_VERSION = 1

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("total_steps", "start_step", "num_examples", "output"),
    "step": ("step", "total", "loss", "lr", "eta_s"),
    "checkpoint": ("step", "path"),
    "sample": ("step", "paths"),
    "done": ("step", "lora_path"),
    "error": ("message",),
}


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event dict; raises ValueError for an unknown kind or a missing required field."""
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(REQUIRED_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in fields]
    if missing:
        raise ValueError(f"{kind} event is missing {', '.join(missing)}")
    return {"event": kind, "v": SCHEMA_VERSION, "time": round(time.time(), 3), **fields}


def encode_event(event: dict[str, Any]) -> str:
    # NaN/inf are not JSON: a diverged loss is reported as null rather than breaking the parser.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
    return json.dumps(clean, separators=(",", ":"), default=str)


def parse_event_line(line: str) -> dict[str, Any] | None:
    """The event on ``line``, or None if the line is not one of ours (plain log output)."""
    line = line.strip()
    if not line.startswith("{") or '"event"' not in line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("v") != SCHEMA_VERSION:
        return None
    kind = event.get("event")
    if kind not in REQUIRED_FIELDS or any(name not in event for name in REQUIRED_FIELDS[kind]):
        return None
    return event


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every event in a log file (other lines are skipped)."""
    with open(path, encoding="utf-8") as f:
        return [event for event in map(parse_event_line, f) if event is not None]


class EventWriter:
    """Writes events to a JSON-lines log file (appending, so a resumed run continues it) and a stream.

    Each line is flushed at once: the launcher reads the child's stdout live, and a run killed with
    SIGKILL must leave a log that ends at its last complete event.
    """

    def __init__(self, log_path: str | os.PathLike | None, stream: TextIO | None = sys.stdout):
        self.stream = stream
        self.log_path = Path(log_path) if log_path is not None else None  # where a resumed run reads its history
        self._file = None
        if log_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._file = open(log_path, "a", encoding="utf-8")

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = make_event(kind, **fields)
        line = encode_event(event) + "\n"
        if self._file is not None:
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                # A full disk must not end the run at a log line: the events still reach the launcher
                # through the stream, and the next checkpoint says what is wrong (and stops the run).
                print(f"training log {self.log_path}: {exc}; no more events are written to it", file=sys.stderr)
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None
        if self.stream is not None:
            self.stream.write(line)
            self.stream.flush()
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
