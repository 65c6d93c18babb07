"""The report's comparisons, scored by distance with bootstrap intervals (``pipeline.stats``).

A retrieval claim is about *distance*: the RoPE offset between the fact and the question
(``distance = q − p``: p is the position of the answer's first token inside the fact, q the
position of the question's last token, whose logits predict that token; each later answer
token is predicted at the same offset). A needle placed a few tokens before the question is
retrieved inside the short pretraining window whatever the context length, so averaging over
length x depth mixes short-distance cells into a "long-context" score. Here every probe is
binned by its distance, and a comparison is scored only on probes whose distance is at least
``long_from`` (the short pretraining window and the longest training document): offsets no
training window ever showed.

Intervals: a two-level bootstrap (``pipeline.stats.two_level``): students of a variant, or
(student, parent) pairs, resampled, then probes within each. Across all comparisons of a
report the tests are Holm-corrected, and each verdict is read off its Holm-adjusted interval
(``pipeline.stats.verdict``): reproduced, reversed, not reproduced (inside ±``MARGIN``) or
inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import stats
from pipeline.stats import ALPHA, MARGIN


def probe_rows(entry: dict[str, Any], task: str) -> list[dict[str, float]]:
    """A model's per-probe records of ``task``. Records written before eval format 4 (no
    ``fact_at``) measured distance to the context's end, one more than the offset: converted."""
    g = entry.get("tasks", {}).get(task) or {}
    rows = list(g.get("probes") or [])
    return [r if "fact_at" in r else {**r, "distance": r["distance"] - 1} for r in rows]


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


@dataclass
class Comparison:
    title: str
    metric: str
    diff: float
    boot: np.ndarray  # bootstrap differences
    n_a: tuple[int, int]  # (students or pairs, probes)
    n_b: tuple[int, int]
    p: float = float("nan")
    margin: float | None = MARGIN  # equivalence margin of "not reproduced"; None: no such verdict
    level: float = ALPHA  # Holm-adjusted level for its interval
    verdict: str = "not measured"
    lo: float = float("nan")
    hi: float = float("nan")


def _far(rows: list[dict[str, float]], metric: str, long_from: int) -> np.ndarray:
    return np.array([r[metric] for r in rows if r["distance"] >= long_from], dtype=float)


def _clean(g: Any) -> np.ndarray:
    g = np.asarray(g, dtype=float)
    return g[~np.isnan(g)]


def _result(title: str, metric: str, diff: float, boot: np.ndarray, n_a: tuple[int, int], n_b: tuple[int, int],
            margin: float | None) -> Comparison:
    return Comparison(title, metric, diff, boot, n_a, n_b, p=stats.boot_p(boot), margin=margin)


def compare(title: str, metric: str, a: list[list[dict[str, float]]], b: list[list[dict[str, float]]],
            long_from: int, seed: int = 0, margin: float | None = MARGIN) -> Comparison:
    """mean(a) − mean(b) of two arms (one probe list per student) over probes at distance
    >= ``long_from``, with the two-level bootstrap of each arm."""
    return compare_units(title, metric, [_far(r, metric, long_from) for r in a],
                         [_far(r, metric, long_from) for r in b], seed, margin)


def compare_units(title: str, metric: str, ga: list[np.ndarray], gb: list[np.ndarray], seed: int = 0,
                  margin: float | None = None) -> Comparison:
    """mean(a) − mean(b) of per-unit values (one array per student: probes, windows...) of two
    independent arms, with the two-level bootstrap; the paper's direction is positive."""
    ga, gb = [g for g in map(_clean, ga) if len(g)], [g for g in map(_clean, gb) if len(g)]
    n_a, n_b = (len(ga), sum(map(len, ga))), (len(gb), sum(map(len, gb)))
    if not ga or not gb:
        return Comparison(title, metric, float("nan"), np.array([]), n_a, n_b, margin=margin)
    rng = np.random.default_rng(seed)
    diff = float(np.mean([g.mean() for g in ga]) - np.mean([g.mean() for g in gb]))
    boot = stats.two_level([[(g, 1.0)] for g in ga], rng) - stats.two_level([[(g, 1.0)] for g in gb], rng)
    return _result(title, metric, diff, boot, n_a, n_b, margin)


