"""Share of training step time spent waiting for data (issue: <= 2%).

A real `posdistill train` run (2 DeepSpeed ranks, CPU, ZeRO-2) of a Llama student (hidden
256, 4 layers) for 12 steps on a teacher cache of 1024-token windows with top-32 targets.
Each rank's loader reads Parquet row groups and collates in a background thread; the
training loop records how long it blocked in ``next(loader)`` per step (``wait_s`` in
metrics.jsonl, averaged over ranks) next to the step time (``step_s``).

``value`` counts every step, the first included: its wait is the loader's start (the
prefetch thread opens the shard, reads its first row group and collates while the loop
already waits). That cause is measured apart: the same reader's time to its first
micro-batch in this process, opened alone; the steady share (steps after the first) is kept
beside it. Goal: <= 2 % of the run's step time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, write_result

STEPS = 12


def first_batch_s(cache: Path, window: int) -> float:
    """Seconds from opening the cache to the first collated micro-batch, as the loader's
    prefetch thread does at the start of a phase (no step runs alongside here)."""
    from stages.train.data import batches, open_stream

    t0 = time.perf_counter()
    stream = open_stream("cache", cache, dp_rank=0, dp_size=2, seed=0)
    next(batches(stream, 1, mode="cross_doc", window_len=window, sp=1, sp_rank=0, with_targets=True))
    return time.perf_counter() - t0


def main() -> None:
    from helpers import make_tiny_llama

    from pipeline.config import parse_config
    from cluster.executor import LocalExecutor
    from helpers import build_cache

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        teacher = make_tiny_llama(d / "teacher", seed=1, initializer_range=0.2)
        cfg = {
            "run": {"name": "bench", "out_dir": str(d / "run"), "seed": 0},
            "data": {"source": "synthetic", "synthetic": {"num_docs": 1200}},
            "pack": {"window_len": 1024, "doc_len": [16, 64]},
            "teacher": {"model": str(teacher)},
            "cache": {"k": 32, "windows_per_shard": 8, "windows_per_row_group": 1},
            "student": {"config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}},
            "train": {"batch_size": 2, "workers": 2, "save_every": 1000, "warmup_steps": 2, "lr": 1e-3,
                      "phases": [{"window_len": 1024, "steps": STEPS}]},
        }
        codec = parse_config(cfg).cache.codec  # the default codec, as users get it
        cache = build_cache(parse_config(cfg), 0, executor=LocalExecutor())
        (d / "c.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(d / "c.yaml")], cwd=ROOT, check=True,
                       capture_output=True, text=True)
        rows = [json.loads(x) for x in (d / "run" / "train" / "student" / "metrics.jsonl").read_text().splitlines()]
        first_alone = [first_batch_s(cache, 1024) for _ in range(3)]
    wait, total = sum(r["wait_s"] for r in rows), sum(r["step_s"] for r in rows)
    steady_wait, steady_total = wait - rows[0]["wait_s"], total - rows[0]["step_s"]
    write_result(
        "loader_wait", metric="loader_wait_share", value=round(wait / total, 5), goal=0.02, direction="<=",
        unit="fraction of step time", details={
            "definition": "sum over every step, the first included, of the time blocked in next(loader) over the "
                          "sum of step times (rank mean)",
            "steps": len(rows), "wait_s": round(wait, 4), "step_s": round(total, 3),
            "steady": {"steps": len(rows) - 1, "share": round(steady_wait / steady_total, 5),
                       "wait_s": round(steady_wait, 4)},
            "first_step": {"wait_s": round(rows[0]["wait_s"], 4), "step_s": round(rows[0]["step_s"], 3),
                           "cause": "the loader's start: opening the shard, reading its first row group and "
                                    "collating, while the loop waits (measured alone below)",
                           "first_batch_alone_s": [round(x, 4) for x in first_alone]},
            "tokens_per_s_median": round(sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2], 1),
            "setup": {"ranks": 2, "zero_stage": 2, "window": 1024, "k": 32, "student": "llama hidden 256 x 4 layers",
                      "prefetch": 4, "source": f"teacher cache (Parquet, {codec} codec)"}})


if __name__ == "__main__":
    main()
