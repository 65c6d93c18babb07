"""Peak memory of a whole process tree (driver, Ray workers, DeepSpeed ranks).

``ru_maxrss`` only covers the process itself and children it has waited for; Ray's workers
are grandchildren that outlive nothing we wait on. So a thread samples the summed RSS of the
tree every ``interval`` seconds and keeps the maximum.
"""

from __future__ import annotations

import os
import threading

import psutil

from pipeline.errors import UserError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def require_memory(field: str, nbytes: int, what: str) -> None:
    """Fail before allocating what cannot fit: numpy's MemoryError, minutes in, names no key."""
    available = psutil.virtual_memory().available
    if nbytes > available:
        raise UserError(f"{field}: {what} needs {_human(nbytes)} of memory; "
                        f"{_human(available)} is available")


class PeakMemory:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def _sample(self) -> int:
        root = psutil.Process(os.getpid())
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._sample())

    def __enter__(self) -> "PeakMemory":
        self.peak_bytes = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._sample())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30
