"""What checking page CRCs costs the training reader: windows/s with and without.

Caches: a random demo-size teacher over 64 windows of 1024 tokens, top-32, once per codec.
The reader (``ShardReader``, in process) reads a whole epoch with page-checksum verification
on and off, alternating, ``--repeats`` times each; the result is the median of the per-pair
ratios (on / off) with their range, so machine noise hits both sides of each pair alike.

Run: python bench/checksum_cost.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).parent / "results"
L = 1024


def epoch_rate(cache: Path, checksums: bool) -> float:
    import stages.cache.reader as reader_mod

    reader_mod.PAGE_CHECKSUMS = checksums
    reader = reader_mod.ShardReader(cache, dp_rank=0, dp_size=1, seed=0)
    n, t0 = 0, time.perf_counter()
    for item in reader:
        n += item["ids"].shape[0] > 0
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from helpers import build_cache, make_tiny_llama

    from cluster.executor import LocalExecutor
    from pipeline.config import parse_config

    torch.set_num_threads(os.cpu_count() or 1)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = str(make_tiny_llama(tmp / "teacher", initializer_range=0.2))
        for codec in ("plain", "compact"):
            cfg = parse_config({"run": {"out_dir": str(tmp / "run")}, "data": {"synthetic": {"num_docs": 900}},
                                "pack": {"window_len": L, "mode": "cross_doc", "doc_len": [32, 128]},
                                "teacher": {"model": teacher, "batch_size": 4},
                                "cache": {"k": 32, "windows_per_shard": 16, "codec": codec}})
            cache = build_cache(cfg, executor=LocalExecutor())
            epoch_rate(cache, True)  # warm the page cache
            ratios, on, off = [], [], []
            for _ in range(args.repeats):
                a, b = epoch_rate(cache, True), epoch_rate(cache, False)
                on.append(a)
                off.append(b)
                ratios.append(a / b)
            out[codec] = {"ratio_median": round(statistics.median(ratios), 3),
                          "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                          "windows_per_s_checked_median": round(statistics.median(on), 1),
                          "windows_per_s_unchecked_median": round(statistics.median(off), 1)}
            print(f"{codec:8s} checked/unchecked windows/s: median {out[codec]['ratio_median']} "
                  f"({out[codec]['ratio_min']}-{out[codec]['ratio_max']} over {args.repeats} pairs)", flush=True)
    result = {
        "metric": "reader_windows_per_s_with_page_checksums_over_without", "unit": "ratio",
        "value": min(v["ratio_median"] for v in out.values()),
        "definition": "median over alternating pairs of (epoch windows/s with CRC check) / (without); "
                      "value is the worse codec",
        "codecs": out, "repeats": args.repeats, "window_len": L, "k": 32,
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checksum_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
