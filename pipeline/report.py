"""`runs/<name>/report.md`: what the run measured, and which of the paper's findings held.

Every number here is read from the stage outputs (eval.json, the cache manifest, metrics,
analysis JSON, run timings); nothing is typed in. The comparisons are scored by needle
distance with bootstrap intervals and Holm's correction (``pipeline.findings``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from stages.specs import TrainSpec


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _alpha(s: TrainSpec) -> float:
    return s.phases[-1].kd.alpha


def _theta(s: TrainSpec) -> Any:
    return s.phases[-1].rope.theta


def _fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _findings(cfg: Config, students: list[TrainSpec], results: dict[str, dict]) -> list[str]:
    from pipeline.findings import BOOTSTRAP, by_distance, compare, distance_edges, holm, probe_rows

    base = [s for s in students if s.init_from is None]
    ext = [s for s in students if s.init_from is not None]
    if not base or not ext:
        return ["The run has no pretrained-short student with extensions, so the paper's comparisons do not apply."]
    short = max(p.window_len for p in base[0].phases)
    longest_doc = max([cfg.pack.doc_len[1]] + [p.pack.pack.doc_len[1] for s in students for p in s.phases])
    long_from = max(short, longest_doc)
    base_theta = _theta(base[0])
    groups: dict[str, list[Any]] = {"base": base}
    for s in ext:
        kd = _alpha(s) > 0
        raised = _theta(s) != base_theta
        role = {(True, True): "kd_raised", (False, True): "ce_raised", (True, False): "kd_kept"}.get((kd, raised))
        if role:
            groups.setdefault(role, []).append(s)
    tasks = [t for t in ("needle", "passkey") if t in cfg.eval.tasks]
    if not any(probe_rows(e, t) for e in results.values() for t in tasks):
        return ["eval.json has no per-probe scores (written by an older version); re-run `posdistill eval CONFIG`."]
    max_len = max(cfg.eval.lengths)
    edges = distance_edges(short, longest_doc, max_len)
    names = [f"{lo}–{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"{edges[-2]}–{edges[-1]}"]
    lines = [f"Scored by **needle distance** (tokens from the fact to the end of the context): a claim about long "
             f"context holds only at distances no training window showed — at least {long_from} tokens (the "
             f"short pretraining window is {short}, the longest training document {longest_doc}). Intervals: "
             f"two-level bootstrap over students and probes ({BOOTSTRAP} resamples), Holm-corrected across every "
             "comparison below; **reproduced** = the interval excludes zero in the claimed direction, "
             "**not reproduced** = it excludes zero the other way, otherwise **inconclusive**.", ""]
    comps = []
    for task in tasks:
        rows_of = {s.label: probe_rows(results[s.label], task) for s in students if s.label in results}
        per_variant: dict[str, list] = {"teacher": [probe_rows(results["teacher"], task)] if "teacher" in results else []}
        for s in base + ext:
            per_variant.setdefault(s.variant, [])
            if s.label in rows_of:
                per_variant[s.variant].append(rows_of[s.label])
        for metric, what in (("exact", "exact match"), ("token_acc", f"token accuracy (chance {1 / len(cfg.data.synthetic.alphabet) if task == 'needle' else 0.1:.3f})")):
            lines += [f"**{task}**: {what} by distance (mean over a variant's students)", "",
                      "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for name, per_student in per_variant.items():
                if per_student:
                    cells = np.mean([by_distance(r, edges, metric) for r in per_student], axis=0)
                    lines.append(f"| {name} ({len(per_student)}) | " + " | ".join(_fmt(float(c), 2) for c in cells) + " |")
            lines.append("")
        checks = [
            ("KD extension vs. the short-pretrained base (KD, θ raised − base)", "kd_raised", "base"),
            ("KD vs. CE on the same windows (both θ raised)", "kd_raised", "ce_raised"),
            ("θ raised for the long phase vs. kept short (both KD)", "kd_raised", "kd_kept"),
        ]
        for title, a, b in checks:
            for metric in ("exact", "token_acc"):
                ra = [rows_of[s.label] for s in groups.get(a, []) if s.label in rows_of]
                rb = [rows_of[s.label] for s in groups.get(b, []) if s.label in rows_of]
                comps.append((task, compare(title, metric, ra, rb, long_from)))
    holm([c for _, c in comps])
    lines += [f"| task | comparison | metric | difference at distance ≥ {long_from} | Holm-adjusted interval | "
              "students × probes | verdict |", "|---|---|---|---|---|---|---|"]
    for task, c in comps:
        interval = (f"[{c.lo:+.3f}, {c.hi:+.3f}] ({100 * (1 - c.level):.1f}%)" if not math.isnan(c.lo) else "n/a")
        lines.append(f"| {task} | {c.title} | {c.metric.replace('_', ' ')} | {_fmt(c.diff)} | {interval} | "
                     f"{c.n_a[0]}×{c.n_a[1]} vs {c.n_b[0]}×{c.n_b[1]} | **{c.verdict}** |")
    lines += ["", "What these comparisons are, in the paper's terms: the θ comparison is a partial test of the "
              "paper's finding 1 (phase-wise RoPE scaling is best under distillation) — this run has no arm with a "
              "large θ throughout and no θ sweep. The paper's findings 2 (positional perturbations propagate "
              "through the layers to the logits) and 3 (structured query-state updates in distinct spans) are "
              "**not tested** here: the sections below show the perturbation curves and weight updates without a "
              "statistic.", ""]
    return lines


def _copy(src: Path, dst_dir: Path, name: str) -> Path | None:
    if not src.is_file():
        return None
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / name)
    return dst_dir / name


def write_report(graph: Any, models: dict[str, str], eval_dir: Path, analyses: dict[str, Any],
                 summary: dict[str, Any]) -> Path:
    from stages.cache.info import cache_summary
    from stages.evaluate.report import safe_name
    from stages.train.metrics import read_metrics

    cfg, students = graph.cfg, graph.students
    out = cfg.out_dir
    fig = out / "report_figures"
    shutil.rmtree(fig, ignore_errors=True)
    ev = json.loads((eval_dir / "eval.json").read_text())
    results = {m["name"]: m for m in ev["models"]}
    lines = [f"# posdistill run report: {cfg.run.name}", ""]

    lines += ["## Budget", "",
              f"- wall time: **{summary['wall_s']:.0f} s**; peak memory (driver + Ray workers + training ranks): "
              f"**{summary['peak_memory_gib']:.2f} GiB**",
              "- stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items()),
              "- reused: " + ("; ".join(f"{k}: {len(v)}" for k, v in summary["reused"].items()) or "nothing"),
              "- computed: " + ("; ".join(f"{k}: {len(v)}" for k, v in summary["computed"].items()) or "nothing"), ""]
    history = out / "runs.jsonl"
    if history.is_file():
        lines += ["Every invocation of `posdistill run` on this directory:", "",
                  "| finished | wall s | peak GiB | computed | reused |", "|---|---|---|---|---|"]
        for row in map(json.loads, history.read_text().splitlines()):
            lines.append(f"| {row.get('finished_at', '?')} | {row['wall_s']:.0f} | {row['peak_memory_gib']:.2f} | "
                         f"{sum(map(len, row['computed'].values()))} | {sum(map(len, row['reused'].values()))} |")
        lines.append("")

    lines += ["## Teacher", "", f"`{models['teacher']}`", ""]
    boot = Path(models["teacher"]) / "bootstrap.json"
    if boot.is_file():
        meta = json.loads(boot.read_text())
        lines += [f"Bootstrapped here: {meta.get('parameters', '?')} parameters, trained {meta.get('train_seconds', '?')} s "
                  f"with copy distances ≤ {meta.get('max_trained_copy_distance', '?')}; RoPE {meta.get('rope_parameters')}.", ""]
    lines += ["## Retrieval (needle and passkey)", "",
              (eval_dir / "eval.md").read_text().strip(), ""]
    for name in models:
        png = _copy(eval_dir / f"heatmap-{safe_name(name)}.png", fig, f"heatmap-{safe_name(name)}.png")
        if png:
            lines.append(f"![{name}]({_rel(png, out)})")
    lines.append("")

    lines += ["## Loss by position", ""]
    png = _copy(eval_dir / "loss_by_position.png", fig, "loss_by_position.png")
    lines += [f"![loss by position]({_rel(png, out)})" if png else "(not measured)", ""]

    lines += ["## The paper's findings at this scale", ""]
    lines += _findings(cfg, students, results)
    lines.append("")

    lines += ["## Positional perturbation", "",
              "Relative change of hidden states per layer and KL of the output distribution when the positions seen "
              "by queries are shifted by δ (see docs: `posdistill analyze perturb`).", ""]
    for name, d in analyses.get("perturb", {}).items():
        for f in ("perturb.png", "perturb_by_delta.png"):
            png = _copy(Path(d) / f, fig, f"{safe_name(name)}-{f}")
            if png:
                lines.append(f"![{name} {f}]({_rel(png, out)})")
    lines += ["", "## Query spans", "",
              "Relative update of W_q and W_k per RoPE frequency pair from each extended student's starting point, "
              "against the pair's wavelength, with the phase windows marked.", ""]
    for name, d in analyses.get("query_spans", {}).items():
        res = Path(d) / "query_spans.json"
        if res.is_file():
            q = json.loads(res.read_text())["q"]
            band = ", ".join(f"{b} {v:.3g}" for b, v in q["band_mean"].items() if v is not None)
            spans = "; ".join(f"layer {sp['layer']} pairs {sp['pairs'][0]}-{sp['pairs'][1]} (wavelength "
                              f"{sp['wavelength'][0]:.0f}-{sp['wavelength'][1]:.0f}, {sp['band']}): {sp['mean_update']:.3g}"
                              for sp in q["spans"][:3])
            lines.append(f"- {name}: mean relative W_q update by band: {band}. Most moved spans: {spans or 'none'}")
        png = _copy(Path(d) / "query_spans.png", fig, f"{safe_name(name)}-query_spans.png")
        if png:
            lines.append(f"![{name} query spans]({_rel(png, out)})")
    lines.append("")

    lines += ["## Cache", "", "| cache | windows | tokens | k | kind | codec | bytes/token | bytes/entry |",
              "|---|---|---|---|---|---|---|---|"]
    for d in [n.out for n in graph.nodes if n.stage == "cache"]:
        if d is None or not (d / "manifest.json").is_file():
            continue
        c = cache_summary(d)
        lines.append(f"| {d.name} | {c['windows']} | {c['tokens']} | {c['k']} | {c['kind']} | {c['codec']} | "
                     f"{c['bytes_per_token']:.2f} | {c['bytes_per_entry']:.3f} |")
    lines.append("")

    lines += ["## Training", "", "| student | steps | final loss | tokens/s |", "|---|---|---|---|"]
    for s in students:
        m = read_metrics(graph.layout.run_dir(s))
        if m:
            tps = np.mean([r["tokens_per_s"] for r in m[-10:]])
            lines.append(f"| {s.label} | {len(m)} | {m[-1]['loss']:.4f} | {tps:,.0f} |")
    lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
