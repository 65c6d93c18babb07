"""What checking page CRCs costs the training reader: CPU seconds per epoch with and without.

Caches: a random demo-size teacher over ``--windows`` (default 1024) windows of 1024 tokens,
top-32, once per codec, so one epoch is long enough (seconds, not the ~40 ms of 64 windows)
for a cost of a few percent to stand above the timer's and the machine's noise. The reader
(``ShardReader``, in process) reads whole epochs with page-checksum verification on and off,
``--repeats`` pairs in alternated order (on off, off on, ...: neither is always first), after
one untimed epoch of each that warms the page cache. Time is the process's CPU time
(``time.process_time``: Parquet's decoding threads included; other processes on a shared
machine do not enter it), wall time kept beside it. ``value`` is, for the worse codec, the
median over pairs of (CPU s checked) / (CPU s unchecked), with the range; goal <= 1.05.

Run: python bench/checksum_cost.py [--windows 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import alternate, paired_ratios, spread, write_result

L, K = 1024, 32
GOAL = 1.05  # checking every page's CRC may cost the reader at most 5 % more CPU


def epoch(cache: Path, checksums: bool, windows: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one whole epoch; asserts every window was read."""
    import stages.cache.reader as reader_mod

    reader_mod.PAGE_CHECKSUMS = checksums
    reader = reader_mod.ShardReader(cache, dp_rank=0, dp_size=1, seed=0)
    n, c0, t0 = 0, time.process_time(), time.perf_counter()
    for item in reader:
        n += item["ids"].shape[0] > 0
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    assert n == windows, f"read {n} of {windows} windows"
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=1024, help="windows per epoch (>= 1000 for the headline)")
    ap.add_argument("--repeats", type=int, default=7, help="alternated pairs per codec")
    args = ap.parse_args()
    from helpers import build_cache, make_tiny_llama

    from cluster.executor import LocalExecutor
    from pipeline.config import parse_config
    from stages.cache.manifest import read_manifest

    torch.set_num_threads(os.cpu_count() or 1)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = str(make_tiny_llama(tmp / "teacher", initializer_range=0.2))
        for codec in ("plain", "compact"):
            cfg = parse_config({"run": {"out_dir": str(tmp / "run")},
                                "data": {"synthetic": {"num_docs": int(args.windows * L / 80 * 1.05) + 50}},
                                "pack": {"window_len": L, "mode": "cross_doc", "doc_len": [32, 128]},
                                "teacher": {"model": teacher, "batch_size": 8},
                                "cache": {"k": K, "windows_per_shard": 128, "codec": codec}})
            cache = build_cache(cfg, executor=LocalExecutor())
            windows = read_manifest(cache)["windows"]
            if windows < args.windows:
                raise SystemExit(f"the cache holds {windows} windows, fewer than --windows {args.windows}")
            measured: dict[str, list[tuple[float, float]]] = {"checked": [], "unchecked": []}

            def timed(name: str, on: bool) -> float:
                measured[name].append(epoch(cache, on, windows))
                return measured[name][-1][0]

            cpu = alternate({"checked": lambda: timed("checked", True), "unchecked": lambda: timed("unchecked", False)},
                            repeats=args.repeats, warmup=1)
            wall = {k: [w for _, w in v[1:]] for k, v in measured.items()}  # [0] is the warm-up epoch
            ratio = paired_ratios(cpu["checked"], cpu["unchecked"], 3)
            out[codec] = {"windows_per_epoch": windows, "cpu_ratio": ratio,
                          "wall_ratio": paired_ratios(wall["checked"], wall["unchecked"], 3),
                          "cpu_s_per_epoch": {k: spread(v) for k, v in cpu.items()},
                          "windows_per_cpu_s": {k: round(windows / statistics.median(v), 1) for k, v in cpu.items()},
                          "cache_bytes": sum(f.stat().st_size for f in cache.glob("*.parquet"))}
            print(f"{codec:8s} checked/unchecked CPU s per epoch of {windows} windows: median {ratio['median']} "
                  f"({ratio['min']}-{ratio['max']} over {args.repeats} pairs)", flush=True)
    worst = max(out, key=lambda c: out[c]["cpu_ratio"]["median"])
    write_result(
        "checksum_cost", metric="reader_cpu_s_with_page_checksums_over_without", unit="ratio",
        value=out[worst]["cpu_ratio"]["median"], goal=GOAL, direction="<=", details={
            "definition": "median over alternated pairs of (CPU s of an epoch with page CRC checks) / (without); "
                          "value is the worse codec", "worst_codec": worst,
            "codecs": out, "repeats": args.repeats, "window_len": L, "k": K})


if __name__ == "__main__":
    main()
