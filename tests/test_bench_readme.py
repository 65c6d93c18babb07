"""The figures the README quotes are the ones the code computes: `plan`'s output for the
real-scale example, and every benchmark result's value, goal and met.

A change to the planner, to configs/llama-8b-to-1b.yaml or to the measured bytes per entry
(bench/results/cache_bytes.json) that moves a figure fails here until the README says the same.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLAN_ARGS = ["configs/llama-8b-to-1b.yaml", "--teacher-config", "configs/models/llama-3.1-8b.json",
             "--student-config", "configs/models/llama-3.2-1b.json"]
sys.path.insert(0, str(ROOT / "bench"))
from common import is_met  # noqa: E402


def _plan(*extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", *PLAN_ARGS, *extra], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _readme_plan() -> tuple[list[str], list[str]]:
    """The README's quoted plan: the summary lines of its code block and the table rows after it."""
    section = README[README.index("## Planning a real run"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", section, re.M | re.S) if not lang]
    assert len(blocks) == 1, "the plan section quotes one plain code block of plan output"
    table = [line for line in section.splitlines() if line.startswith("|")]
    return blocks[0].strip().splitlines(), table


def test_readme_quotes_plan_exactly() -> None:
    """The README's summary lines and table are `posdistill plan`'s output, line for line."""
    printed = _plan().strip().splitlines()
    blank = printed.index("")
    summary, table = printed[:blank], printed[blank + 1:]
    quoted_summary, quoted_table = _readme_plan()
    assert quoted_summary == summary
    assert quoted_table == table


def test_readme_plan_figures_equal_the_computed_ones() -> None:
    """385 / 203 GB of cache, 73 teacher and 47 student GPU-hours: read from the README's text,
    compared with `plan --json` (unrounded) rounded as printed."""
    plan = json.loads(_plan("--json"))
    text = "\n".join(_readme_plan()[0])
    cache = re.search(r"plain ([\d,]+) GB \(([\d.]+) B/entry\), compact ([\d,]+) GB \(([\d.]+) B/entry\)", text)
    hours = re.search(r"= ([\d,]+) GPU-hours\nstudent training: ([\d,]+) GPU-hours", text)
    assert cache and hours, text
    num = lambda s: float(s.replace(",", ""))  # noqa: E731
    assert num(cache[1]) == round(plan["cache_bytes_gb"]["plain"]) == 385
    assert num(cache[3]) == round(plan["cache_bytes_gb"]["compact"]) == 203
    assert num(cache[2]) == round(plan["bytes_per_entry"]["plain"], 2)
    assert num(cache[4]) == round(plan["bytes_per_entry"]["compact"], 2)
    assert num(hours[1]) == round(plan["teacher_gpu_hours"]) == 73
    assert num(hours[2]) == round(plan["student_gpu_hours"]) == 47


RESULTS = sorted((ROOT / "bench" / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_bench_result_has_value_goal_met(path: Path) -> None:
    """value, goal, direction and met, with met what value and goal say (not written by hand)."""
    result = json.loads(path.read_text())
    assert {"metric", "value", "goal", "direction", "met", "unit", "machine"} <= set(result), path.name
    assert result["met"] == is_met(result["value"], result["goal"], result["direction"]), path.name


def _performance_rows() -> dict[str, list[str]]:
    """README performance tables: rows `| `name.json` | value | goal | met | ... |`."""
    rows = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`([\w.-]+)\.json`", cells[0]) if len(cells) >= 4 else None
        if m:
            rows[m[1]] = cells
    return rows


def _numbers(cell: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", cell.replace(",", ""))


def _shows(shown: str, want: float) -> bool:
    """Whether `shown` is `want` rounded as written: decimals, or significant digits in e-notation."""
    if "e" in shown:
        digits = len(shown.split("e")[0].split(".")[1]) if "." in shown else 0
        return float(shown) == float(f"{want:.{digits}e}")
    digits = len(shown.split(".")[1]) if "." in shown else 0
    return float(shown) == round(want, digits)


def test_readme_quotes_every_result_with_its_goal_and_verdict() -> None:
    """Each bench JSON has a README row; its value and goal cells start with the JSON's numbers
    (in the JSON's order, rounded as written) and its met cell says yes or no as the JSON does."""
    rows = _performance_rows()
    assert set(rows) == {p.stem for p in RESULTS}
    for name, cells in rows.items():
        result = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
        for cell, field in ((cells[1], "value"), (cells[2], "goal")):
            want = result[field]
            want = list(want.values()) if isinstance(want, dict) else [want]
            got = _numbers(cell)
            assert len(got) >= len(want) and all(_shows(g, w) for g, w in zip(got, want)), (name, field, cell, want)
        assert cells[3].strip("*").lower() == ("yes" if result["met"] else "no"), (name, cells[3])