def _key(r: dict[str, float]) -> tuple:
    return (r["length"], r["depth"], r["trial"])


def compare_paired(title: str, metric: str, pairs: list[tuple[list[dict], list[dict], bool]], long_from: int,
                   seed: int = 0, margin: float | None = MARGIN) -> Comparison:
    """mean over (student, parent) pairs of student − parent, over probes at distance >=
    ``long_from``. ``pairs``: (student's probes, parent's probes, whether both were scored on
    the same probes). Same probes: the per-probe differences are the pair's unit; else the two
    probe sets are resampled independently. The bootstrap resamples pairs, then probes."""
    units: list[stats.Unit] = []
    n_a, n_b = [0, 0], [0, 0]
    for rows_a, rows_b, same in pairs:
        if same:
            b_of = {_key(r): r[metric] for r in rows_b}
            both = [(r[metric], b_of[_key(r)]) for r in rows_a if r["distance"] >= long_from and _key(r) in b_of]
            d = _clean([x - y for x, y in both])
            if len(d):
                units.append([(d, 1.0)])
                n_a, n_b = [n_a[0] + 1, n_a[1] + len(d)], [n_b[0] + 1, n_b[1] + len(d)]
            continue
        a, b = _clean(_far(rows_a, metric, long_from)), _clean(_far(rows_b, metric, long_from))
        if len(a) and len(b):
            units.append([(a, 1.0), (b, -1.0)])
            n_a, n_b = [n_a[0] + 1, n_a[1] + len(a)], [n_b[0] + 1, n_b[1] + len(b)]
    if not units:
        return Comparison(title, metric, float("nan"), np.array([]), tuple(n_a), tuple(n_b), margin=margin)
    diff = float(np.mean([stats.unit_value(u) for u in units]))
    boot = stats.two_level(units, np.random.default_rng(seed))
    return _result(title, metric, diff, boot, tuple(n_a), tuple(n_b), margin)


def holm(comps: list[Comparison], alpha: float = ALPHA) -> None:
    """Holm's step-down over every measured comparison; each one's interval at its adjusted
    level, and its verdict (``pipeline.stats.verdict``)."""
    measured = [c for c in comps if len(c.boot)]
    rejected, levels = stats.holm([c.p for c in measured], alpha)
    for c, rej, level in zip(measured, rejected, levels):
        c.level = float(level)
        c.lo, c.hi = stats.interval(c.boot, c.level)
        c.verdict = stats.verdict(c.lo, c.hi, bool(rej), c.margin)


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
# paper's direction is a > b in each. "parent": each student of a against its own
# ``init_from`` parent, paired (``compare_paired``).
FINDING1 = [
    ("KD extension vs. its own base (paired)", "kd_raised", "parent"),
    ("KD vs. CE, same windows and θ (a − b)", "kd_raised", "ce_raised"),
    ("phase-wise θ vs. θ kept short (a − c)", "kd_raised", "kd_kept"),
    ("phase-wise θ vs. a large θ throughout (a − d)", "kd_raised", "kd_large"),
    ("phase-wise θ vs. PI/YaRN scaling (a − e)", "kd_raised", "kd_scaled"),
]


RETAIN = 0.9  # "nothing unlearned": an arm keeps at least this share of its bases' in-window retrieval


def within(rows: list[dict[str, float]], window: int, metric: str) -> float:
    """Mean of ``metric`` over probes no longer than ``window`` (a base's own training window)."""
    xs = [r[metric] for r in rows if r["length"] <= window]
    return float(np.mean(xs)) if xs else float("nan")


def beyond(rows: list[dict[str, float]], longest_window: int, metric: str) -> float:
    """Mean of ``metric`` over probes longer than every training window (length extrapolation)."""
    xs = [r[metric] for r in rows if r["length"] > longest_window]
    return float(np.mean(xs)) if xs else float("nan")


def seed_range(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of a per-student number over seeds: a spread, not a confidence
    interval (with two to four seeds a bootstrap over them is no more than this)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return (float("nan"),) * 3
    return float(v.mean()), float(v.min()), float(v.max())


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
