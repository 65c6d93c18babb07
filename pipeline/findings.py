"""The report's comparisons, scored by needle distance with bootstrap intervals.

A retrieval claim is about *distance*: how far before the question the fact sits. A needle
placed a few tokens before the question is retrieved inside the short pretraining window
whatever the context length, so averaging over length x depth mixes short-distance cells
into a "long-context" score. Here every probe is binned by its distance, and a comparison is
scored only on probes whose distance exceeds both the short pretraining window and the
longest training document (``long_from``): what no training window ever showed.

Intervals: a two-level bootstrap (students of a variant resampled, then probes within each
student), so seed-to-seed variation and per-probe sampling error both count; a variant with
one seed still has its probe error. Across all comparisons of a report the tests are
Holm-corrected: a comparison is "reproduced" when its Holm-adjusted interval excludes zero
in the claimed direction, "not reproduced" when it excludes zero in the other direction,
else "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ALPHA = 0.05
BOOTSTRAP = 2000


def probe_rows(entry: dict[str, Any], task: str) -> list[dict[str, float]]:
    g = entry.get("tasks", {}).get(task) or {}
    return list(g.get("probes") or [])


def distance_edges(short: int, longest_doc: int, max_len: int) -> list[int]:
    """Bucket edges: below the training documents' length, below the short window, then
    doublings of the short window up to the longest context."""
    edges = sorted({0, min(longest_doc, short), short})
    e = short
    while e < max_len:
        e *= 2
        edges.append(min(e, max_len))
    return sorted(set(edges))


def by_distance(rows: list[dict[str, float]], edges: list[int], metric: str) -> list[float]:
    """Mean of ``metric`` per bucket [edges[i], edges[i+1]) (the last one closed)."""
    out = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        xs = [r[metric] for r in rows if lo <= r["distance"] < hi or (last and r["distance"] == hi)]
        out.append(float(np.mean(xs)) if xs else float("nan"))
    return out


def _boot_means(groups: list[np.ndarray], rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] bootstrap means of a variant: resample its students, then each one's probes."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return np.full(n, np.nan)
    out = np.empty(n)
    for b in range(n):
        picked = rng.integers(0, len(groups), len(groups))
        out[b] = np.mean([groups[i][rng.integers(0, len(groups[i]), len(groups[i]))].mean() for i in picked])
    return out


@dataclass
class Comparison:
    title: str
    metric: str
    diff: float
    boot: np.ndarray  # bootstrap differences
    n_a: tuple[int, int]  # (students, probes)
    n_b: tuple[int, int]
    p: float = float("nan")
    level: float = ALPHA  # Holm-adjusted level for its interval
    verdict: str = "not measured"
    lo: float = float("nan")
    hi: float = float("nan")


def compare(title: str, metric: str, a: list[list[dict[str, float]]], b: list[list[dict[str, float]]],
            long_from: int, seed: int = 0) -> Comparison:
    """mean(a) - mean(b) over probes at distance >= ``long_from``, with its bootstrap."""
    ga = [np.array([r[metric] for r in rows if r["distance"] >= long_from], dtype=float) for rows in a]
    gb = [np.array([r[metric] for r in rows if r["distance"] >= long_from], dtype=float) for rows in b]
    return compare_units(title, metric, ga, gb, seed)


def compare_units(title: str, metric: str, ga: list[np.ndarray], gb: list[np.ndarray], seed: int = 0) -> Comparison:
    """mean(a) - mean(b) of per-unit values (one array per student: probes, windows...), with
    the two-level bootstrap; the paper's direction is positive."""
    ga = [np.asarray(g, dtype=float) for g in ga]
    gb = [np.asarray(g, dtype=float) for g in gb]
    ga, gb = [g[~np.isnan(g)] for g in ga], [g[~np.isnan(g)] for g in gb]
    ga, gb = [g for g in ga if len(g)], [g for g in gb if len(g)]
    n_a, n_b = (len(ga), sum(map(len, ga))), (len(gb), sum(map(len, gb)))
    if not ga or not gb:
        return Comparison(title, metric, float("nan"), np.array([]), n_a, n_b)
    rng = np.random.default_rng(seed)
    diff = float(np.mean([g.mean() for g in ga]) - np.mean([g.mean() for g in gb]))
    boot = _boot_means(ga, rng, BOOTSTRAP) - _boot_means(gb, rng, BOOTSTRAP)
    p = 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0)))
    return Comparison(title, metric, diff, boot, n_a, n_b, p=min(1.0, max(p, 1.0 / BOOTSTRAP)))


def holm(comps: list[Comparison], alpha: float = ALPHA) -> None:
    """Holm's step-down levels; each comparison's interval is taken at its own level."""
    measured = sorted([c for c in comps if len(c.boot)], key=lambda c: c.p)
    m = len(measured)
    stop = False
    for i, c in enumerate(measured):
        c.level = alpha / (m - i)
        c.lo, c.hi = (float(np.quantile(c.boot, c.level / 2)), float(np.quantile(c.boot, 1 - c.level / 2)))
        rejected = not stop and c.p <= c.level
        stop = stop or not rejected
        if rejected and c.lo > 0:
            c.verdict = "reproduced"
        elif rejected and c.hi < 0:
            c.verdict = "not reproduced (reversed)"
        else:
            c.verdict = "inconclusive"


# ----------------------------------------------------------------------------- arms

