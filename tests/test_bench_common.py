"""bench/common.py: alternated repeats, their spread, and a met that follows value and goal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


def test_alternate_reverses_the_order_every_other_round() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in "abc"}
    times = common.alternate(fns, repeats=4, warmup=1)
    assert calls == list("abc" "abc" "cba" "abc" "cba")
    assert times == {"a": [4.0, 9.0, 10.0, 15.0], "b": [5.0, 8.0, 11.0, 14.0], "c": [6.0, 7.0, 12.0, 13.0]}


def test_spread_and_paired_ratios() -> None:
    assert common.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "all": [3.0, 1.0, 2.0]}
    r = common.paired_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 2.0])
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 4.0)
    with pytest.raises(ValueError):
        common.paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        common.spread([])


@pytest.mark.parametrize("value, goal, direction, met", [
    (0.9, 0.9, ">=", True), (0.89, 0.9, ">=", False), (1.25, 1.25, "<=", True), (1.26, 1.25, "<=", False),
    ({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 3.0}, "<=", True), ({"a": 1.0, "b": 4.0}, {"a": 1.0, "b": 3.0}, "<=", False),
])
def test_met_follows_value_goal_and_direction(value, goal, direction, met) -> None:
    assert common.is_met(value, goal, direction) is met


@pytest.mark.parametrize("value, goal, direction", [
    (1.0, 1.0, "<"), (1.0, 1.0, "max"), ({"a": 1.0}, {"b": 1.0}, "<="), ({"a": 1.0}, 1.0, "<="),
])
def test_unclear_goals_are_refused(value, goal, direction) -> None:
    with pytest.raises(ValueError):
        common.is_met(value, goal, direction)


def test_write_result_computes_met_and_records_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    written = common.write_result("x", metric="m", value=1.3, goal=1.25, direction="<=", unit="x",
                                  details={"setup": {"n": 1}})
    on_disk = json.loads((tmp_path / "x.json").read_text())
    assert on_disk == written
    assert list(on_disk)[:6] == ["metric", "value", "goal", "direction", "met", "unit"]
    assert on_disk["met"] is False and on_disk["setup"] == {"n": 1}
    m = on_disk["machine"]
    assert m["cores"] >= 1 and len(m["load_avg"]) == 3 and m["numpy"] and m["python"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left
