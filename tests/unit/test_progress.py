"""``progress.Progress``: a tqdm bar on a terminal; plain log lines, at most one per interval and a
final one, when the output is a file or a pipe (where tqdm turns itself off)."""

from __future__ import annotations

import io
import logging

import pytest

from versat2i.progress import SECONDS_VARIABLE, Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "versat2i.progress"]


def test_without_a_terminal_a_line_at_most_every_interval_and_a_final_one(caplog, monkeypatch):
    monkeypatch.delenv(SECONDS_VARIABLE, raising=False)
    caplog.set_level(logging.INFO, logger="versat2i.progress")
    clock = FakeClock()
    with Progress(100, "generate", unit="img", stream=io.StringIO(), clock=clock) as bar:
        for _ in range(35):  # one image per second
            clock.now += 1.0
            bar.update(1)
        assert bar.plain
    lines = progress_lines(caplog)
    assert lines == [
        "generate: 10/100 img (10%), 10 s, about 1 min 30 s left",
        "generate: 20/100 img (20%), 20 s, about 1 min 20 s left",
        "generate: 30/100 img (30%), 30 s, about 1 min 10 s left",
        "generate: 35/100 img (35%), 35 s in all",
    ]


def test_interval_from_the_environment_and_postfix(caplog, monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    caplog.set_level(logging.INFO, logger="versat2i.progress")
    clock = FakeClock()
    bar = Progress(4, "train LoRA aesthetics", unit="step", initial=1, stream=io.StringIO(), clock=clock)
    for step in (2, 3, 4):
        clock.now += 2.0
        bar.set_postfix(loss=f"{0.1 * step:.4f}")
        bar.set(step)
    bar.close()
    bar.close()  # a second close logs nothing
    lines = progress_lines(caplog)
    assert lines[0] == "train LoRA aesthetics: 2/4 step (50%), 2 s, about 4 s left, loss 0.2000"
    assert lines[1:] == ["train LoRA aesthetics: 3/4 step (75%), 4 s, about 2 s left, loss 0.3000",
                         "train LoRA aesthetics: 4/4 step (100%), 6 s in all, loss 0.4000"]


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="versat2i.progress")
    terminal = Terminal()
    with Progress(3, "score", unit="img", stream=terminal) as bar:
        bar.update(3)
        assert not bar.plain
    assert "score" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert progress_lines(caplog) == []


def test_disabled_shows_nothing(caplog):
    caplog.set_level(logging.INFO, logger="versat2i.progress")
    for stream in (io.StringIO(), Terminal()):
        with Progress(3, "score", enabled=False, stream=stream) as bar:
            bar.update(3)
        assert stream.getvalue() == ""
    assert progress_lines(caplog) == []


def test_a_bad_interval_is_one_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "soon")
    with pytest.raises(ValueError, match=f"{SECONDS_VARIABLE}='soon'"):
        Progress(3, "score", stream=io.StringIO())


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (59, "59 s"), (92, "1 min 32 s"), (7500, "2 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_work_that_completes_logs_its_final_line_once(caplog, monkeypatch):
    monkeypatch.setenv(SECONDS_VARIABLE, "0")
    caplog.set_level(logging.INFO, logger="versat2i.progress")
    clock = FakeClock()
    with Progress(2, "score", unit="img", stream=io.StringIO(), clock=clock) as bar:
        clock.now += 3.0
        bar.update(2)
    assert progress_lines(caplog) == ["score: 2/2 img (100%), 3 s in all"]
