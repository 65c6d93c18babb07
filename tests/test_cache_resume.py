"""kill -9 of the cache driver at an arbitrary moment, then a re-run: a complete cache, no
duplicate or partial shard, and the shards finished before the kill are not recomputed."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import cache_dir_of, make_tiny_llama

from pipeline.config import parse_config
from stages.cache.manifest import read_manifest, read_plan
from stages.cache.verify import check_shard, verify_cache

pytestmark = pytest.mark.slow


def _cli(cfg, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache", str(cfg)], env=env, **kw)


def test_kill_driver_then_resume(tmp_path):
    teacher = make_tiny_llama(tmp_path / "teacher", initializer_range=0.2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw := {
        "run": {"out_dir": str(tmp_path / "run")},
        "data": {"synthetic": {"num_docs": 120}},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "teacher": {"model": str(teacher), "num_actors": 1},
        "cache": {"k": 4, "windows_per_shard": 3, "windows_per_row_group": 1},
    }))
    fault = cache_dir_of(parse_config(raw)) / ".test-fault"  # tests/hooks/sitecustomize.py
    fault.parent.mkdir(parents=True)
    fault.write_text("sleep:0.3")  # slow shards so the kill lands mid-job
    env = dict(os.environ)
    log = open(tmp_path / "first.log", "w")
    driver = _cli(cfg, env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "run" / "cache").glob("*/shard-*.parquet")):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.1)
    time.sleep(0.5)
    spawned = psutil.Process(driver.pid).children(recursive=True)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    for p in spawned:  # Ray's agents outlive a SIGKILLed driver; stop the ones this test started
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass

    (out,) = (tmp_path / "run" / "cache").iterdir()
    assert out == fault.parent
    plan = read_plan(out)
    assert not (out / "manifest.json").exists()
    visible = sorted(out.glob("shard-*.parquet"))
    assert 0 < len(visible) < len(plan["shards"]), "the kill should land mid-job"
    for shard in visible:  # every visible shard is complete and valid: nothing partial is visible
        s = plan["shards"][int(shard.stem.split("-")[1])]
        assert check_shard(shard, plan["fingerprint"], s["first_window"], s["rows"]) is None
    before = {p.name: p.stat().st_mtime_ns for p in visible}

    fault.unlink()
    rerun = _cli(cfg, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, text
    assert f"({len(visible)} valid, skipped)" in text
    assert verify_cache(out) == []
    assert not list(out.glob(".shard-*"))
    assert {k: (out / k).stat().st_mtime_ns for k in before} == before  # not recomputed
    m = read_manifest(out)
    ids = np.concatenate([pq.read_table(out / s["file"], columns=["window_id"]).column(0).to_numpy()
                          for s in m["shards"]])
    assert np.array_equal(np.sort(ids), np.arange(m["windows"]))  # every window exactly once
