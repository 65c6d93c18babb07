from pipeline.report import verdict


def test_verdict_needs_a_margin_beyond_the_seed_spread():
    assert verdict([0.9, 0.8, 0.85], [0.1, 0.2, 0.15])[0] == "reproduced"
    assert verdict([0.5, 0.1, 0.9], [0.4, 0.0, 0.8])[0] == "within noise"
    assert verdict([0.1, 0.2], [0.5, 0.6])[0] == "not reproduced"
    assert verdict([0.9], [0.1])[0] == "single seed, no interval"
    v, diff, se2 = verdict([0.7, 0.8], [0.5])
    assert v == "reproduced" and abs(diff - 0.25) < 1e-9 and abs(se2 - 0.1) < 1e-9


def test_verdict_refuses_a_win_at_chance_level():
    assert verdict([0.040, 0.041, 0.039], [0.016, 0.016, 0.016], chance=1 / 26)[0] == "not reproduced (at chance level)"
    assert verdict([0.30, 0.31, 0.29], [0.016, 0.016, 0.016], chance=1 / 26)[0] == "reproduced"
