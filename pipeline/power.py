"""Power before the run: how many seeds per arm and probes per cell make an interval narrow.

An arm's mean score over n_s seeds with n_p probes each (the two-level design of
``pipeline.stats``) has variance σ²_seed/n_s + σ²_probe/(n_s·n_p): σ²_seed is the variance
of a student's true score between training seeds, σ²_probe the variance of one probe's score
around its student's mean. A difference of two such arms, Holm-corrected among m tests
(planned at its first step, α/m: the widest), has the half-width

    h = z_{1−α/(2m)} · sqrt(k · (σ²_seed/n_s + σ²_probe/(n_s·n_p)))

with k = 2 for two independent arms (each with these components) and k = 1 for arms paired
by seed, whose components are then those of the per-seed, per-probe differences (the
report pairs two arms with the same seeds: same parent, same probes). The minimum detectable
difference at power 1 − β is MDD = (z_{1−α/(2m)} + z_{1−β}) · h / z_{1−α/(2m)}. Probes per
student n_p = cells × trials, where cells are the (length, depth) cells at distance ≥ the
window (a cell's probes share its distance).

The components are estimated from an eval.json by the method of moments: σ²_probe is the
pooled within-student variance, σ²_seed the variance of student means within a variant
minus σ²_probe/n_p, pooled over variants and floored at zero. Cells where every probe scores
zero (nothing retrieved) say nothing about the variance of a study that does retrieve, so the
plan uses the worst-case σ²_probe (0.25, a p = 0.5 binomial, the largest variance of a score
in [0, 1]; 0.5 for a difference of two) and σ²_seed as estimated in the window
(distance < window) or beyond it, whichever is larger.

    python -m pipeline.power bench/results/study/eval.json [--variants kd-theta,ce-theta]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.findings import FINDING1, probe_rows
from pipeline.stats import ALPHA, MARGIN, z

WORST_PROBE_VAR = 0.25  # max variance of a score in [0, 1]
POWER = 0.8
# A bootstrap over fewer units has too few distinct resamples for Holm's tails (3 units: 10).
MIN_SEEDS = 4
# The report's Holm family with every arm: finding 1's retrieval tests on two tasks and two
# metrics, two tests of finding 2, four of finding 3.
STUDY_TESTS = len(FINDING1) * 2 * 2 + 2 + 4


@dataclass(frozen=True)
class Components:
    seed_var: float  # σ²_seed
    probe_var: float  # σ²_probe
    students: int
    probes: float  # mean probes per student
    source: str  # what they were estimated on


def components(arms: list[list[np.ndarray]], source: str) -> Components:
    """σ²_seed and σ²_probe of a per-probe score, from arms of students (one array of probe
    scores per student); arms with one student add to σ²_probe only."""
    students = [np.asarray(s, dtype=float) for arm in arms for s in arm if len(s)]
    dof = sum(len(s) - 1 for s in students)
    if not students or dof <= 0:
        raise UserError(f"{source}: no student has two probes there to estimate a variance from")
    probe_var = sum(float(np.var(s, ddof=1)) * (len(s) - 1) for s in students if len(s) > 1) / dof
    between, weight = 0.0, 0
    for arm in arms:
        arm = [np.asarray(s, dtype=float) for s in arm if len(s)]
        if len(arm) > 1:
            means = np.array([s.mean() for s in arm])
            between += (float(np.var(means, ddof=1)) - probe_var * float(np.mean([1 / len(s) for s in arm]))) * (len(arm) - 1)
            weight += len(arm) - 1
    seed_var = max(between / weight, 0.0) if weight else 0.0
    return Components(seed_var, probe_var, len(students), float(np.mean([len(s) for s in students])), source)


def half_width(seed_var: float, probe_var: float, seeds: int, probes: float, tests: int,
               alpha: float = ALPHA, sides: int = 2) -> float:
    """Half-width of the Holm-adjusted (first step) interval of a difference: of two
    independent arms (``sides`` 2, each with these components) or of paired units (1: the
    components are those of the per-seed differences)."""
    return z(1 - alpha / (2 * tests)) * math.sqrt(sides * (seed_var / seeds + probe_var / (seeds * probes)))


def mdd(seed_var: float, probe_var: float, seeds: int, probes: float, tests: int, alpha: float = ALPHA,
        sides: int = 2, power: float = POWER) -> float:
    """The smallest true difference the test finds with probability ``power``."""
    zc = z(1 - alpha / (2 * tests))
    return (zc + z(power)) * half_width(seed_var, probe_var, seeds, probes, tests, alpha, sides) / zc


def plan(seed_var: float, probe_var: float, cells: int, tests: int, target: float = MARGIN,
         alpha: float = ALPHA, sides: int = 2, max_seeds: int = 32, max_trials: int = 256) -> list[dict[str, Any]]:
    """Per number of seeds (MIN_SEEDS..max_seeds): the fewest probes per cell (trials) that make the
    half-width at most ``target``, or None when no number of probes up to ``max_trials`` does."""
    zc = z(1 - alpha / (2 * tests))
    out = []
    for seeds in range(MIN_SEEDS, max_seeds + 1):
        room = (target / zc) ** 2 / sides - seed_var / seeds  # what the probe term may use
        trials = None
        if room > 0:
            trials = max(1, math.ceil(probe_var / (seeds * room * cells))) if probe_var > 0 else 1
            trials = trials if trials <= max_trials else None
        row = {"seeds": seeds, "trials": trials}
        if trials is not None:
            row["half_width"] = half_width(seed_var, probe_var, seeds, cells * trials, tests, alpha, sides)
            row["mdd"] = mdd(seed_var, probe_var, seeds, cells * trials, tests, alpha, sides)
        out.append(row)
    return out


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The design with the fewest seeds that reaches the target (training a seed costs far
    more than scoring probes)."""
    return next((r for r in rows if r["trials"] is not None), None)


