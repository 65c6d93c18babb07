"""The report's statistics: scored by distance, bootstrap over students and probes, Holm;
an extension against its own parent, arms paired by seed, what was unlearned, and power."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.findings import by_distance, compare, distance_edges, holm


def _rows(exact_at, distances, rng=None, p=None):
    """One student's probes: exact 1/0 by ``exact_at(distance)`` or Bernoulli(p)."""
    out = []
    for d in distances:
        x = float(rng.random() < p) if rng is not None else float(exact_at(d))
        out.append({"distance": d, "exact": x, "token_acc": x})
    return out


DIST = [8, 30, 60, 200, 300, 500, 700, 900] * 10


def test_short_distance_retrieval_is_not_long_context_retrieval():
    """A student that retrieves only near the question, against a base that never does: the
    length x depth mean would show a gain; at distance >= the window there is none."""
    near = [_rows(lambda d: d < 64, DIST) for _ in range(3)]
    base = [_rows(lambda d: False, DIST)]
    c = compare("near only", "exact", near, base, long_from=256)
    holm([c])
    assert c.diff == 0.0 and c.verdict == "not reproduced"  # no gain at all beyond the window: a definite no
    assert by_distance(near[0], [0, 64, 256, 1024], "exact") == [1.0, 0.0, 0.0]


def test_clear_effects_both_ways():
    far = [_rows(lambda d: True, DIST) for _ in range(3)]
    none = [_rows(lambda d: False, DIST) for _ in range(3)]
    up, down = compare("up", "exact", far, none, 256), compare("down", "exact", none, far, 256)
    holm([up, down])
    assert up.verdict == "reproduced" and up.lo > 0
    assert down.verdict == "reversed" and down.hi < 0


def test_probe_sampling_error_counts_even_with_one_seed():
    """0.55 vs 0.45 on 20 probes each is within probe noise (the old rule let a single seed
    through with zero variance)."""
    rng = np.random.default_rng(0)
    a = [[{"distance": 500, "exact": float(i < 11), "token_acc": 0.0} for i in range(20)]]
    b = [[{"distance": 500, "exact": float(i < 9), "token_acc": 0.0} for i in range(20)]]
    c = compare("one seed", "exact", a, b, 256)
    holm([c])
    assert abs(c.diff - 0.1) < 1e-9 and c.lo < 0 < c.hi and c.verdict == "inconclusive"
    del rng


def test_holm_makes_a_marginal_result_inconclusive_among_many():
    rng = np.random.default_rng(3)
    a = [_rows(None, [500] * 60, rng, 0.5) for _ in range(3)]
    b = [_rows(None, [500] * 60, rng, 0.38) for _ in range(3)]
    alone = compare("marginal", "exact", a, b, 256)
    holm([alone])
    assert 0.0 < alone.p < 0.05 and alone.verdict == "reproduced"
    many = [compare("marginal", "exact", a, b, 256)] + [
        compare(f"null {i}", "exact", [_rows(None, [500] * 60, rng, 0.5) for _ in range(3)],
                [_rows(None, [500] * 60, rng, 0.5) for _ in range(3)], 256, seed=i) for i in range(5)]
    holm(many)
    assert many[0].level < 0.05 / 5 + 1e-12 and many[0].verdict == "inconclusive"


def test_missing_variant_is_not_measured():
    c = compare("missing", "exact", [], [_rows(lambda d: True, DIST)], 256)
    holm([c])
    assert c.verdict == "not measured"


def test_distance_buckets():
    assert distance_edges(256, 128, 1024) == [0, 128, 256, 512, 1024]
    assert distance_edges(256, 512, 2048) == [0, 256, 512, 1024, 2048]


def test_arms_are_read_off_the_specs_not_the_names(tmp_path):
    """configs/study.yaml's six arms, recognised from phases and θ; renaming changes nothing."""
    import yaml

    from pipeline.config import parse_config
    from pipeline.findings import arms
    from pipeline.resolve import train_specs

    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "study.yaml").read_text())
    raw["run"]["out_dir"] = str(tmp_path)
    got = arms(train_specs(parse_config(raw)))
    want = {"kd-theta": "kd_raised", "ce-theta": "ce_raised", "kd-keep": "kd_kept", "kd-large": "kd_large",
            "kd-yarn": "kd_scaled", "control": "control"}
    assert {label.rsplit("-s", 1)[0]: a for label, a in got.items()} == want
    assert len(got) == 6 * 4  # every seed
    for v in raw["students"]:
        v["name"] = "x" + v["name"][::-1]
        if v.get("init_from"):
            v["init_from"] = "x" + v["init_from"][::-1]
    renamed = arms(train_specs(parse_config(raw)))
    assert sorted(renamed.values()) == sorted(got.values())


