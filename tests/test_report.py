from pipeline.report import verdict


def test_verdict_needs_a_margin_beyond_the_seed_spread():
    assert verdict([0.9, 0.8, 0.85], [0.1, 0.2, 0.15])[0] == "reproduced"
    assert verdict([0.5, 0.1, 0.9], [0.4, 0.0, 0.8])[0] == "within noise"
    assert verdict([0.1, 0.2], [0.5, 0.6])[0] == "not reproduced"
    assert verdict([0.9], [0.1])[0] == "single seed, no interval"
    v, diff, se2 = verdict([0.7, 0.8], [0.5])
    assert v == "reproduced" and abs(diff - 0.25) < 1e-9 and abs(se2 - 0.1) < 1e-9
