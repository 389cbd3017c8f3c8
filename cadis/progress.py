"""Progress of long loops that reads well on a terminal and in a log.

Every loop that shows progress (pretraining, fine-tuning epochs, denoising stored draws,
certification) makes it with :func:`progress_bar`. On a terminal it is tqdm's live bar. When
the stream is not a terminal (a Ray job's log, a file, a pipe) carriage-return redraws would
leave one unreadable line, so it writes whole lines instead: one every
:data:`DEFAULT_LOG_INTERVAL_S` seconds (``$CADIS_PROGRESS_INTERVAL`` changes it) and a final
one when the loop ends, each with the same facts as the bar: the counts, the rate, the time
spent and left, and the values the loop last set (the loss of a training step, say).
Imports no torch, Ray or MLflow: any layer may use it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Protocol, TextIO

from tqdm import tqdm

from cadis.errors import CadisError

#: Seconds between two log lines, and the variable that overrides it.
DEFAULT_LOG_INTERVAL_S = 30.0
LOG_INTERVAL_ENV = "CADIS_PROGRESS_INTERVAL"


class Progress(Protocol):
    """What the loops call on a bar: tqdm's own names, so a tqdm bar is one."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc_info: object) -> Any: ...


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0,
                 stream: TextIO | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Progress:
    """The progress of a loop of ``total`` ``unit`` (``initial`` of them done before it
    starts, as when a run resumes), on ``stream`` (default: standard error).

    Disabled, nothing is written. On a terminal, tqdm's live bar. Otherwise a
    :class:`LogProgress` writing a line at most every ``interval_s`` seconds (default:
    ``$CADIS_PROGRESS_INTERVAL``, else :data:`DEFAULT_LOG_INTERVAL_S`) and a final line on
    close. Set the values to show (``set_postfix``) before the ``update`` they belong to.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled or _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream,
                    disable=not enabled)
    return LogProgress(total, desc, unit, stream=stream, initial=initial,
                       interval_s=log_interval_s() if interval_s is None else interval_s,
                       clock=clock)


def log_interval_s() -> float:
    """Seconds between log lines: ``$CADIS_PROGRESS_INTERVAL`` when set (a number >= 0; 0
    writes a line at every update), else :data:`DEFAULT_LOG_INTERVAL_S`."""
    text = os.environ.get(LOG_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_LOG_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise CadisError(f"{LOG_INTERVAL_ENV} must be a number of seconds >= 0, got {text!r}")
    return seconds


class LogProgress:
    """Progress as whole lines, for a stream that is not a terminal: at the first update
    ``interval_s`` or more after the previous line (or the start), and once on close.

    A line reads ``desc: 120/450 step (27%), 2.31 step/s, 00:52 spent, 02:23 left,
    loss=0.412``; the final one ``desc: done, 450/450 step in 03:15, 2.31 step/s, ...``, or
    ``stopped at`` when the loop ended early. The rate counts only the units done since the
    start (not ``initial``).
    """

    def __init__(self, total: int, desc: str, unit: str, *, stream: TextIO, initial: int = 0,
                 interval_s: float = DEFAULT_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream, self.interval_s, self.clock = stream, interval_s, clock
        self.initial = self.n = initial
        self.postfix: dict[str, Any] = {}
        self.started = self.last_line = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_line >= self.interval_s:
            self._write(self._line())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        """Write the final line (once, however often it is called)."""
        if self.closed:
            return
        self.closed = True
        state = "done," if self.n >= self.total else "stopped at"
        counts = f"{self.n}/{self.total} {self.unit}"
        self._write(f"{self.desc}: {state} {counts} in {tqdm.format_interval(self._spent())}, "
                    + ", ".join([self._rate(), *self._values()]))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _line(self) -> str:
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        parts = [f"{self.n}/{self.total} {self.unit}{share}", self._rate(),
                 f"{tqdm.format_interval(self._spent())} spent"]
        rate = self._per_second()
        if rate > 0 and self.n < self.total:
            parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        return f"{self.desc}: " + ", ".join(parts + self._values())

    def _spent(self) -> float:
        return self.clock() - self.started

    def _per_second(self) -> float:
        spent = self._spent()
        return (self.n - self.initial) / spent if spent > 0 else 0.0

    def _rate(self) -> str:
        rate = self._per_second()
        # Three significant digits, but whole numbers from 100 on (no 1.01e+03).
        return f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s"

    def _values(self) -> list[str]:
        return [f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                for key, value in self.postfix.items()]

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self.last_line = self.clock()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
