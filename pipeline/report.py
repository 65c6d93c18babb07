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

from pipeline.atomic import OWNER_FILE, check_output_dir
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


def _loss_of(entry: dict[str, Any]) -> float:
    lb = entry.get("loss_by_position") or {}
    return float(lb["mean_loss"]) if "mean_loss" in lb else float("nan")


def _interval(c: Any) -> str:
    return f"[{c.lo:+.3f}, {c.hi:+.3f}] ({100 * (1 - c.level):.2f}%)" if not math.isnan(c.lo) else "n/a"


def _finding_verdict(comps: list[Any]) -> str:
    """A finding is reversed when any of its primary tests is, not reproduced when any is
    (a claimed advantage smaller than the margin), reproduced when every one is; else
    inconclusive (or not measured)."""
    measured = [c for c in comps if len(c.boot)]
    if not measured:
        return "not measured"
    for v in ("reversed", "not reproduced"):
        if any(c.verdict == v for c in measured):
            return v
    if len(measured) == len(comps) and all(c.verdict == "reproduced" for c in measured):
        return "reproduced"
    return "inconclusive"


def _pair(a: dict[str, Any], b: dict[str, Any], task: str) -> tuple[list, list, bool]:
    """(a's probes, b's probes, whether both were scored on the same probes)."""
    from pipeline import findings as F

    same = a.get("probe_seed") is not None and a.get("probe_seed") == b.get("probe_seed")
    return F.probe_rows(a, task), F.probe_rows(b, task), same


def _parent_pairs(students: list[TrainSpec], results: dict[str, dict], arm_of: dict[str, str], arm: str,
                  task: str) -> list[tuple[list, list, bool]]:
    """Every student of ``arm`` with its own ``init_from`` parent: an extension is compared
    with the model it started from (same base, same seed), not with every base."""
    return [_pair(results[s.label], results[s.init_from], task) for s in students
            if arm_of.get(s.label) == arm and s.label in results and s.init_from in results]


def _seed_pairs(a: list[TrainSpec], b: list[TrainSpec], results: dict[str, dict],
                task: str) -> list[tuple[list, list, bool]]:
    """Two arms paired by training seed, when both have the same seeds: a seed's students
    start from the same parent (or parents of the same seed) and are scored on the same
    probes, so the per-probe differences cancel what the base and the probes contribute.
    Empty when the seeds differ (the arms are then compared as independent)."""
    sa = {s.seed: s for s in a if s.label in results}
    sb = {s.seed: s for s in b if s.label in results}
    if not sa or set(sa) != set(sb):
        return []
    return [_pair(results[sa[seed].label], results[sb[seed].label], task) for seed in sorted(sa)]


def _retention(students: list[TrainSpec], results: dict[str, dict], arm_of: dict[str, str],
               tasks: list[str]) -> list[str]:
    """Nothing unlearned: each arm's retrieval on probes no longer than its bases' own
    training window, next to the same students' parents on the same lengths."""
    from pipeline import findings as F

    by_label = {s.label: s for s in students}
    lines = [f"**Nothing unlearned?** Each arm on probes no longer than its bases' training window, next to "
             f"its own bases (every student's `init_from` parent, on the same lengths); goal for the KD arms: at "
             f"least {F.RETAIN:g} × the bases on both tasks and both metrics.", "",
             "| arm | task | metric | arm's value | its bases' value | ratio | met |", "|---|---|---|---|---|---|---|"]
    failed: dict[str, list[str]] = {}
    for arm in dict.fromkeys(arm_of.values()):
        members = [s for s in students if arm_of.get(s.label) == arm and s.label in results and s.init_from in results]
        if not members:
            continue
        variant = members[0].variant
        window = {s.label: max(p.window_len for p in F.root_of(s, by_label).phases) for s in members}
        for task in tasks:
            for metric in ("exact", "token_acc"):
                ours = [F.within(F.probe_rows(results[s.label], task), window[s.label], metric) for s in members]
                theirs = [F.within(F.probe_rows(results[s.init_from], task), window[s.label], metric) for s in members]
                if any(math.isnan(x) for x in ours + theirs):
                    continue
                v, b = float(np.mean(ours)), float(np.mean(theirs))
                met = v >= F.RETAIN * b
                if not met and arm.startswith("kd_"):
                    failed.setdefault(variant, []).append(f"{task} {metric.replace('_', ' ')}")
                lines.append(f"| {variant} | {task} | {metric.replace('_', ' ')} | {v:.3f} | {b:.3f} | "
                             f"{_fmt(v / b, 2) if b > 0 else 'n/a'} | {'yes' if met else '**no**'} |")
    lines += ["", ("**Unlearned** (a KD arm below the goal): " + "; ".join(f"`{v}` ({', '.join(w)})" for v, w in failed.items())
                   if failed else "No KD arm fell below the goal."), ""]
    return lines


