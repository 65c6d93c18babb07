"""`posdistill run` (and every stage command): the graph up to a stage, then, for `run`, the report.

The graph (``pipeline.graph``) decides what is done and says so; this module keeps the
budget of each invocation (``runs.jsonl``) and writes the report after a whole run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.atomic import atomic_write_json
from pipeline.config import Config
from pipeline.graph import Graph, RunLog, build_graph, models_of
from pipeline.resources import PeakMemory
from pipeline.storage import remote_for


def run_stage(cfg: Config, stage: str, address: str | None = None, student: str | None = None,
              phase: int | None = None, workers: int | None = None, force_cache: bool = False) -> Graph:
    """Run every node of ``stage`` (filtered by ``student`` / ``phase``) and what it needs."""
    graph = build_graph(cfg, address=address, workers=workers, force_cache=force_cache)
    graph.run(graph.select(stage, student=student, phase=phase))
    return graph


def run_pipeline(cfg: Config, address: str | None = None) -> Path:
    """The whole graph, then the report (its budget includes every earlier invocation)."""
    from pipeline.report import write_report

    t0 = time.monotonic()
    log = RunLog()
    with PeakMemory() as mem:
        graph = build_graph(cfg, address=address)
        graph.run(graph.nodes, log)
    wall = time.monotonic() - t0
    out = graph.cfg.out_dir
    summary = {"wall_s": round(wall, 1), "peak_memory_gib": round(mem.peak_gib, 2), "timings": log.timings,
               "reused": log.reused, "computed": log.computed, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    root = remote_for(out)  # run.out_dir on a bucket: the history is read from there, the report goes there
    if root is not None and "runs.jsonl" in root.listing():
        root.fetch("runs.jsonl")
    with open(out / "runs.jsonl", "a") as f:  # every invocation, so a re-run keeps the cold run's budget
        f.write(json.dumps(summary) + "\n")
    atomic_write_json(out / "run.json", summary)
    eval_dir = next(n.out for n in graph.nodes if n.stage == "eval")
    kinds = {"perturb ": "perturb", "query spans ": "query_spans", "query states ": "query_states"}
    analyses: dict[str, dict[str, Path]] = {k: {} for k in kinds.values()}
    for n in graph.nodes:
        if n.stage == "analyze":
            prefix = next(p for p in kinds if n.name.startswith(p))
            analyses[kinds[prefix]][n.name[len(prefix):]] = n.out
    report = write_report(graph, models_of(graph), eval_dir, analyses, summary)
    if root is not None:
        for path in [out / "runs.jsonl", out / "run.json", report, *sorted((out / "report_figures").glob("*"))]:
            if path.is_file():
                root.upload_file(path, path.relative_to(out).as_posix())
    print(f"run: wall {wall:.0f} s, peak memory {mem.peak_gib:.2f} GiB (driver + Ray workers + ranks)")
    print(f"run: reused {sum(len(v) for v in log.reused.values())} outputs, "
          f"computed {sum(len(v) for v in log.computed.values())}; report {report}")
    return report
