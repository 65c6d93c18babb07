"""Caches sized by the plan: a phase's pack (and cache) holds the windows its steps consume,
packed from a stream of the corpus that stops there; `plan` and `cache info` agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_tiny_llama

from pipeline.config import parse_config
from pipeline.resolve import train_specs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _raw(tmp_path: Path, teacher: Path) -> dict:
    kd = lambda steps: {"window_len": 128, "steps": steps}  # noqa: E731
    return {
        "run": {"name": "budget", "out_dir": str(tmp_path / "run")},
        "data": {"synthetic": {"num_docs": 20000}},  # ~1.6M tokens: far more than the steps use
        "pack": {"window_len": 128, "doc_len": [16, 64], "shuffle_buffer": 256},
        "teacher": {"model": str(teacher)},
        "cache": {"k": 4, "windows_per_shard": 4, "windows_per_row_group": 2},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}},
        "train": {"batch_size": 2, "workers": 2},
        "students": [
            {"name": "short", "phases": [kd(3)]},
            {"name": "long", "phases": [kd(5)]},
            {"name": "epochs", "phases": [{"window_len": 64, "steps": 8, "epochs": 4, "kd": {"alpha": 0.0}}]},
            {"name": "fixed", "phases": [{"window_len": 64, "steps": 8, "windows": 12, "doc_len": [8, 32],
                                          "kd": {"alpha": 0.0}}]},
        ],
    }


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"))


def test_budgets_are_shared_and_sized_by_steps(tmp_path, teacher):
    specs = {s.variant: s for s in train_specs(parse_config(_raw(tmp_path, teacher)))}
    short, long = specs["short"].phases[0], specs["long"].phases[0]
    assert short.pack.pack.max_windows == long.pack.pack.max_windows == 10  # one pack, the larger budget
    assert short.pack.fingerprint() == long.pack.fingerprint()
    assert specs["epochs"].phases[0].pack.pack.max_windows == 4  # 8 steps x 2 / 4 epochs
    assert specs["fixed"].phases[0].pack.pack.max_windows == 12


def test_plan_and_cache_agree_and_the_corpus_is_not_read_whole(tmp_path, teacher):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, teacher)))
    plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", str(cfg), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    phases = [p for p in json.loads(plan.stdout)["phases"] if p["kd"]]
    assert {p["cache_tokens"] for p in phases} == {10 * 128}
    built = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", str(cfg)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    caches = [Path(line) for line in built.stdout.splitlines() if line.startswith("/")]
    assert len(caches) == 1, built.stdout  # both KD students read one cache
    info = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "info", str(caches[0]), "--json"],
                                     cwd=REPO, capture_output=True, text=True, timeout=120).stdout)
    assert info["tokens"] == 10 * 128 == phases[0]["cache_tokens"]
    pack = json.loads(next((tmp_path / "run" / "pack").glob("*/pack.json")).read_text())
    assert pack["stats"]["windows"] == 10
    assert pack["stats"]["docs_read"] < 1000  # stopped early (the shuffle buffer reads 256 chunks ahead)
