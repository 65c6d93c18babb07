"""pipeline.stats and pipeline.power: the maths the report's verdicts rest on, on synthetic data
(each test fails an implementation that gets that piece wrong)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import power, stats


def test_holm_steps_down_where_bonferroni_stops():
    p = [0.04, 0.001, 0.02]
    rejected, level = stats.holm(p, 0.05)
    assert rejected.tolist() == [True, True, True]
    assert sum(x <= 0.05 / len(p) for x in p) == 1  # Bonferroni: only 0.001
    assert np.allclose(level, [0.05, 0.05 / 3, 0.05 / 2])


def test_holm_stops_at_the_first_kept_hypothesis():
    """0.03 > 0.05/2 stops the procedure, so 0.04 is kept although 0.04 <= 0.05; the kept ones
    share the stopping step's level, so their intervals cannot exclude zero."""
    rejected, level = stats.holm([0.001, 0.03, 0.04], 0.05)
    assert rejected.tolist() == [True, False, False]
    assert np.allclose(level, [0.05 / 3, 0.05 / 2, 0.05 / 2])


def test_resample_means_match_index_resampling():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, 300) / 8.0
    fast = stats.resample_means(x, rng, 40_000)
    slow = x[rng.integers(0, len(x), (40_000, len(x)))].mean(1)
    assert abs(fast.mean() - x.mean()) < 2e-3 and abs(fast.std() / slow.std() - 1) < 0.03
    assert abs(fast.std() - x.std() / np.sqrt(len(x))) < 1e-3
    assert np.all(stats.resample_means(np.full(5, 0.25), rng, 10) == 0.25)


def _binary(mean, n=200):
    return np.array([1.0] * round(mean * n) + [0.0] * (n - round(mean * n)))


def test_two_level_bootstrap_sees_an_outlying_seed_that_pooling_hides():
    """One of three students far from the other two: pooled probes call a difference, the
    two-level bootstrap (students, then probes) does not."""
    a = [_binary(0.40), _binary(0.40), _binary(0.95)]
    b = [_binary(0.45), _binary(0.45), _binary(0.45)]
    rng = np.random.default_rng(0)
    pa, pb = np.concatenate(a), np.concatenate(b)
    pooled = stats.resample_means(pa, rng, 20_000) - stats.resample_means(pb, rng, 20_000)
    assert stats.interval(pooled, 0.05)[0] > 0  # "significant" on 600 probes
    two = stats.two_level([[(g, 1.0)] for g in a], rng) - stats.two_level([[(g, 1.0)] for g in b], rng)
    lo, hi = stats.interval(two, 0.05)
    assert lo < 0 < hi and stats.boot_p(two) > 0.2
    assert stats.verdict(lo, hi, stats.boot_p(two) <= 0.05) == "inconclusive"


def test_verdicts_are_definite_when_the_interval_allows():
    assert stats.verdict(0.01, 0.2) == "reproduced"
    assert stats.verdict(-0.2, -0.01) == "reversed"
    assert stats.verdict(-0.05, 0.04) == "not reproduced"  # inside ±0.06: no effect that matters
    assert stats.verdict(-0.05, 0.09) == "inconclusive"
    assert stats.verdict(-0.01, 0.01, margin=None) == "inconclusive"
    assert stats.verdict(0.01, 0.2, rejected=False) == "inconclusive"


def _arm(rng, n_seeds, n_probes, mean, seed_sd):
    """Bernoulli probes around per-seed means drawn with ``seed_sd``."""
    return [(rng.random(n_probes) < np.clip(rng.normal(mean, seed_sd), 0, 1)).astype(float) for _ in range(n_seeds)]


def test_variance_components_recover_the_simulated_ones():
    rng = np.random.default_rng(1)
    arms = [_arm(rng, 40, 400, 0.5, 0.1) for _ in range(3)]
    c = power.components(arms, "sim")
    assert abs(c.probe_var - 0.25) < 0.01  # about p(1-p) = 0.25 around each seed's mean
    assert abs(c.seed_var - 0.01) < 0.004
    with pytest.raises(Exception, match="sim: no student"):
        power.components([[np.array([1.0])]], "sim")


def test_planned_half_width_matches_the_bootstrap():
    """The formula the plan uses agrees with the interval the report computes, and the plan's
    design is the smallest that reaches the target."""
    rng = np.random.default_rng(2)
    m, seeds, probes = 10, 6, 300
    a, b = _arm(rng, seeds, probes, 0.5, 0.05), _arm(rng, seeds, probes, 0.5, 0.05)
    c = power.components([a, b], "sim")
    boot = stats.two_level([[(g, 1.0)] for g in a], rng) - stats.two_level([[(g, 1.0)] for g in b], rng)
    lo, hi = stats.interval(boot, 0.05 / m)
    predicted = power.half_width(c.seed_var, c.probe_var, seeds, probes, m)
    assert 0.6 < (hi - lo) / 2 / predicted < 1.3
    rows = power.plan(0.002, 0.25, cells=15, tests=26, target=0.06)
    best = power.recommend(rows)
    assert best["half_width"] <= 0.06 and best["seeds"] >= power.MIN_SEEDS
    assert power.half_width(0.002, 0.25, best["seeds"], 15 * (best["trials"] - 1), 26) > 0.06 or best["trials"] == 1
    assert all(r["trials"] is None for r in rows if r["seeds"] < best["seeds"])
    # the MDD at 80% power exceeds the half-width by z_0.8 / z
    assert best["mdd"] / best["half_width"] == pytest.approx(1 + stats.z(0.8) / stats.z(1 - 0.05 / 52))


def _eval_json(tmp_path, far_mean=0.3):
    rng = np.random.default_rng(3)
    models = []
    for variant, shift in (("kd", 0.05), ("ce", 0.0)):
        for seed in range(3):
            probes = []
            for length in (256, 512, 1024):
                for depth in (0.0, 0.5, 1.0):
                    for trial in range(4):
                        d = int((1 - depth) * (length - 20)) + 3
                        p = (0.8 if d < 256 else far_mean) + shift
                        x = float(rng.random() < p)
                        probes.append({"length": length, "depth": depth, "trial": trial, "distance": d,
                                       "fact_at": length - 1 - d, "query_at": length - 1, "exact": x, "token_acc": x})
            models.append({"name": f"{variant}-s{seed}", "probe_seed": 1 + 1000 * seed,
                           "tasks": {"needle": {"probes": probes}}})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"format": 4, "models": models}))
    return path


def test_power_command_prints_a_plan_and_rejects_bad_input(tmp_path):
    path = _eval_json(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipeline.power", *map(str, a)], capture_output=True,
                                    text=True, timeout=120)
    ok = run(path, "--variants", "kd,ce", "--window", 256, "--tests", 4)
    assert ok.returncode == 0, ok.stderr
    assert "seeds per arm" in ok.stdout and "paired by seed" in ok.stdout and "MDD" in ok.stdout
    for args, names in (([tmp_path / "nope.json"], "nope.json"), ([path, "--variants", "zz"], "--variants"),
                        ([path, "--window", 5000], "--window"), ([path, "--metric", "nope"], "--metric")):
        bad = run(*args)
        errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
        assert bad.returncode == 2 and len(errors) == 1 and names in errors[0] and "Traceback" not in bad.stderr
    (tmp_path / "junk.json").write_text("[1, 2]")
    bad = run(tmp_path / "junk.json")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "junk.json" in bad.stderr