# ----------------------------------------------------------------------------- from an eval.json


def variant_of(name: str) -> str:
    """A student's variant from its label ``<variant>-s<seed>``."""
    return re.sub(r"-s\d+$", "", name)


def arm_scores(models: list[dict[str, Any]], task: str, metric: str, keep: Any) -> dict[str, list[np.ndarray]]:
    """variant -> one array per student of ``metric`` over the probes ``keep(row)`` selects."""
    out: dict[str, list[np.ndarray]] = {}
    for m in models:
        rows = [r for r in probe_rows(m, task) if keep(r)]
        if rows:
            out.setdefault(variant_of(m["name"]), []).append(np.array([r[metric] for r in rows], dtype=float))
    return out


def seed_of(name: str) -> int | None:
    m = re.search(r"-s(\d+)$", name)
    return int(m.group(1)) if m else None


def paired_scores(models: list[dict[str, Any]], a: str, b: str, task: str, metric: str, keep: Any) -> list[np.ndarray]:
    """Per seed that variants ``a`` and ``b`` share (and scored on the same probes): the
    per-probe differences a − b over the probes ``keep(row)`` selects."""
    by = {(variant_of(m["name"]), seed_of(m["name"])): m for m in models}
    out = []
    for (v, seed), ma in sorted(by.items(), key=lambda kv: str(kv[0])):
        mb = by.get((b, seed))
        if v != a or mb is None or ma.get("probe_seed") != mb.get("probe_seed"):
            continue
        other = {(r["length"], r["depth"], r["trial"]): r[metric] for r in probe_rows(mb, task)}
        d = [r[metric] - other[k] for r in probe_rows(ma, task)
             if keep(r) and (k := (r["length"], r["depth"], r["trial"])) in other]
        if d:
            out.append(np.array(d, dtype=float))
    return out


def far_cells(models: list[dict[str, Any]], task: str, long_from: int) -> int:
    """(length, depth) cells whose probes sit at distance >= ``long_from``."""
    return len({(r["length"], r["depth"]) for m in models for r in probe_rows(m, task) if r["distance"] >= long_from})


def _design(near: Components, far: Components | None, probe_var: float, cells: int, tests: int, target: float,
            sides: int, seeds: int, trials: int) -> dict[str, Any]:
    """A plan from components: σ²_seed the larger of in and beyond the window, σ²_probe given."""
    seed_var = max(near.seed_var, far.seed_var if far else 0.0)
    current = {"seeds": seeds, "trials": trials}
    if seeds > 1 and trials:
        current["half_width"] = half_width(seed_var, probe_var, seeds, cells * trials, tests, sides=sides)
        current["mdd"] = mdd(seed_var, probe_var, seeds, cells * trials, tests, sides=sides)
    rows = plan(seed_var, probe_var, cells, tests, target, sides=sides)
    return {"near": near, "far": far, "seed_var": seed_var, "probe_var": probe_var, "sides": sides,
            "current": current, "plan": rows, "recommended": recommend(rows),
            "recommended_equivalence": recommend(plan(seed_var, probe_var, cells, tests, target / 2, sides=sides))}


def study_power(models: list[dict[str, Any]], variants: list[str], task: str, metric: str, window: int,
                tests: int, target: float = MARGIN) -> dict[str, Any]:
    """The power computation of the primary test from ``variants``' students (their ``task``
    / ``metric`` probe scores): as two independent arms and, for two variants that share
    seeds, paired by seed (same parent, same probes: the report's design)."""
    chosen = [m for m in models if variant_of(m["name"]) in variants]
    if not chosen:
        raise UserError(f"--variants: none of {', '.join(variants)} is a model of the eval.json")
    cells = far_cells(chosen, task, window)
    if not cells:
        raise UserError(f"--window: no {task} probe sits at distance >= {window}")
    near_of, far_of = (lambda r: r["distance"] < window), (lambda r: r["distance"] >= window)
    far = arm_scores(chosen, task, metric, far_of)
    seeds = min(len(v) for v in far.values()) if far else 0
    trials = max(1, round(float(np.mean([len(s) for v in far.values() for s in v])) / cells)) if far else 0
    c_near = components(list(arm_scores(chosen, task, metric, near_of).values()), f"{task} {metric}, distance < {window}")
    c_far = components(list(far.values()), f"{task} {metric}, distance >= {window}") if far else None
    out = {"task": task, "metric": metric, "variants": variants, "window": window, "tests": tests, "target": target,
           "cells": cells, "unpaired": _design(c_near, c_far, WORST_PROBE_VAR, cells, tests, target, 2, seeds, trials)}
    if len(variants) == 2:
        pn, pf = (paired_scores(chosen, *variants, task, metric, k) for k in (near_of, far_of))
        if len(pn) > 1 and len(pf) > 1:
            out["paired"] = _design(components([pn], "paired near"), components([pf], "paired far"),
                                    2 * WORST_PROBE_VAR, cells, tests, target, 1, len(pf), trials)
    return out


