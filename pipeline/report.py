"""`runs/<name>/report.md`: what the run measured, and which of the paper's findings held.

Every number here is read from the stage outputs (eval.json, the cache manifest, metrics,
analysis JSON, run timings); nothing is typed in. The verdicts use a stated rule: a
difference between two variants counts as reproduced when it is positive and larger than
twice its standard error over seeds (which needs two seeds at least), otherwise it is reported
as within noise (or reversed).
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


def _long_score(entry: dict[str, Any], short_window: int, metric: str, task: str = "needle") -> float:
    g = entry["tasks"].get(task)
    if not g:
        return float("nan")
    cols = [i for i, length in enumerate(g["lengths"]) if length > short_window]
    if not cols:
        return float("nan")
    return float(np.nanmean(np.asarray(g[metric], dtype=float)[:, cols]))


def _stats(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def verdict(a: list[float], b: list[float], chance: float = 0.0) -> tuple[str, float, float]:
    """Is mean(a) > mean(b) beyond noise and above chance? (verdict, difference, 2 x standard error)."""
    ma, sa, na = _stats(a)
    mb, sb, nb = _stats(b)
    diff = ma - mb
    se2 = 2 * math.sqrt((sa**2 / na if na else 0) + (sb**2 / nb if nb else 0))
    if math.isnan(diff):
        return "not measured", diff, se2
    if max(na, nb) < 2:
        return "single seed, no interval", diff, se2
    if ma <= chance + max(2 * sa / math.sqrt(na) if na else 0.0, 0.01):
        return "not reproduced (at chance level)", diff, se2
    if diff > 0 and diff > se2:
        return "reproduced", diff, se2
    if diff > 0:
        return "within noise", diff, se2
    return "not reproduced", diff, se2


def _fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _findings(cfg: Config, students: list[TrainSpec], results: dict[str, dict]) -> list[str]:
    base = [s for s in students if s.init_from is None]
    ext = [s for s in students if s.init_from is not None]
    if not base or not ext:
        return ["The run has no pretrained-short student with extensions, so the paper's comparisons do not apply."]
    short = max(p.window_len for p in base[0].phases)
    base_theta = _theta(base[0])
    groups: dict[str, list[Any]] = {}
    for s in ext:
        kd = _alpha(s) > 0
        raised = _theta(s) != base_theta
        role = {(True, True): "kd_raised", (False, True): "ce_raised", (True, False): "kd_kept"}.get((kd, raised))
        if role:
            groups.setdefault(role, []).append(s)
    def scores(ss: list[Any], metric: str, task: str) -> list[float]:
        return [_long_score(results[s.label], short, metric, task) for s in ss if s.label in results]

    # Needle values are 8 characters of the data alphabet, passkeys 5 digits: a guess is right
    # per token with probability 1/|alphabet| or 1/10.
    per_token = {"needle": 1.0 / len(cfg.data.synthetic.alphabet), "passkey": 0.1}
    answer_len = {"needle": 8, "passkey": 5}
    tasks = [t for t in ("needle", "passkey") if t in cfg.eval.tasks]
    lines = [f"Score: retrieval at lengths beyond the short pretraining window ({short} tokens), mean over depths "
             f"and those lengths, per seed, for each task; verdict rule: difference > 2 standard errors over "
             f"seeds, and the better variant above chance.", ""]
    for task in tasks:
        chance = {"token_acc": per_token[task], "exact": per_token[task] ** answer_len[task]}
        lines += [f"**{task}** (chance per token {per_token[task]:.3f})", "",
                  "| variant | seeds | exact match (mean ± sd) | token accuracy (mean ± sd) |", "|---|---|---|---|"]
        per: dict[str, dict[str, list[float]]] = {}
        for s in base + ext:
            e = results.get(s.label)
            if e is None:
                continue
            d = per.setdefault(s.variant, {"exact": [], "token_acc": []})
            for metric in d:
                d[metric].append(_long_score(e, short, metric, task))
        for name, d in per.items():
            me, se, n = _stats(d["exact"])
            mt, st, _ = _stats(d["token_acc"])
            lines.append(f"| {name} | {n} | {_fmt(me)} ± {_fmt(se)} | {_fmt(mt)} ± {_fmt(st)} |")
        teacher = results.get("teacher")
        if teacher:
            lines.append(f"| teacher | - | {_fmt(_long_score(teacher, short, 'exact', task))} | "
                         f"{_fmt(_long_score(teacher, short, 'token_acc', task))} |")
        lines.append("")

        checks = [
            ("1. A student trained only on short documents packed into long windows acquires long-context "
             "retrieval through KD (KD + raised θ vs. the short-pretrained student)", groups.get("kd_raised"), base),
            ("2. Logit distillation beats plain next-token training on the same windows (KD vs. CE, both raised θ)",
             groups.get("kd_raised"), groups.get("ce_raised")),
            ("3. Phase-wise RoPE scaling matters: raising θ for the long phase beats keeping the short θ (both KD)",
             groups.get("kd_raised"), groups.get("kd_kept")),
        ]
        for title, a, b in checks:
            if not a or not b:
                lines.append(f"- {title}: not measured (the run lacks one of the variants).")
                continue
            parts = []
            for metric in ("exact", "token_acc"):
                v, diff, se2 = verdict(scores(a, metric, task), scores(b, metric, task), chance[metric])
                parts.append(f"{metric.replace('_', ' ')}: **{v}** (difference {diff:+.3f}, 2·SE {se2:.3f})")
            lines.append(f"- {title} — {task}: " + "; ".join(parts) + ".")
        lines.append("")
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