ARMS = {
    "kd_raised": "(a) KD, θ raised phase-wise",
    "ce_raised": "(b) CE, θ raised",
    "kd_kept": "(c) KD, θ kept short",
    "kd_large": "(d) KD, a large θ throughout",
    "kd_scaled": "(e) KD, PI/YaRN scaling",
    "control": "control: short window only",
}


def root_of(s: Any, by_label: dict[str, Any]) -> Any:
    """The pretrained-short base an extension descends from (``init_from`` followed up)."""
    while s.init_from is not None and s.init_from in by_label:
        s = by_label[s.init_from]
    return s


def arms(students: list[Any]) -> dict[str, str]:
    """label -> arm of every extension, read off its spec rather than its name:

    control    no phase longer than its base's window (the same steps, no long window);
    kd_scaled  a RoPE scaling type (linear = PI, yarn, ...) in its last phase;
    *_raised   its last phase's θ differs from its base's;
    kd_large   θ kept, from a base pretrained with a larger θ than the smallest base's;
    kd_kept    θ kept at the short value.
    KD means kd.alpha > 0 in the last phase; a CE arm other than ce_raised is left out."""
    by_label = {s.label: s for s in students}
    bases = [s for s in students if s.init_from is None]
    if not bases:
        return {}
    short_theta = min(float(b.phases[-1].rope.theta) for b in bases if not isinstance(b.phases[-1].rope.theta, str))
    out = {}
    for s in students:
        if s.init_from is None:
            continue
        base = root_of(s, by_label)
        last, kd = s.phases[-1], s.phases[-1].kd.alpha > 0
        base_theta = base.phases[-1].rope.theta
        if max(p.window_len for p in s.phases) <= max(p.window_len for p in base.phases):
            arm = "control"
        elif last.rope.type != "default":
            arm = "kd_scaled" if kd else None
        elif last.rope.theta != base_theta:
            arm = "kd_raised" if kd else "ce_raised"
        elif not isinstance(base_theta, str) and float(base_theta) > short_theta:
            arm = "kd_large" if kd else None
        else:
            arm = "kd_kept" if kd else None
        if arm:
            out[s.label] = arm
    return out


# The retrieval tests of finding 1 (and the extension's gain): (title, arm a, arm b); the
# paper's direction is a > b in each.
FINDING1 = [
    ("KD extension vs. its short-pretrained base", "kd_raised", "base"),
    ("KD vs. CE, same windows and θ (a − b)", "kd_raised", "ce_raised"),
    ("phase-wise θ vs. θ kept short (a − c)", "kd_raised", "kd_kept"),
    ("phase-wise θ vs. a large θ throughout (a − d)", "kd_raised", "kd_large"),
    ("phase-wise θ vs. PI/YaRN scaling (a − e)", "kd_raised", "kd_scaled"),
]


def beyond(rows: list[dict[str, float]], longest_window: int, metric: str) -> float:
    """Mean of ``metric`` over probes longer than every training window (length extrapolation)."""
    xs = [r[metric] for r in rows if r["length"] > longest_window]
    return float(np.mean(xs)) if xs else float("nan")


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): a percentile bootstrap over seeds of a per-student number (one value:
    no interval)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return (float("nan"),) * 3
    if len(v) == 1:
        return float(v[0]), float("nan"), float("nan")
    rng = np.random.default_rng(0)
    boot = v[rng.integers(0, len(v), (BOOTSTRAP, len(v)))].mean(1)
    return float(v.mean()), float(np.quantile(boot, ALPHA / 2)), float(np.quantile(boot, 1 - ALPHA / 2))


# ----------------------------------------------------------------------------- findings 2 and 3

KL_FLOOR = 1e-10  # below float32 round-off of a KL; keeps log10 finite at delta = 0-like cases


def profile_distance(student: dict[str, Any], teacher: dict[str, Any]) -> np.ndarray:
    """Per probe window: mean over delta > 0 of |log10 KL_student - log10 KL_teacher| of the
    output distribution (perturb.json's ``output_kl_by_window``). The windows are the same
    for every model of a run (seeded by the held-out seed, one tokenizer), so it is paired."""
    ds, dt = [r["delta"] for r in student["deltas"]], [r["delta"] for r in teacher["deltas"]]
    if ds != dt:
        raise ValueError(f"perturb deltas differ: {ds} vs {dt}")
    s = np.asarray(student.get("output_kl_by_window") or [], dtype=float)
    t = np.asarray(teacher.get("output_kl_by_window") or [], dtype=float)
    if s.ndim != 2 or s.shape != t.shape:
        return np.array([])
    keep = np.asarray(ds) != 0
    ls, lt = np.log10(np.maximum(s[:, keep], KL_FLOOR)), np.log10(np.maximum(t[:, keep], KL_FLOOR))
    return np.abs(ls - lt).mean(1)


def span_contrast(rel: np.ndarray, wavelength_before: np.ndarray, short: int) -> np.ndarray:
    """Per unit (window; or one for weights): mean change of the pairs whose wavelength (the
    base's spectrum) exceeds the short window minus that of the rest. ``rel`` is
    ``[units, layers, heads, pairs]``; empty when every pair is on one side."""
    long = np.asarray(wavelength_before) > short
    rel = np.asarray(rel, dtype=float)
    if not long.any() or long.all():
        return np.array([])
    return rel[..., long].mean(axis=(1, 2, 3)) - rel[..., ~long].mean(axis=(1, 2, 3))
