"""What every benchmark shares: side-by-side repeats in alternated order, their median and
range, the machine they ran on, and the result JSON with ``value``, ``goal`` and ``met``.

One place for these so that every ``bench/results/<name>.json`` reads the same way: ``met`` is
computed here from ``value``, ``goal`` and an explicit ``direction`` (``value <= goal`` or
``value >= goal``), never written by hand, so a figure that misses its goal says so.
"""

from __future__ import annotations

import json
import operator
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
for _p in (str(ROOT / "tests"), str(ROOT)):  # the repository's packages and its test helpers
    if _p not in sys.path:
        sys.path.insert(0, _p)

_COMPARE: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


def alternate(fns: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run the variants side by side, ``repeats`` rounds, the order reversed every other round
    (a b, b a, a b, ...): load from other processes on a shared machine, and whatever the first
    of a pair pays (a cold page cache, a warming allocator), hit every variant alike. Each
    function returns its own measurement; all are kept, in round order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(fns[name]())
    return out


def spread(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Median and range of repeated measurements, every one kept."""
    if not values:
        raise ValueError("spread of no measurements")
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values), "all": [round(v, digits) for v in values]}


def paired_ratios(a: Sequence[float], b: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Spread of a[i] / b[i] over the rounds of :func:`alternate`: each ratio compares two
    measurements taken next to each other, so slow drifts of the machine cancel."""
    if len(a) != len(b):
        raise ValueError(f"paired ratios of {len(a)} and {len(b)} measurements")
    return spread([x / y for x, y in zip(a, b)], digits)


def child_json(argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (peak memory is per process; a job's
    actor is a fresh process too) and return the JSON object it prints last."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if out.returncode:
        raise SystemExit(f"benchmark child {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_kib() -> int:
    """This process's resident set size now (KiB), the baseline a child's peak is taken over."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(**extra: Any) -> dict[str, Any]:
    """Where a figure was measured: CPU model and count, the cores this process may use, library
    versions and the load average (other work on a shared machine moves every timing)."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(),
                            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                            "python": platform.python_version(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    for module in ("numpy", "torch"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if info["torch"]:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()  # this process's; children set their own
    return {**info, **extra}


def is_met(value: float | Mapping[str, float], goal: float | Mapping[str, float], direction: str) -> bool:
    """Whether ``value direction goal`` holds; for per-case dicts (same keys), whether it holds in every case."""
    if direction not in _COMPARE:
        raise ValueError(f"direction must be one of {sorted(_COMPARE)}, not {direction!r}")
    cmp = _COMPARE[direction]
    if isinstance(value, Mapping) or isinstance(goal, Mapping):
        if not (isinstance(value, Mapping) and isinstance(goal, Mapping)) or set(value) != set(goal):
            raise ValueError("value and goal must both be dicts with the same keys")
        return all(cmp(value[k], goal[k]) for k in value)
    return bool(cmp(value, goal))


def write_result(name: str, *, value: float | Mapping[str, float], goal: float | Mapping[str, float],
                 direction: str, unit: str, metric: str, details: Mapping[str, Any] | None = None,
                 machine_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``bench/results/<name>.json``: metric, value, goal, direction, met (computed here),
    unit, then the details and the machine. Returns what was written."""
    result = {"metric": metric, "value": value, "goal": goal, "direction": direction,
              "met": is_met(value, goal, direction), "unit": unit, **(details or {}),
              "machine": dict(machine_info) if machine_info is not None else machine()}
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps({k: result[k] for k in ("metric", "value", "goal", "direction", "met", "unit")}), flush=True)
    return result