def _findings(cfg: Config, students: list[TrainSpec], results: dict[str, dict],
              analyses: dict[str, Any] | None = None) -> tuple[list[str], list[Any], dict[str, Any]]:
    """The findings section's lines, its Holm family and the design facts the power section
    needs (empty when the run has no extensions)."""
    from pipeline import findings as F
    from pipeline import stats

    base = [s for s in students if s.init_from is None]
    ext = [s for s in students if s.init_from is not None]
    if not base or not ext:
        return ["The run has no pretrained-short student with extensions, so the paper's comparisons do not apply."], [], {}
    short = max(p.window_len for p in base[0].phases)
    longest_window = max(p.window_len for s in students for p in s.phases)
    longest_doc = max([cfg.pack.doc_len[1]] + [p.pack.pack.doc_len[1] for s in students for p in s.phases])
    long_from = max(short, longest_doc)
    arm_of = F.arms(students)
    groups: dict[str, list[TrainSpec]] = {}
    for s in ext:
        if s.label in arm_of:
            groups.setdefault(arm_of[s.label], []).append(s)
    tasks = [t for t in ("needle", "passkey") if t in cfg.eval.tasks]
    if not any(F.probe_rows(e, t) for e in results.values() for t in tasks):
        return ["eval.json has no per-probe scores (written by an older version); re-run `posdistill eval CONFIG`."], [], {}
    max_len = max(cfg.eval.lengths)
    edges = F.distance_edges(short, longest_doc, max_len)
    names = [f"{lo}–{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"{edges[-2]}–{edges[-1]}"]
    variants = list(dict.fromkeys(s.variant for s in base + ext))
    arm_name = {s.variant: F.ARMS[arm_of[s.label]] for s in ext if s.label in arm_of}
    chance = {"needle": 1 / len(cfg.data.synthetic.alphabet), "passkey": 0.1}
    lines = [f"Scored by **distance**: the RoPE offset q − p from the fact (p, the answer's first token inside "
             "the needle) to the question (q, the last context position, whose logits predict that token). A claim "
             f"about long context holds only at offsets no training window showed — at least {long_from} (the short "
             f"pretraining window is {short}, the longest training document {longest_doc}). Intervals: two-level "
             f"bootstrap ({stats.BOOTSTRAP} resamples of the units, then of the probes within each): the units are "
             "(student, parent) pairs for an extension against its base, seeds for two arms with the same seeds "
             "(a seed's students start from the same base and are scored on the same probes, so they are compared "
             "probe by probe), else each arm's students, each at its **Holm-adjusted level** across every test "
             "of this section (the level is printed with it). Verdicts: **reproduced** / **reversed** = the "
             "interval excludes zero in the paper's direction / the other way; **not reproduced** = it lies within "
             f"±{stats.MARGIN} (retrieval tests; any advantage is smaller than that); otherwise **inconclusive**. "
             "Findings 2 and 3 have no agreed margin in their units, so they are never \"not reproduced\". "
             "Spreads over seeds are min–max ranges, not intervals.", "",
             "Arms, read off each student's spec: " + "; ".join(f"`{v}` {a}" for v, a in arm_name.items()) + ".", ""]

    # The base inside its own window: what an extension could transfer.
    step = max(short // 4, 1)
    sedges = list(range(0, short + 1, step))
    snames = [f"{lo}–{hi - 1}" for lo, hi in zip(sedges, sedges[1:])]
    lines += [f"**The bases inside their short window** (probes of length {short} only; chance: needle "
              f"{chance['needle']:.3f}, passkey 0.1 per token)", "",
              "| model | task | metric | " + " | ".join(snames) + " |", "|---|---|---|" + "---|" * len(snames)]
    for task in tasks:
        for label in ["teacher"] + [s.label for s in base]:
            if label not in results:
                continue
            rows = [r for r in F.probe_rows(results[label], task) if r["length"] == short]
            for metric in ("exact", "token_acc"):
                cells = F.by_distance(rows, sedges, metric)
                lines.append(f"| {label} | {task} | {metric.replace('_', ' ')} | " +
                             " | ".join(_fmt(c, 2) for c in cells) + " |")
    lines.append("")
    lines += _retention(students, results, arm_of, tasks)

    comps: list[tuple[str, str, Any]] = []  # (finding, task, comparison)
    for task in tasks:
        rows_of = {s.label: F.probe_rows(results[s.label], task) for s in students if s.label in results}
        per_variant: dict[str, list] = {"teacher": [F.probe_rows(results["teacher"], task)] if "teacher" in results else []}
        for v in variants:
            per_variant[v] = [rows_of[s.label] for s in base + ext if s.variant == v and s.label in rows_of]
        for metric, what in (("exact", "exact match"), ("token_acc", f"token accuracy (chance {chance[task]:.3f})")):
            lines += [f"**{task}**: {what} by distance (mean over a variant's students)", "",
                      "| model | " + " | ".join(names) + f" | lengths > {longest_window} |",
                      "|---|" + "---|" * (len(names) + 1)]
            for name, per_student in per_variant.items():
                if per_student:
                    cells = np.mean([F.by_distance(r, edges, metric) for r in per_student], axis=0)
                    far = np.mean([F.beyond(r, longest_window, metric) for r in per_student])
                    lines.append(f"| {name} ({len(per_student)}) | " + " | ".join(_fmt(float(c), 2) for c in cells)
                                 + f" | {_fmt(float(far), 2)} |")
            lines.append("")
        for title, a, b in F.FINDING1:
            for metric in ("token_acc", "exact"):
                if b == "parent":
                    pairs = _parent_pairs(students, results, arm_of, a, task)
                    if pairs:
                        comps.append(("extension", task, F.compare_paired(title, metric, pairs, long_from)))
                    continue
                pairs = _seed_pairs(groups.get(a, []), groups.get(b, []), results, task)
                if pairs:
                    comps.append(("1", task, F.compare_paired(title, metric, pairs, long_from)))
                    continue
                ra = [rows_of[s.label] for s in groups.get(a, []) if s.label in rows_of]
                rb = [rows_of[s.label] for s in groups.get(b, []) if s.label in rows_of]
                if ra and rb:
                    comps.append(("1", task, F.compare(title, metric, ra, rb, long_from)))

    lines += ["**Held-out loss** (mean over the held-out packed windows; mean over seeds [min–max over seeds])", "",
              "| model | seeds | mean loss |", "|---|---|---|"]
    for v in ["teacher"] + variants:
        vals = [_loss_of(results[lbl]) for lbl in ([v] if v == "teacher" else
                                                    [s.label for s in students if s.variant == v]) if lbl in results]
        m, lo, hi = F.seed_range(vals)
        lines.append(f"| {v} | {len(vals)} | {_fmt(m)}" + (f" [{lo:.3f}–{hi:.3f}]" if len(vals) > 1 else "") + " |")
    lines.append("")

    for finding, extra in _analysis_comparisons(students, arm_of, analyses or {}, short):
        comps += [(finding, "", c) for c in extra[1]]
        lines += extra[0]
    F.holm([c for _, _, c in comps])
    lines += [f"| finding | task | comparison | metric | difference | Holm-adjusted interval | "
              "students × units | verdict |", "|---|---|---|---|---|---|---|---|"]
    for finding, task, c in comps:
        lines.append(f"| {finding} | {task or '-'} | {c.title} | {c.metric.replace('_', ' ')} | {_fmt(c.diff)} | "
                     f"{_interval(c)} | {c.n_a[0]}×{c.n_a[1]} vs {c.n_b[0]}×{c.n_b[1]} | **{c.verdict}** |")
    lines.append("")

    primary = {"1": [c for f, t, c in comps if f == "1" and t == "needle" and c.metric == "token_acc"],
               "2": [c for f, _, c in comps if f == "2"][:1], "3": [c for f, _, c in comps if f == "3"][:1]}
    claims = {
        "1": "phase-wise RoPE scaling (a θ that uses the rotational spectrum at each stage) is best under "
             f"distillation — tested as arm (a) against (b), (c), (d) and (e) on needle token accuracy at distances "
             f"≥ {long_from}",
        "2": "positional perturbations of queries/keys propagate through the layers to the output logits, so KD "
             "carries positional information — tested as a KD student's positional-sensitivity profile (output KL "
             "against δ, first layer perturbed) being closer to the teacher's than a CE student's, (b) − (a)",
        "3": "the query states move in structured spans during extension — tested as the pairs whose wavelength "
             "exceeds the short window moving more than the rest, in (a) relative to a control trained the same "
             "steps at the short window only",
    }
    lines += ["**The paper's three findings, in its terms** (primary tests; every test above is in the Holm family)", ""]
    for k, claim in claims.items():
        cs = primary[k]
        detail = "; ".join(f"{c.title}: {_fmt(c.diff)} {_interval(c)} {c.verdict}" for c in cs) or "no test ran"
        lines.append(f"- **Finding {k}** — {claim}: **{_finding_verdict(cs)}** ({detail}).")
    lines.append("")
    design = {"long_from": long_from, "tests": len([c for _, _, c in comps if len(c.boot)]),
              "kd": [s.variant for s in groups.get("kd_raised", [])][:1], "ce": [s.variant for s in groups.get("ce_raised", [])][:1]}
    return lines, comps, design


def _power(results: dict[str, dict], design: dict[str, Any]) -> list[str]:
    """The power section: this run's variances, sized for the next run (``pipeline.power``)."""
    from pipeline import power
    from pipeline.errors import UserError

    arms = design.get("kd", []) + design.get("ce", [])
    if len(arms) < 2 or not design.get("tests"):
        return ["(needs arms (a) and (b): the primary KD − CE test)", ""]
    models = [m for m in results.values() if m.get("name") != "teacher"]
    try:
        res = power.study_power(models, arms, "needle", "token_acc", design["long_from"], design["tests"])
    except UserError as err:
        return [f"(not computed: {err})", ""]
    return [f"How many seeds per arm and probes per (length, depth) cell make the interval of the primary test "
            f"at most ±{res['target']} wide after Holm, from this run's variances "
            f"(`python -m pipeline.power eval/eval.json --variants {','.join(arms)} --window {design['long_from']} "
            f"--tests {design['tests']}` gives the same from any eval.json).", ""] + power.markdown(res) + [""]


def _read_json(d: Any, name: str) -> dict[str, Any] | None:
    path = Path(d) / name if d is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _analysis_comparisons(students: list[TrainSpec], arm_of: dict[str, str], analyses: dict[str, Any],
                          short: int) -> list[tuple[str, tuple[list[str], list[Any]]]]:
    """Findings 2 and 3: their tables and comparisons (the first of each is its primary test),
    from every seed's analysis outputs."""
    from pipeline import findings as F

    variant_of = {s.label: s.variant for s in students}
    variants = list(dict.fromkeys(variant_of.values()))
    by_arm: dict[str, list[str]] = {}
    for label, arm in arm_of.items():
        by_arm.setdefault(arm, []).append(label)
    out: list[tuple[str, tuple[list[str], list[Any]]]] = []

    def per_variant_rows(values: dict[str, float]) -> list[str]:
        rows = []
        for v in variants:
            vals = [values[lbl] for lbl in values if variant_of.get(lbl) == v]
            m, lo, hi = F.seed_range(vals)
            if not math.isnan(m):
                rows.append(f"{m:.3g}" + (f" [{lo:.3g}–{hi:.3g}]" if len(vals) > 1 else ""))
            else:
                rows.append("–")
        return rows

    pert = {n: r for n, d in analyses.get("perturb", {}).items() if (r := _read_json(d, "perturb.json"))}
    if "teacher" in pert:
        deltas = [r["delta"] for r in pert["teacher"]["deltas"]]
        lines = [f"**Finding 2 — positional sensitivity.** Queries of layer(s) "
                 f"{pert['teacher'].get('layers_perturbed')} rotated by δ positions; output KL(p‖p′) on the same "
                 f"{len(pert['teacher'].get('output_kl_by_window') or [])} repeated-sequence windows for every model "
                 "(mean over seeds). Profile distance = mean over δ > 0 of |log10 KL − log10 KL_teacher|, per window.", "",
                 "| model | " + " | ".join(f"δ={d:g}" for d in deltas) + " | profile distance to teacher |",
                 "|---|" + "---|" * (len(deltas) + 1)]
        dist = {n: F.profile_distance(r, pert["teacher"]) for n, r in pert.items() if n != "teacher"}
        kl_of = {n: [row["kl"][-1] for row in r["deltas"]] for n, r in pert.items()}
        lines.append("| teacher | " + " | ".join(f"{x:.2e}" for x in kl_of["teacher"]) + " | 0 |")
        mean_dist = {n: float(d.mean()) for n, d in dist.items() if len(d)}
        for v, cell in zip(variants, per_variant_rows(mean_dist)):
            labels = [n for n in kl_of if variant_of.get(n) == v]
            if labels:
                kl = np.mean([kl_of[n] for n in labels], axis=0)
                lines.append(f"| {v} ({len(labels)}) | " + " | ".join(f"{x:.2e}" for x in kl) + f" | {cell} |")
        lines.append("")
        comps = []
        for title, a, b in [("profile distance to the teacher, CE − KD (b − a)", "ce_raised", "kd_raised"),
                            ("profile distance to the teacher, CE − KD θ kept (b − c)", "ce_raised", "kd_kept")]:
            ga, gb = [dist[n] for n in by_arm.get(a, []) if n in dist], [dist[n] for n in by_arm.get(b, []) if n in dist]
            if ga and gb:
                comps.append(F.compare_units(title, "|Δ log10 KL|", ga, gb))
        out.append(("2", (lines, comps)))

    states = {n: r for n, d in analyses.get("query_states", {}).items() if (r := _read_json(d, "query_states.json"))}
    spans = {n: r for n, d in analyses.get("query_spans", {}).items() if (r := _read_json(d, "query_spans.json"))}
    if states or spans:
        c_rel = {n: F.span_contrast(np.asarray(r["rel"]), np.asarray(r["wavelength_before"]), short) for n, r in states.items()}
        c_abs = {n: F.span_contrast(np.asarray(r["abs"]), np.asarray(r["wavelength_before"]), short) for n, r in states.items()}
        c_w = {n: F.span_contrast(np.asarray(r["q"]["rel"])[None], np.asarray(r["wavelength_before"]), short)
               for n, r in spans.items()}
        tables = {k: {n: float(v.mean()) for n, v in c.items() if len(v)} for k, c in
                  (("rel", c_rel), ("abs", c_abs), ("w", c_w))}
        lines = [f"**Finding 3 — where the queries move.** Change from each student's starting point per RoPE pair, "
                 f"pairs whose wavelength (the base's spectrum) exceeds the short window {short} minus the rest "
                 "(> 0: the long-wavelength pairs moved more); query states on held-out windows (relative and "
                 "absolute) and W_q (relative). Mean over seeds [min–max over seeds].", "",
                 "| model | states, relative | states, absolute | W_q, relative |", "|---|---|---|---|"]
        cols = [per_variant_rows(tables["rel"]), per_variant_rows(tables["abs"]), per_variant_rows(tables["w"])]
        for i, v in enumerate(variants):
            if any(variant_of.get(n) == v for n in list(states) + list(spans)):
                lines.append(f"| {v} | {cols[0][i]} | {cols[1][i]} | {cols[2][i]} |")
        lines.append("")
        comps = []
        for title, metric, c, arm in (("query states, long − short λ, (a) − control", "relative change", c_rel, "kd_raised"),
                                      ("query states, long − short λ, (a) − control", "absolute change", c_abs, "kd_raised"),
                                      ("W_q, long − short λ, (a) − control", "relative change", c_w, "kd_raised"),
                                      ("query states, long − short λ, (b) − control", "relative change", c_rel, "ce_raised")):
            ga = [c[n] for n in by_arm.get(arm, []) if n in c]
            gb = [c[n] for n in by_arm.get("control", []) if n in c]
            if ga and gb:
                comps.append(F.compare_units(title, metric, ga, gb))
        out.append(("3", (lines, comps)))
    return out


def _student_arch(cfg: Config) -> str:
    c = cfg.student.config.model_dump() if cfg.student is not None and cfg.student.config else {}
    if not c:
        return str(cfg.student.init) if cfg.student is not None and cfg.student.init else "?"
    return (f"{c.get('num_hidden_layers', '?')} layers × {c.get('hidden_size', '?')}, "
            f"{c.get('num_attention_heads', '?')} heads × {c.get('head_dim', '?')}")


def _copy(src: Path, dst_dir: Path, name: str) -> Path | None:
    if not src.is_file():
        return None
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_dir / name)
    return dst_dir / name


def write_report(graph: Any, models: dict[str, str], eval_dir: Path, analyses: dict[str, Any],
                 summary: dict[str, Any]) -> Path:
    from stages.cache.info import cache_summary
    from stages.evaluate.report import safe_name, save_variant_heatmaps, save_variant_loss
    from stages.train.metrics import read_metrics

    cfg, students = graph.cfg, graph.students
    out = cfg.out_dir
    fig = out / "report_figures"
    check_output_dir(fig, "report")  # the user's own report_figures/ is never removed
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
    by_variant: dict[str, list[dict[str, Any]]] = {"teacher": [results["teacher"]] if "teacher" in results else []}
    for s in students:
        if s.label in results:
            by_variant.setdefault(s.variant, []).append(results[s.label])
    fig.mkdir(parents=True, exist_ok=True)
    (fig / OWNER_FILE).write_text(json.dumps({"kind": "report"}) + "\n")
    teacher_name = Path(models["teacher"]).name
    if save_variant_heatmaps(by_variant, fig / "heatmaps.png",
                             f"{cfg.run.name}: exact match by depth × length, mean over seeds "
                             f"(teacher {teacher_name}; students {_student_arch(cfg)})"):
        lines += [f"![every variant's heatmap]({_rel(fig / 'heatmaps.png', out)})", ""]
    lines.append("Per model: " + ", ".join(
        f"[{name}]({_rel(png, out)})" for name in models
        if (png := _copy(eval_dir / f"heatmap-{safe_name(name)}.png", fig, f"heatmap-{safe_name(name)}.png"))))
    lines.append("")

    lines += ["## Loss by position", ""]
    ok = save_variant_loss(by_variant, fig / "loss_by_position.png",
                           f"{cfg.run.name}: loss by position on held-out packed windows, mean over seeds "
                           f"(teacher {teacher_name}; students {_student_arch(cfg)})")
    lines += [f"![loss by position]({_rel(fig / 'loss_by_position.png', out)})" if ok else "(not measured)", ""]

    lines += ["## The paper's findings at this scale", ""]
    found, _, design = _findings(cfg, students, results, analyses)
    lines += found + [""]
    if design:
        lines += ["## Power", ""] + _power(results, design)

    lines += ["## Positional perturbation", "",
              "Relative change of hidden states per layer and KL of the output distribution when the positions seen "
              "by queries are shifted by δ (see docs: `posdistill analyze perturb`).", ""]
    first_seed = {"teacher"} | {next(s.label for s in students if s.variant == v)
                                for v in dict.fromkeys(s.variant for s in students)}
    lines.append("Figures for the first seed of each variant (finding 2 above uses every seed).")
    for name, d in analyses.get("perturb", {}).items():
        if name not in first_seed:
            continue
        for f in ("perturb.png", "perturb_by_delta.png"):
            png = _copy(Path(d) / f, fig, f"{safe_name(name)}-{f}")
            if png:
                lines.append(f"![{name} {f}]({_rel(png, out)})")
    lines += ["", "## Query spans", "",
              "Relative update of W_q and W_k per RoPE frequency pair from each extended student's starting point, "
              "against the pair's wavelength, with the phase windows marked.", ""]
    for name, d in analyses.get("query_spans", {}).items():
        if name not in first_seed:
            continue
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
