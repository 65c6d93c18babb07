"""Progress for long work: done/total, rate and ETA.

On a terminal the line redraws in place; elsewhere (Ray job logs, CI) it prints a line at
most every ``interval`` seconds so logs stay short.
"""

from __future__ import annotations

import os
import re
import sys
import time

# Set by a launcher that forwards its ranks' output to a terminal and redraws their progress
# lines in place (cluster.launch.run_ranks): the ranks may then print them often.
LIVE_ENV = "POSDISTILL_LIVE_PROGRESS"
_LINE = re.compile(r"^[^:|\n]+: \d+(?:/\d+)? \w+(?: \| .*)?$")


def progress_interval(interval: float) -> float:
    """Seconds between progress lines of a process whose output is piped to its launcher."""
    return min(interval, 1.0) if os.environ.get(LIVE_ENV) else interval


def is_progress_line(line: str) -> bool:
    """Whether ``line`` is one of :meth:`Progress.line` (``label: 3/10 steps | ...``)."""
    return bool(_LINE.match(line.rstrip("\n")))


def _fmt_secs(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


class Progress:
    def __init__(self, label: str, total: int | None, unit: str = "items",
                 rate_unit: str = "tokens", interval: float = 10.0, enabled: bool = True, done: int = 0):
        self.label, self.total, self.unit, self.rate_unit = label, total, unit, rate_unit
        self.done = self._first = done  # done before this process started (a resumed run)
        self.amount = 0  # what the rate is measured in (tokens by default)
        self.note = ""  # shown after the count (training: phase and loss)
        self.start = time.monotonic()
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.2 if self.tty else interval
        self._last = self.start

    def update(self, n: int = 1, amount: int = 0) -> None:
        self.done += n
        self.amount += amount
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.done == self.total):
            self._last = now
            self._emit(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.amount / elapsed
        parts = [f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.note:
            parts.append(self.note)
        if self.amount:
            parts.append(f"{human(rate)} {self.rate_unit}/s")
        if self.total and self.done > self._first:
            eta = elapsed / (self.done - self._first) * (self.total - self.done)
            parts.append(f"ETA {_fmt_secs(eta)}")
        parts.append(f"elapsed {_fmt_secs(elapsed)}")
        return " | ".join(parts)

    def _emit(self, final: bool) -> None:
        end = "\n" if (final or not self.tty) else ""
        print(("\r" if self.tty else "") + self.line(), end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self._emit(final=True)
