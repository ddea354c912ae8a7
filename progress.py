"""Progress of long work: a tqdm bar on a terminal, a plain log line every few seconds elsewhere.

tqdm switches itself off when the stream it draws on (stderr) is not a terminal, which is right
for a log file or CI (a bar redrawn with carriage returns is unreadable there) but leaves them
silent for minutes. ``Progress`` keeps tqdm for terminals and otherwise logs a line such as::

    INFO versat2i.progress: generate: 192/624 img (31%), 41 s, about 1 min 32 s left

at most every ``VERSAT2I_PROGRESS_SECONDS`` seconds (default 10; 0 logs every update), and one
final line when the work ends. The lines go through ``logging`` (logger ``versat2i.progress``),
so they land wherever the command's log goes.

    with Progress(len(images), "score", unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

logger = logging.getLogger("versat2i.progress")

DEFAULT_SECONDS = 10.0
SECONDS_VARIABLE = "VERSAT2I_PROGRESS_SECONDS"


def log_interval() -> float:
    """Seconds between two plain progress lines: ``VERSAT2I_PROGRESS_SECONDS`` or 10."""
    raw = os.environ.get(SECONDS_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SECONDS_VARIABLE}={raw!r}: give a number of seconds (e.g. 10; 0 = every update)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{SECONDS_VARIABLE}={raw!r}: must be a number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """``41 s``, ``1 min 32 s``, ``2 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts ``done`` of ``total`` units; shows a tqdm bar when ``stream`` (default stderr, where
    tqdm draws) is a terminal, else logs plain lines (module docstring). ``enabled=False`` shows
    nothing. ``position`` / ``leave`` go to tqdm (several bars at once)."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, position: int | None = None, leave: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self._clock = clock
        self._started = clock()
        self._last_line = self._started
        self._closed = False
        self._final_logged = False
        self._bar = None
        stream = stream if stream is not None else sys.stderr
        self.plain = enabled and not _is_terminal(stream)
        self._interval = log_interval() if self.plain else 0.0
        if enabled and not self.plain:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, position=position,
                             leave=leave)

    # -- counting ------------------------------------------------------------------------------------
    def update(self, count: int = 1) -> None:
        """``count`` more units done."""
        self.set(self.done + count)

    def set(self, done: int) -> None:
        """``done`` units done in all (the trainers report their step number)."""
        step = done - self.done
        self.done = done
        if self._bar is not None:
            self._bar.update(step)
        elif self.plain and self.total and done >= self.total and not self._final_logged:
            self._log(final=True)  # complete: the final line now (close() then adds none)
        elif self.plain and self._clock() - self._last_line >= self._interval and not self._final_logged:
            self._log()

    def set_postfix(self, **values: Any) -> None:
        """Extra figures shown after the count (``loss=0.0123``)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, text: str) -> None:
        """A message that does not break the bar (logged as is without one)."""
        if self._bar is not None:
            self._bar.write(text)
        elif self.plain:
            logger.info("%s: %s", self.desc, text)

    def close(self) -> None:
        """End the bar, or log the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.plain and not self._final_logged and (self.done != self.initial or self.total == 0):
            self._log(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the plain line ---------------------------------------------------------------------------------
    def line(self, *, final: bool = False) -> str:
        """The plain progress line (without the logger's prefix)."""
        elapsed = self._clock() - self._started
        if self.total:
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text = f"{self.desc}: {self.done} {self.unit}"
        text += f", {format_duration(elapsed)}"
        new = self.done - self.initial
        if final:
            text += " in all"
        elif self.total and new > 0 and self.done < self.total:
            text += f", about {format_duration(elapsed / new * (self.total - self.done))} left"
        if self.postfix:
            text += ", " + ", ".join(f"{key} {value}" for key, value in self.postfix.items())
        return text

    def _log(self, *, final: bool = False) -> None:
        self._last_line = self._clock()
        self._final_logged = final
        logger.info("%s", self.line(final=final))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