def test_profile_distance_is_paired_and_ignores_delta_zero():
    from pipeline.findings import profile_distance

    teacher = {"deltas": [{"delta": 0}, {"delta": 0.5}, {"delta": 1}], "output_kl_by_window": [[0, 1e-3, 1e-2], [0, 2e-3, 2e-2]]}
    close = {"deltas": teacher["deltas"], "output_kl_by_window": [[0, 1e-3, 1e-2], [0, 2e-3, 2e-2]]}
    far = {"deltas": teacher["deltas"], "output_kl_by_window": [[0, 1e-1, 1e-2], [0, 2e-3, 2e-4]]}
    assert np.all(profile_distance(close, teacher) == 0)
    assert np.allclose(profile_distance(far, teacher), [1.0, 1.0])  # two decades on one of two deltas
    with pytest.raises(ValueError, match="deltas differ"):
        profile_distance({"deltas": [{"delta": 0}], "output_kl_by_window": [[0]]}, teacher)


def test_unit_comparison_sees_a_clear_shift_and_not_noise():
    from pipeline.findings import compare_units, holm

    rng = np.random.default_rng(1)
    shifted = compare_units("shift", "x", [rng.normal(1.0, 0.3, 8) for _ in range(4)],
                            [rng.normal(0.0, 0.3, 8) for _ in range(4)])
    noise = compare_units("noise", "x", [rng.normal(0.0, 0.3, 8) for _ in range(4)],
                          [rng.normal(0.0, 0.3, 8) for _ in range(4)])
    holm([shifted, noise])
    assert shifted.verdict == "reproduced" and shifted.lo > 0
    assert noise.verdict == "inconclusive" and noise.lo < 0 < noise.hi


def test_old_eval_records_measured_one_more_than_the_offset():
    from pipeline.findings import probe_rows

    old = {"tasks": {"needle": {"probes": [{"length": 256, "depth": 0.0, "trial": 0, "distance": 247}]}}}
    new = {"tasks": {"needle": {"probes": [{"length": 256, "depth": 0.0, "trial": 0, "distance": 246,
                                            "fact_at": 9, "query_at": 255}]}}}
    assert probe_rows(old, "needle")[0]["distance"] == 246 == probe_rows(new, "needle")[0]["distance"]


# ----------------------------------------------------------------------------- the report on the study's design

LENGTHS, DEPTHS, TRIALS = [256, 512, 1024, 1536, 2048], [0.0, 0.25, 0.5, 0.75, 1.0], 6


def _probes(rng, near: float, far: float, probe_seed: int):
    """A model's probe records: Bernoulli(near) at distance < 256, Bernoulli(far) beyond; the
    draws depend only on the probe seed and the cell, so models of one seed share probes."""
    out = []
    for length in LENGTHS:
        for depth in DEPTHS:
            for trial in range(TRIALS):
                d = int((1 - depth) * (length - 20)) + 3
                u = np.random.default_rng([probe_seed, length, int(depth * 4), trial]).random()
                x = float(u < (near if d < 256 else far))
                out.append({"length": length, "depth": depth, "trial": trial, "distance": d, "fact_at": length - 1 - d,
                            "query_at": length - 1, "exact": x, "token_acc": x})
    return out


def _study(tmp_path, level_of):
    """configs/study.yaml's students with synthetic eval results: ``level_of(spec)`` gives a
    student's (near, far) retrieval rates."""
    import yaml

    from pipeline.config import parse_config
    from pipeline.resolve import train_specs

    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "study.yaml").read_text())
    raw["run"]["out_dir"] = str(tmp_path)
    cfg = parse_config(raw)
    students = train_specs(cfg)
    rng = np.random.default_rng(0)
    results = {"teacher": {"name": "teacher", "probe_seed": 1, "tasks": {t: {"probes": _probes(rng, 0.9, 0.9, 1)}
                                                                        for t in ("needle", "passkey")}}}
    for s in students:
        near, far = level_of(s)
        results[s.label] = {"name": s.label, "probe_seed": 1 + 1000 * s.seed,
                            "tasks": {t: {"probes": _probes(rng, near, far, 1 + 1000 * s.seed)} for t in ("needle", "passkey")}}
    return cfg, students, results