def markdown(res: dict[str, Any]) -> list[str]:
    """The report's (and the command's) account of a ``study_power`` result."""
    def comp(c: Components | None) -> str:
        return (f"σ²_seed {c.seed_var:.5f}, σ²_probe {c.probe_var:.4f} ({c.students} units, "
                f"{c.probes:.0f} probes each)" if c else "no probes there")

    t, zc = res["target"], z(1 - ALPHA / (2 * res["tests"]))
    lines = [f"Primary test: {res['task']} {res['metric'].replace('_', ' ')} at distance ≥ {res['window']}, one of "
             f"m = {res['tests']} Holm tests, planned at α/m (z = {zc:.2f}); {res['cells']} (length, depth) cells at "
             f"that distance; variances from the students of {', '.join(res['variants'])}. Half-width "
             "h = z·sqrt(k·(σ²_seed/seeds + σ²_probe/(seeds·cells·trials))), k = 2 for two independent arms, 1 for "
             f"per-seed differences; MDD = (z + {z(POWER):.2f})·h/z (power {POWER:.0%}). σ²_seed is the larger of "
             f"its estimates in the window (distance < {res['window']}) and beyond; σ²_probe is the worst case, "
             "not an estimate: 0.25 (a p = 0.5 binomial, the largest variance of a [0, 1] score) per arm, 0.5 for "
             "a difference of two such scores — beyond the window this run's scores are mostly zero, and in it "
             "they are the bases' retrieval, neither the variance of a study that retrieves far.", ""]
    for key, what in (("unpaired", "two independent arms"), ("paired", "paired by seed (same parent, same probes)")):
        d = res.get(key)
        if d is None:
            continue
        cur, rec, eq = d["current"], d["recommended"], d["recommended_equivalence"]
        lines += [f"*{what}*: in the window {comp(d['near'])}; beyond it {comp(d['far'])}; planned with σ²_seed "
                  f"{d['seed_var']:.5f}, σ²_probe {d['probe_var']:.2f}.", ""]
        if cur.get("half_width") is not None:
            lines.append(f"- this run: {cur['seeds']} seeds per arm, {cur['trials']} probes per cell: h = "
                         f"{cur['half_width']:.3f}, MDD = {cur['mdd']:.3f}")
        for goal, r, why in ((t, rec, "h ≤ target"), (t / 2, eq, "a definite \"not reproduced\" when there is no effect")):
            lines.append(f"- {why} ({goal:.3f}): " + (
                f"**{r['seeds']} seeds per arm, {r['trials']} probes per cell** (h = {r['half_width']:.3f}, "
                f"MDD = {r['mdd']:.3f})" if r else "out of reach with ≤ 32 seeds and ≤ 256 probes per cell"))
        lines.append("")
    return lines


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one `error:` line like every other bad input
        raise UserError(message)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="python -m pipeline.power", description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_json", help="an eval.json with per-probe scores (posdistill eval)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated variants whose students give the variances (default: every "
                         "variant with two or more students)")
    ap.add_argument("--task", default="needle")
    ap.add_argument("--metric", default="token_acc", choices=["token_acc", "exact"])
    ap.add_argument("--window", type=int, default=None,
                    help="the short pretraining window: distance >= it is 'beyond' (default: the smallest length)")
    ap.add_argument("--tests", type=int, default=STUDY_TESTS, help=f"Holm family size (default {STUDY_TESTS})")
    ap.add_argument("--target", type=float, default=MARGIN, help=f"half-width to reach (default {MARGIN})")
    try:
        args = ap.parse_args(argv)
        path = Path(args.eval_json)
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            models = [m for m in json.loads(path.read_text())["models"] if m.get("name") != "teacher"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not an eval.json ({err.__class__.__name__}: {err})") from None
        if not any(probe_rows(m, args.task) for m in models):
            raise UserError(f"{path}: no per-probe {args.task} scores (written by an older posdistill eval?)")
        counts: dict[str, int] = {}
        for m in models:
            counts[variant_of(m["name"])] = counts.get(variant_of(m["name"]), 0) + 1
        variants = args.variants.split(",") if args.variants else [v for v, n in counts.items() if n > 1]
        if args.tests < 1 or not 0 < args.target < 1:
            raise UserError("--tests must be >= 1 and --target in (0, 1)")
        window = args.window or min(r["length"] for m in models for r in probe_rows(m, args.task))
        res = study_power(models, variants, args.task, args.metric, window, args.tests, args.target)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
