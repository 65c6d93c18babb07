"""Chaos: kill -9 the cache driver or a teacher actor at random moments, re-run after each
kill, and end with a cache byte-identical to one built without faults.

The random points come from a seeded generator (printed on failure), so a failing schedule
can be replayed. The kills are real SIGKILLs of real processes: the driver (with its
embedded Ray) or one of the Ray worker processes holding a teacher replica.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import cache_dir_of, make_tiny_llama

from pipeline.config import parse_config
from stages.cache.verify import verify_cache

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CHAOS_SEED", "20261203"))
ROUNDS = 3


def _config(root: Path, teacher: Path, out: Path) -> tuple[Path, Path]:
    raw = {"run": {"out_dir": str(out)}, "data": {"synthetic": {"num_docs": 240}},
           "pack": {"window_len": 128, "doc_len": [16, 64]},
           "teacher": {"model": str(teacher), "num_actors": 2},
           "cache": {"k": 4, "windows_per_shard": 2, "windows_per_row_group": 1, "max_retries": 50}}
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, cache_dir_of(parse_config(raw))


def _start(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache", str(cfg)], cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _actors(pid: int) -> list[psutil.Process]:
    out = []
    for p in _tree(pid)[1:]:
        try:
            if "_CacheActor" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def _snapshot(cache: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.parquet"))}
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.pop("last_run")  # timings of the run that wrote it
    manifest.pop("pack_dir")  # the two caches sit under different out_dirs
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def test_random_kills_end_byte_identical(tmp_path: Path):
    rng = random.Random(SEED)
    teacher = make_tiny_llama(tmp_path / "teacher", initializer_range=0.2)
    clean_cfg, clean_dir = _config(tmp_path, teacher, tmp_path / "clean")
    chaos_cfg, chaos_dir = _config(tmp_path, teacher, tmp_path / "chaos")
    ref = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", str(clean_cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    clean = _snapshot(clean_dir)
    shards = len(clean) - 1

    chaos_dir.mkdir(parents=True)
    (chaos_dir / ".test-fault").write_text("sleep:0.4")  # tests/hooks/sitecustomize.py: slow row groups
    schedule, landed = [], 0
    for i in range(ROUNDS):
        victim = rng.choice(["driver", "actor", "actor-then-driver"])
        after = rng.uniform(0.0, 2.0)  # seconds after the first new shard of this round
        schedule.append((victim, round(after, 2)))
        log = tmp_path / f"round{i}.log"
        before = set(chaos_dir.glob("shard-*.parquet"))
        driver = _start(chaos_cfg, log)
        deadline = time.monotonic() + 300
        while set(chaos_dir.glob("shard-*.parquet")) == before and driver.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(after)
        tree = _tree(driver.pid)
        if victim.startswith("actor"):
            actors = _actors(driver.pid)
            if actors:
                rng.choice(actors).kill()
            time.sleep(rng.uniform(0.5, 2.0))
        if victim != "actor" and driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            landed += not (chaos_dir / "manifest.json").exists()
        try:
            driver.wait(timeout=300)
        finally:
            _kill_all(tree + _tree(driver.pid))
        assert driver.returncode in (0, -signal.SIGKILL), (SEED, schedule, log.read_text()[-3000:])

    (chaos_dir / ".test-fault").unlink()
    final = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", str(chaos_cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, (SEED, schedule, final.stdout[-2000:] + final.stderr[-2000:])
    assert verify_cache(chaos_dir) == []
    leftovers = [p.name for p in chaos_dir.iterdir()
                 if p.name not in clean and p.name not in ("plan.json", "_done.json", ".lock")]
    assert not [n for n in leftovers if n.startswith(".shard") or n.startswith("shard")], leftovers
    got = _snapshot(chaos_dir)
    assert sorted(got) == sorted(clean), (SEED, schedule)
    differ = [name for name in clean if got[name] != clean[name]]
    assert not differ, (SEED, schedule, differ)
    assert landed >= 1, (SEED, schedule)  # at least one driver kill landed mid-job


def _started(cfg: Path, cache: Path, log: Path, when: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A cache driver with its embedded Ray up and, by ``when``, its teacher actors started
    ("actors": loading the teacher, no shard yet) or the first shard written ("shard")."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".test-fault").write_text("sleep:0.4")  # ~40 shards of ~0.8 s: > 10 s of work left
    driver = _start(cfg, log)
    deadline = time.monotonic() + 300
    ready = (lambda: _actors(driver.pid)) if when == "actors" else (lambda: list(cache.glob("shard-*.parquet")))
    while not ready() and driver.poll() is None:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    tree = _tree(driver.pid)
    assert driver.poll() is None and _actors(driver.pid), log.read_text()[-2000:]
    return driver, tree


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("sig,code,when", [(signal.SIGINT, 130, "shard"), (signal.SIGINT, 130, "actors"),
                                           (signal.SIGTERM, 143, "shard"), (signal.SIGTERM, 143, "actors"),
                                           (signal.SIGKILL, -9, "shard")])
def test_signal_to_the_driver_alone_stops_its_embedded_ray(tmp_path: Path, sig: int, code: int, when: str):
    """SIGINT/SIGTERM to the driver process only, while its teacher actors load or after its
    first shard: it exits 130/143, the cache is not marked complete, and within 10 s nothing
    it started (GCS, raylet, workers, teacher actors) is left. SIGKILL: Ray's processes still
    go (they share the driver's fate). The job has many shards left when the signal lands
    (checked), so an ignored signal fails the test, whatever the timing."""
    teacher = make_tiny_llama(tmp_path / "teacher", initializer_range=0.2)
    cfg, cache = _config(tmp_path, teacher, tmp_path / "run")
    driver, tree = _started(cfg, cache, tmp_path / "driver.log", when)
    try:
        written = len(list(cache.glob("shard-*.parquet")))
        os.kill(driver.pid, sig)
        assert not (cache / "manifest.json").exists()
        driver.wait(timeout=30)
        assert driver.returncode == code, (tmp_path / "driver.log").read_text()[-2000:]
        deadline = time.monotonic() + 10
        while _alive(tree[1:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(tree[1:]) == [], "left running 10 s after the driver stopped"
    finally:
        _kill_all(tree)
    assert not (cache / "manifest.json").exists()
    planned = len(json.loads((cache / "plan.json").read_text())["shards"])
    done = len(list(cache.glob("shard-*.parquet")))
    assert written < planned - 10 and done < planned, (written, done, planned)  # stopped mid-job


def test_second_cache_job_on_the_same_cache_is_refused_naming_the_holder(tmp_path: Path):
    """While one driver writes a cache, a second `cache` of the same config exits 2 with one
    line naming the first (its pid), having touched nothing; once the first is gone the
    cache can be finished."""
    teacher = make_tiny_llama(tmp_path / "teacher", initializer_range=0.2)
    cfg, cache = _config(tmp_path, teacher, tmp_path / "run")
    driver, tree = _started(cfg, cache, tmp_path / "driver.log", "actors")
    try:
        second = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", str(cfg)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert driver.poll() is None, "the first job ended before the second was refused"
        errors = [line for line in second.stderr.splitlines() if line.startswith("error")]
        assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"{cache}: another cache job is writing here (pid {driver.pid} on " in errors[0]
        os.kill(driver.pid, signal.SIGTERM)
        driver.wait(timeout=30)
    finally:
        _kill_all(tree + _tree(driver.pid))
    from pipeline.locks import exclusive

    with exclusive(cache, "cache job"):  # free once its holder is gone
        pass