def test_extension_is_compared_with_its_own_parent_not_every_base(tmp_path):
    """θ-1e4 bases retrieve 0.2 beyond the window, θ-1e6 bases 0.8; arm (a) (from the θ-1e4
    bases) 0.3: a gain of +0.1 over its own parents, a loss against the pool of every base."""
    from pipeline import report

    def level(s):
        if s.variant == "base-large":
            return 0.9, 0.8
        if s.variant == "base":
            return 0.9, 0.2
        return 0.9, 0.3 if s.variant == "kd-theta" else 0.2

    cfg, students, results = _study(tmp_path, level)
    lines, comps, design = report._findings(cfg, students, results, {})
    ext = [c for f, t, c in comps if f == "extension" and t == "needle" and c.metric == "token_acc"]
    assert len(ext) == 1 and abs(ext[0].diff - 0.1) < 0.05 and ext[0].verdict == "reproduced", ext
    assert ext[0].n_a[0] == 4  # every seed against its own parent
    pooled = compare("pooled", "token_acc", [results[s.label]["tasks"]["needle"]["probes"] for s in students
                                             if s.variant == "kd-theta"],
                     [results[s.label]["tasks"]["needle"]["probes"] for s in students if s.init_from is None], 256)
    assert pooled.diff < -0.1  # what the old pool of every base said
    assert design["tests"] == len(comps) and design["kd"] == ["kd-theta"] and design["ce"] == ["ce-theta"]


def test_arms_of_the_same_seeds_are_paired_probe_by_probe(tmp_path):
    """(a) and (b) differ by +0.1 on every seed, while the seeds differ far more: paired by
    seed (same parent, same probes) the difference is definite; as independent arms it is not."""
    from pipeline import report

    def level(s):
        far = {0: 0.1, 1: 0.6, 2: 0.3, 3: 0.8}.get(s.seed, 0.1)
        return 0.9, far + (0.1 if s.variant == "kd-theta" else 0.0)

    cfg, students, results = _study(tmp_path, level)
    _, comps, _ = report._findings(cfg, students, results, {})
    ab = next(c for f, t, c in comps if f == "1" and t == "needle" and c.metric == "token_acc" and "(a − b)" in c.title)
    assert abs(ab.diff - 0.1) < 0.05 and ab.verdict == "reproduced", (ab.diff, ab.lo, ab.hi)
    a = [results[s.label]["tasks"]["needle"]["probes"] for s in students if s.variant == "kd-theta"]
    b = [results[s.label]["tasks"]["needle"]["probes"] for s in students if s.variant == "ce-theta"]
    unpaired = compare("unpaired", "token_acc", a, b, 256)
    holm([unpaired])
    assert unpaired.lo < 0 < unpaired.hi


def test_unlearning_is_shown_per_arm_and_named(tmp_path):
    """At the bases' own length (256) kd-keep keeps 0.85 of its bases' 0.9 (0.94, met) and
    kd-yarn 0.5 (0.56, not met): only kd-yarn is named."""
    from pipeline import report

    def level(s):
        return {"kd-yarn": 0.5, "kd-keep": 0.85}.get(s.variant, 0.9), 0.1

    cfg, students, results = _study(tmp_path, level)
    lines, _, _ = report._findings(cfg, students, results, {})
    rows = [ln for ln in lines if ln.startswith(("| kd-yarn | ", "| kd-keep | ")) and ("| needle |" in ln or "| passkey |" in ln)]
    assert len(rows) == 2 * 2 * 2  # two arms x two tasks x two metrics
    assert all(ln.endswith("| **no** |") for ln in rows if ln.startswith("| kd-yarn |"))
    assert not any("**no**" in ln for ln in rows if ln.startswith("| kd-keep |"))
    named = next(ln for ln in lines if ln.startswith("**Unlearned**"))
    assert "`kd-yarn`" in named and "kd-keep" not in named and "kd-theta" not in named


def test_power_section_sizes_the_next_run(tmp_path):
    from pipeline import report

    cfg, students, results = _study(tmp_path, lambda s: (0.9 if s.seed % 2 else 0.7, 0.3))
    _, _, design = report._findings(cfg, students, results, {})
    text = "\n".join(report._power(results, design))
    assert f"one of m = {design['tests']} Holm tests" in text and "seeds per arm" in text and "MDD" in text
    assert "paired by seed" in text and "two independent arms" in text
