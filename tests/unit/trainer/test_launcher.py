"""The launcher: argument-list commands, event streaming, error tails, and killing the whole process
group on cancel. Children here are small ``python -c`` scripts (fast); the real trainer under
``accelerate launch`` is exercised in test_train_lora.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from versat2i.trainer import launcher
from versat2i.trainer.launcher import (
    ENTRY_SCRIPT,
    LaunchOptions,
    TrainingCancelled,
    TrainingFailed,
    build_launch_command,
    run_command,
)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group checks use POSIX signals")

EVENT = 'print(json.dumps({"event": %r, "v": 1, "time": 0, **%r}), flush=True)'


def script(*lines: str) -> list[str]:
    return [sys.executable, "-c", "import json, os, sys, time, subprocess\n" + "\n".join(lines)]


def event(kind: str, **fields) -> str:
    return EVENT % (kind, fields)


def alive_members(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.info["pid"])
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def test_command_is_an_argument_list_with_this_interpreter(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    command = build_launch_command(["trainer.train_lora", "--config", "a b.toml"], env=env)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[-4:] == [str(ENTRY_SCRIPT), "trainer.train_lora", "--config", "a b.toml"]
    assert command[3:command.index(str(ENTRY_SCRIPT))] == [
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert all(isinstance(part, str) for part in command)


def test_a_users_accelerate_config_is_respected(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    user_config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text("num_processes: 2\n")
    command = build_launch_command(["x"], env=env)
    assert "--num_processes" not in command  # accelerate reads the user's file itself
    explicit = build_launch_command(["x"], LaunchOptions(accelerate_config=str(tmp_path / "c.yaml")), env=env)
    assert explicit[3:5] == ["--config_file", str(tmp_path / "c.yaml")]
    assert "--cpu" in build_launch_command(["x"], LaunchOptions(cpu=True), env=env)


def test_events_are_streamed_and_the_done_event_returned(tmp_path):
    seen = []
    result = run_command(script(
        event("start", total_steps=2, start_step=0, num_examples=1, output="o"),
        "print('some library warning', file=sys.stderr, flush=True)",
        event("step", step=1, total=2, loss=0.5, lr=0.1, eta_s=1.0),
        event("step", step=2, total=2, loss=0.25, lr=0.1, eta_s=0.0),
        event("done", step=2, lora_path=str(tmp_path / "x.safetensors")),
    ), on_event=lambda e: seen.append(e["event"]), output_log=tmp_path / "out.log")
    assert seen == ["start", "step", "step", "done"]
    assert result.losses == [(1, 0.5), (2, 0.25)]
    assert result.lora_path == tmp_path / "x.safetensors"
    assert "some library warning" in (tmp_path / "out.log").read_text()


def test_a_crash_raises_with_the_error_event_and_the_last_lines():
    with pytest.raises(TrainingFailed) as err:
        run_command(script(
            event("start", total_steps=2, start_step=0, num_examples=1, output="o"),
            event("error", message="ValueError: the dataset is empty"),
            "raise SystemExit('Traceback line from the child')",
        ))
    message = str(err.value)
    assert err.value.returncode == 1
    assert "exited with code 1: ValueError: the dataset is empty" in message
    assert "Traceback line from the child" in message


def test_exit_zero_without_done_is_a_failure():
    # The bug this guards against: "Train finished" printed after a crash that exited 0.
    with pytest.raises(TrainingFailed, match="exited without finishing"):
        run_command(script("print('Train finished')"))


def _sleeping_family() -> list[str]:
    """A child that starts a grandchild (like accelerate launch starting the trainer), then waits."""
    return script(
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
        "print('grandchild', grandchild.pid, flush=True)",
        event("start", total_steps=9, start_step=0, num_examples=1, output="o"),
        "time.sleep(60)",
    )


def test_cancel_kills_the_whole_process_group_within_5_s():
    started = {}
    calls = []

    def check_cancel() -> bool:
        calls.append(time.monotonic())
        return any(line.startswith("{") for line in started["child"].tail)

    t0 = time.monotonic()
    with pytest.raises(TrainingCancelled):
        run_command(_sleeping_family(), check_cancel=check_cancel, on_start=lambda c: started.setdefault("child", c))
    child = started["child"]
    grandchild = int(next(line.split()[1] for line in child.tail if line.startswith("grandchild")))
    assert time.monotonic() - calls[-1] < launcher.CANCEL_TIMEOUT_S
    assert alive_members(child.pgid) == []
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() - t0 < 30


def test_cancel_kills_workers_started_in_a_session_of_their_own():
    # As torchrun starts each worker (several processes, or GPUs): start_new_session=True puts the
    # grandchild outside the child's process group, so a group kill alone would orphan it.
    family = script(
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)",
        "print('grandchild', grandchild.pid, flush=True)",
        event("start", total_steps=9, start_step=0, num_examples=1, output="o"),
        "time.sleep(60)",
    )
    started, seen = {}, {}

    def check_cancel() -> bool:
        tail = list(started["child"].tail)
        if not any(line.startswith("{") for line in tail):
            return False
        seen["grandchild"] = int(next(line.split()[1] for line in tail if line.startswith("grandchild")))
        seen["session"] = os.getsid(seen["grandchild"])
        return True

    try:
        with pytest.raises(TrainingCancelled):
            run_command(family, check_cancel=check_cancel, on_start=lambda c: started.setdefault("child", c))
        cancelled_at = time.monotonic()
        assert seen["session"] == seen["grandchild"] != started["child"].pgid  # really outside the group
        survivors = [pid for pid in (started["child"].process.pid, seen["grandchild"]) if _alive(pid)]
        while survivors and time.monotonic() - cancelled_at < launcher.CANCEL_TIMEOUT_S:
            time.sleep(0.05)
            survivors = [pid for pid in survivors if _alive(pid)]
        assert survivors == []
    finally:
        if "grandchild" in seen and _alive(seen["grandchild"]):  # a failed kill: leave no orphan behind
            psutil.Process(seen["grandchild"]).kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_exception_in_a_callback_kills_the_child_too():
    started = {}

    class Interrupted(Exception):  # stands in for ComfyUI's InterruptProcessingException
        pass

    def on_event(event):
        raise Interrupted()

    with pytest.raises(Interrupted):
        run_command(_sleeping_family(), on_event=on_event, on_start=lambda c: started.setdefault("child", c))
    assert alive_members(started["child"].pgid) == []


def test_a_child_ignoring_sigterm_is_killed(monkeypatch):
    monkeypatch.setattr(launcher, "TERM_GRACE_S", 0.5)
    started = {}
    stubborn = script(
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        event("start", total_steps=9, start_step=0, num_examples=1, output="o"),
        "time.sleep(60)",
    )
    t0 = time.monotonic()
    with pytest.raises(TrainingCancelled):
        run_command(stubborn, check_cancel=lambda: bool(started["child"].tail),
                    on_start=lambda c: started.setdefault("child", c))
    assert alive_members(started["child"].pgid) == []
    assert time.monotonic() - t0 < 15


def test_entry_script_imports_the_pack_next_to_it_not_an_installed_one(tmp_path):
    # A copy of the pack that is not installed anywhere, with a probe program in it.
    pack = tmp_path / "ComfyUI-VersaT2I"
    (pack / "trainer").mkdir(parents=True)
    root = ENTRY_SCRIPT.parents[1]
    shutil.copy(root / "__init__.py", pack / "__init__.py")
    shutil.copy(ENTRY_SCRIPT, pack / "trainer" / "launch_entry.py")
    (pack / "trainer" / "__init__.py").write_text("")
    (pack / "trainer" / "config.py").write_text("raise RuntimeError('trainer/ must not be on sys.path')\n")
    (pack / "trainer" / "probe.py").write_text(textwrap.dedent("""
        import sys, versat2i
        def parse_args(argv):
            return argv
        def main(args):
            import importlib.util
            print("pack", versat2i.__file__)
            print("args", args)
            print("shadow", importlib.util.find_spec("config") is not None)
    """))
    out = subprocess.run([sys.executable, str(pack / "trainer" / "launch_entry.py"), "trainer.probe", "--x", "1"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"pack {pack / '__init__.py'}" in out.stdout
    assert "args ['--x', '1']" in out.stdout
    assert "shadow False" in out.stdout


def test_entry_script_refuses_a_malformed_program_name():
    out = subprocess.run([sys.executable, str(ENTRY_SCRIPT), "../../etc"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "usage" in out.stderr


def test_a_training_whose_launcher_died_stops_by_itself(tmp_path):
    """ComfyUI or `versat2i loop` killed -9 cancels nothing, and the training processes run in
    sessions of their own, so no signal reaches them: launch_entry watches the launching process
    (named in the environment by child_environment) and stops when it is gone."""
    pack = tmp_path / "ComfyUI-VersaT2I"
    (pack / "trainer").mkdir(parents=True)
    shutil.copy(ENTRY_SCRIPT.parents[1] / "__init__.py", pack / "__init__.py")
    shutil.copy(ENTRY_SCRIPT, pack / "trainer" / "launch_entry.py")
    (pack / "trainer" / "__init__.py").write_text("")
    (pack / "trainer" / "wait.py").write_text(textwrap.dedent("""
        import time
        def parse_args(argv):
            return argv
        def main(args):
            print("training", flush=True)
            time.sleep(60)
    """))
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        env = {**os.environ, launcher.PARENT_ENV: launcher.parent_token(parent.pid)}
        child = subprocess.Popen([sys.executable, str(pack / "trainer" / "launch_entry.py"), "trainer.wait"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 start_new_session=True)
        assert child.stdout.readline().strip() == "training"
        time.sleep(1.5)
        assert child.poll() is None  # the launcher lives: the training goes on
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        # it looks every second; generous limits, for a busy 2-core machine
        assert child.wait(timeout=60) == 3
        assert time.monotonic() - t0 < 30
        assert "the process that launched this training" in child.stderr.read()
    finally:
        for process in (parent, locals().get("child")):
            if process is not None and process.poll() is None:
                process.kill()


def test_the_child_environment_names_this_process_as_the_parent():
    token = launcher.child_environment({})[launcher.PARENT_ENV]
    assert token == launcher.parent_token() and token.startswith(f"{os.getpid()}:")
