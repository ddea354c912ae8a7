"""Run a training program in a child process under ``accelerate launch``, and stop it on demand.

* The command is an argument list starting with ``sys.executable`` (never a shell string, never a
  bare ``python``), so a ComfyUI running from a venv or an embedded Python trains with that same
  interpreter.
* The child runs in its own process group (session): cancelling kills the group, i.e. the
  accelerate launcher *and* every training process it started, SIGTERM then SIGKILL, within
  ``CANCEL_TIMEOUT_S``. Processes that left the group are killed too: with several processes
  accelerate runs torchrun, which starts each worker in a session of its own
  (``start_new_session=True``), so the child's descendants are collected (psutil) before any signal
  and signalled one by one; after the launcher dies they would be orphans no group kill reaches.
* stdout/stderr are merged and read live: lines that are events (``trainer/events.py``) go to
  ``on_event``; the last lines are kept, so a failed run raises ``TrainingFailed`` carrying them.
  A run that exits 0 without a ``done`` event is a failure too.
* Environment: the parent's, offline (``offline.py``), so a user's accelerate config (``$HF_HOME/accelerate/
  default_config.yaml``: several GPUs, several machines) is respected. Without such a config the
  launch is one process, no dynamo, explicitly (accelerate would otherwise warn, or start one
  process per visible GPU). Tests pass their own ``env`` (an isolated ``HF_HOME``).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # a dependency of accelerate (and of ComfyUI)

from ..offline import offline_environment
from ..safe_io import readable_name
from .events import parse_event_line

logger = logging.getLogger(__name__)

ENTRY_SCRIPT = Path(__file__).resolve().parent / "launch_entry.py"
TRAIN_LORA_PROGRAM = "trainer.train_lora"
CANCEL_TIMEOUT_S = 5.0
TERM_GRACE_S = 2.0
TAIL_LINES = 40


@readable_name
class TrainingFailed(RuntimeError):
    """The child exited with an error; ``str()`` carries its last output lines."""

    def __init__(self, message: str, *, returncode: int | None, tail: list[str], error_event: dict | None = None):
        super().__init__(message)
        self.returncode, self.tail, self.error_event = returncode, tail, error_event


@readable_name
class TrainingCancelled(RuntimeError):
    """Raised by ``run_training`` when ``check_cancel`` returned True."""


@dataclass(frozen=True)
class LaunchOptions:
    """How ``accelerate launch`` is invoked.

    ``accelerate_config``: ``"auto"`` uses the user's default accelerate config when it exists (else
    one process); a path uses that file. ``cpu``: force the CPU (ComfyUI started with ``--cpu``).
    """

    accelerate_config: str = "auto"
    cpu: bool = False
    num_processes: int | None = None  # only used without an accelerate config
    extra_args: tuple[str, ...] = ()


def default_accelerate_config(env: Mapping[str, str]) -> Path:
    """Where ``accelerate config`` saved its answers for ``env`` (mirrors accelerate's own lookup,
    computed from ``env`` rather than this process's environment)."""
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "accelerate" / "default_config.yaml"


def build_launch_command(script_args: Sequence[str], options: LaunchOptions = LaunchOptions(), *,
                         env: Mapping[str, str] | None = None, script: str | os.PathLike = ENTRY_SCRIPT) -> list[str]:
    """``[sys.executable, "-m", "accelerate.commands.launch", <accelerate args>, <script>, <script args>]``."""
    env = os.environ if env is None else env
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if options.accelerate_config not in ("", "auto"):
        command += ["--config_file", str(options.accelerate_config)]
    elif options.cpu or not default_accelerate_config(env).is_file():
        command += ["--num_processes", str(options.num_processes or 1), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    if options.cpu:
        command.append("--cpu")
    command += list(options.extra_args)
    command += [str(script), *map(str, script_args)]
    return command


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    # Offline: the training process loads only local files, and its libraries must not phone home
    # (peft -> bitsandbytes -> kernels asks the Hub for a CPU kernel; see offline.py).
    env = offline_environment(base)
    env["PYTHONUNBUFFERED"] = "1"  # events must arrive as they happen, not when a buffer fills
    env.setdefault("PYTHONIOENCODING", "utf-8")
    # The training processes stop by themselves when this process dies without cancelling them
    # (ComfyUI or `versat2i loop` killed -9): they run in sessions of their own, so no signal
    # reaches them then. Their next write into our dead pipe would fail, but loading a model or
    # caching latents can be silent for minutes while holding the GPU and the work folder's lock;
    # launch_entry.py watches this process instead.
    env[PARENT_ENV] = parent_token()
    return env


PARENT_ENV = "VERSAT2I_PARENT"  # read by launch_entry.py (which defines it again: it runs before the pack loads)


def parent_token(pid: int | None = None) -> str:
    """``<pid>:<start time>`` of a process: the start time tells it from a later process that got
    the same pid."""
    process = psutil.Process(pid)
    return f"{process.pid}:{process.create_time():.3f}"


# -- the child process ---------------------------------------------------------------------------------

class TrainingProcess:
    """A started child in its own process group, with its merged output read by a thread."""

    def __init__(self, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 output_log: str | os.PathLike | None = None, tail_lines: int = TAIL_LINES):
        self.command = list(command)
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._lines: queue.Queue[str | None] = queue.Queue()
        popen_kwargs: dict[str, Any] = {}
        if os.name == "nt":
            popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            popen_kwargs["start_new_session"] = True  # setsid: the child leads a new process group
        self._log = open(output_log, "a", encoding="utf-8") if output_log else None
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=child_environment(env), text=True, encoding="utf-8", errors="replace", bufsize=1,
            **popen_kwargs)
        self.pgid = self.process.pid  # == the group id (setsid)
        self._descendants: list[psutil.Process] = []  # filled by kill()
        self._reader = threading.Thread(target=self._read, name="versat2i-train-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # This thread alone touches the pipe (closing it from another thread while a read is blocked
        # would wait for whoever still holds the write end).
        try:
            with self.process.stdout:
                for line in self.process.stdout:
                    self._lines.put(line.rstrip("\n"))
        finally:
            self._lines.put(None)

    def lines(self, poll_s: float = 0.1):
        """Yield output lines; yields ``None`` every ``poll_s`` while the child is quiet; ends at EOF."""
        while True:
            try:
                line = self._lines.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            if line is None:
                return
            self.tail.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()
            yield line

    def group_alive(self) -> bool:
        """True while a live process remains in the child's process group."""
        if os.name == "nt":
            return self.process.poll() is None
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists but is no longer ours
            return True
        return _group_has_live_members(self.pgid)

    def alive(self) -> bool:
        """True while the group or any descendant collected by ``kill`` (e.g. a torchrun worker in a
        session of its own) is alive."""
        return self.group_alive() or bool(_live(self._descendants))

    def _collect_descendants(self) -> None:
        """Add the child's current descendants (recursive, whatever their group or session) to the
        processes ``kill`` signals. psutil's objects remember each process's start time, so a pid
        reused after the process died is never signalled."""
        try:
            found = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:  # the child is gone: its orphans were collected while it lived, or never existed
            return
        known = set(self._descendants)
        self._descendants += [proc for proc in found if proc not in known]

    def _signal_all(self, sig: int) -> None:
        _signal_group(self.pgid, sig)
        for proc in _live(self._descendants):
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def kill(self, timeout: float = CANCEL_TIMEOUT_S) -> None:
        """SIGTERM the whole group and every descendant, SIGKILL what is left after a grace period;
        waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            # Collected before any signal: once the child dies its descendants are re-parented and
            # can no longer be found from it.
            self._collect_descendants()
            self._signal_all(signal.SIGTERM)
            grace_end = min(deadline, time.monotonic() + TERM_GRACE_S)
            while time.monotonic() < grace_end and self.alive():
                self._collect_descendants()  # started while shutting down (e.g. a restarted worker)
                self._reap()
                time.sleep(0.05)
            if self.alive():
                self._collect_descendants()
                self._signal_all(signal.SIGKILL)
        while time.monotonic() < deadline and (self.process.poll() is None or self.alive()):
            self._reap()
            time.sleep(0.05)
        self._reap()
        if self.alive():
            logger.warning("training processes of group %s still alive %.1f s after the kill", self.pgid, timeout)

    def _reap(self) -> None:
        try:
            self.process.wait(timeout=0)
        except subprocess.TimeoutExpired:
            pass

    def wait(self) -> int:
        returncode = self.process.wait()
        self._reader.join(timeout=5)
        return returncode

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_has_live_members(pgid: int) -> bool:
    """True when a process of the group is alive and not a zombie (an orphaned zombie can linger
    until its new parent reaps it, and ``kill(0)`` still reports it)."""
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def _live(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (zombies count as dead: they only wait to be reaped)."""
    live = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.Error:
            continue
    return live


@dataclass
class TrainingResult:
    done: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lora_path(self) -> Path:
        return Path(self.done["lora_path"])

    @property
    def losses(self) -> list[tuple[int, float]]:
        by_step = {e["step"]: e["loss"] for e in self.events if e["event"] == "step" and e["loss"] is not None}
        return sorted(by_step.items())


def run_training(program_args: Sequence[str], *, program: str = TRAIN_LORA_PROGRAM,
                 options: LaunchOptions = LaunchOptions(), env: Mapping[str, str] | None = None,
                 **kwargs) -> TrainingResult:
    """Launch ``program`` (a pack module, e.g. ``trainer.train_lora``) under ``accelerate launch``
    and run it to the end with ``run_command``."""
    command = build_launch_command([program, *program_args], options, env=env)
    return run_command(command, env=env, **kwargs)


def run_command(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                on_event: Callable[[dict], None] | None = None, check_cancel: Callable[[], bool] | None = None,
                output_log: str | os.PathLike | None = None,
                on_start: Callable[[TrainingProcess], None] | None = None) -> TrainingResult:
    """Start ``command`` in its own process group, stream its events, return the ``done`` event
    with all events seen.

    ``check_cancel`` is called about every 0.1 s; returning True (or raising, e.g. ComfyUI's
    ``InterruptProcessingException``) kills the process group and raises ``TrainingCancelled`` (or
    re-raises). An exception raised by ``on_event`` also kills the child first.
    """
    logger.info("launching: %s", " ".join(command))
    child = TrainingProcess(command, env=env, output_log=output_log)
    events: list[dict[str, Any]] = []
    try:
        if on_start is not None:
            on_start(child)
        for line in child.lines():
            if line is not None:
                event = parse_event_line(line)
                if event is not None:
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
            if check_cancel is not None and check_cancel():
                raise TrainingCancelled("training cancelled; the last checkpoint is kept (resume with --resume latest)")
        returncode = child.wait()
    except BaseException:
        child.kill()
        child.close()
        raise
    child.close()
    done = next((e for e in reversed(events) if e["event"] == "done"), None)
    error = next((e for e in reversed(events) if e["event"] == "error"), None)
    if returncode != 0 or done is None:
        tail = list(child.tail)
        if error is not None and error.get("user_error"):
            # A refusal or what the system refused (disk full...): its one line says what and the fix.
            where = f" (the training output is in {output_log})" if output_log else ""
            raise TrainingFailed(f"training stopped: {error['message']}{where}", returncode=returncode, tail=tail,
                                 error_event=error)
        reason = f"exited with code {returncode}" if returncode != 0 else "exited without finishing (no 'done' event)"
        message = f"training {reason}"
        if error is not None:
            message += f": {error['message']}"
        message += "\n--- last output lines ---\n" + "\n".join(tail)
        raise TrainingFailed(message, returncode=returncode, tail=tail, error_event=error)
    return TrainingResult(done=done, events=events)
