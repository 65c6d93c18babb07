"""The report's statistics: scored by distance, bootstrap over students and probes, Holm."""

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
    assert c.diff == 0.0 and c.verdict == "inconclusive"
    assert by_distance(near[0], [0, 64, 256, 1024], "exact") == [1.0, 0.0, 0.0]


def test_clear_effects_both_ways():
    far = [_rows(lambda d: True, DIST) for _ in range(3)]
    none = [_rows(lambda d: False, DIST) for _ in range(3)]
    up, down = compare("up", "exact", far, none, 256), compare("down", "exact", none, far, 256)
    holm([up, down])
    assert up.verdict == "reproduced" and up.lo > 0
    assert down.verdict == "not reproduced (reversed)" and down.hi < 0


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
