"""A multi-node Ray cluster on one machine: `cluster up --nodes 2` (head + one worker raylet,
all on 127.0.0.1, token auth on). Cache actors land on both nodes; a cache job whose worker
node is lost mid-job (stopped, or its raylet SIGKILLed) still finishes with every shard
valid; Ray Train with one worker per node trains and exports; `up` again restores a lost node."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.head import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def cli(*args, env, check=True, timeout=600):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=timeout, cwd=REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def status(env) -> dict:
    return json.loads(cli("cluster", "status", env=env).stdout)


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    env = {"POSDISTILL_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    port, dash = free_port(), free_port()
    up = cli("cluster", "up", "--nodes", "2", "--port", str(port), "--dashboard-port", str(dash),
             "--num-cpus", "1", env=env)
    assert "worker node 1 on 127.0.0.1" in up.stdout and "token authentication: on" in up.stdout
    env["ADDRESS"] = f"http://127.0.0.1:{dash}"
    env["UP_ARGS"] = json.dumps(["--nodes", "2", "--port", str(port), "--dashboard-port", str(dash), "--num-cpus", "1"])
    yield env
    cli("cluster", "down", env=env)
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(f"posdistill-ray-{port}" in a for a in (p.info["cmdline"] or []))]
    assert left == []


def _alive_nodes(env) -> dict[int, str]:
    """posdistill node index -> Ray node id, for the nodes Ray reports alive."""
    deadline = time.monotonic() + 60
    while True:
        nodes = status(env).get("nodes", [])
        if nodes or time.monotonic() > deadline:
            return {n["posdistill_node"]: n["node_id"] for n in nodes if n["state"] == "ALIVE"}
        time.sleep(1)


def _up_again(env) -> None:
    cli("cluster", "up", *json.loads(env["UP_ARGS"]), env=env)
    deadline = time.monotonic() + 60
    while set(_alive_nodes(env)) != {0, 1}:
        assert time.monotonic() < deadline, status(env)
        time.sleep(1)


def _cache_config(tmp_path: Path, name: str, num_actors: int | None = 2, num_docs: int = 240) -> tuple[Path, Path]:
    from helpers import make_tiny_llama

    from pipeline.config import parse_config
    from helpers import cache_dir_of

    teacher = make_tiny_llama(tmp_path / "teacher", seed=3)
    raw = {"run": {"name": name, "out_dir": str(tmp_path / "run")},
           "data": {"synthetic": {"num_docs": num_docs}},
           "pack": {"window_len": 128, "doc_len": [16, 64]},
           "teacher": {"model": str(teacher), **({"num_actors": num_actors} if num_actors else {})},
           "cache": {"k": 4, "windows_per_shard": 2, "windows_per_row_group": 1, "max_retries": 10}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, cache_dir_of(parse_config(raw))


def _raylet_of(worker: dict) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "raylet" and any(worker["temp_dir"] + "/" in a for a in cmd):
            out.append(p)
    return out


@pytest.mark.parametrize("kill", ["down --node", "SIGKILL raylet"])
def test_cache_job_survives_a_lost_node(cluster2, tmp_path, kill):
    """Actors on both nodes; the worker node goes mid-job; every shard is valid at the end."""
    _up_again(cluster2)  # the previous case left node 1 down
    nodes = _alive_nodes(cluster2)
    cfg, cache = _cache_config(tmp_path, f"lost-{kill.split()[0]}")
    cache.mkdir(parents=True)
    # tests/hooks/sitecustomize.py: slow row groups, so that each actor has shards left when the
    # node goes even on a loaded machine (~38 shards of ~2 s).
    (cache / ".test-fault").write_text("sleep:1.0")
    job = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "submit", "cache", str(cfg),
                            "--address", cluster2["ADDRESS"], "--follow"], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **cluster2})
    deadline = time.monotonic() + 300
    while len(list(cache.glob("shard-*.parquet"))) < 2:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.2)
    worker = status(cluster2)["workers"][0]
    if kill == "down --node":
        assert "stopped worker node 1" in cli("cluster", "down", "--node", "1", env=cluster2).stdout
        assert status(cluster2)["workers"] == []
    else:
        raylets = _raylet_of(worker)
        assert len(raylets) == 1
        raylets[0].kill()
    assert job.poll() is None, "the job ended before the node went; the test did not test a loss"
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0 and out.rstrip().endswith("SUCCEEDED"), out[-4000:]
    placed = re.search(r"cache: 2 teacher actor\(s\) on 2 node\(s\): (\S+) x1, (\S+) x1", out)
    assert placed, out[-4000:]
    assert {nodes[0][:12], nodes[1][:12]} == set(placed.groups())
    assert "died on shard" in out and "retrying on a live actor" in out
    total = len(json.loads((cache / "plan.json").read_text()).get("shards", [])) or None
    cli("cache", "verify", str(cache), env=cluster2)
    if total:
        assert len(list(cache.glob("shard-*.parquet"))) == total
    if kill != "down --node":
        deadline = time.monotonic() + 30
        while status(cluster2)["workers"][0]["running"]:  # `ray start --block` ends with its raylet
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_default_cpu_placement_fits_the_nodes(cluster2, tmp_path):
    """teacher.num_actors unset on two 1-CPU nodes: one actor per node with that node's CPU.
    (Sized by the cluster's total, one actor asked for 2 CPUs, which no node has, and the
    job waited forever.)"""
    _up_again(cluster2)
    nodes = _alive_nodes(cluster2)
    cfg, cache = _cache_config(tmp_path, "default", num_actors=None, num_docs=60)
    out = cli("submit", "cache", str(cfg), "--address", cluster2["ADDRESS"], "--follow", env=cluster2,
              timeout=300).stdout
    assert out.rstrip().endswith("SUCCEEDED"), out[-4000:]
    placed = re.search(r"cache: 2 teacher actor\(s\) on 2 node\(s\): (\S+) x1, (\S+) x1", out)
    assert placed and {nodes[0][:12], nodes[1][:12]} == set(placed.groups()), out[-4000:]
    cli("cache", "verify", str(cache), env=cluster2)


def test_ray_train_one_worker_per_node(cluster2, tmp_path):
    _up_again(cluster2)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": "rt", "out_dir": str(tmp_path / "run")},
        "data": {"synthetic": {"num_docs": 60}},
        "pack": {"window_len": 64, "doc_len": [16, 48]},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
        "train": {"launcher": "ray", "workers": 2, "batch_size": 2, "save_every": 100, "deepspeed": {"zero_stage": 2},
                  "phases": [{"window_len": 64, "steps": 2, "kd": {"alpha": 0.0}}]}}))
    train = cli("submit", "train", str(cfg), "--address", cluster2["ADDRESS"], "--follow", env=cluster2)
    assert train.stdout.rstrip().endswith("SUCCEEDED"), train.stdout[-3000:]
    # Each node has one CPU and each worker takes one: two workers are two nodes.
    assert "2 ranks" in train.stdout
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "train" / "student" / "model")
    assert model.config.vocab_size == 260


def test_up_again_after_down(cluster2):
    """Last: the whole cluster down, then up again on the same ports (teardown stops it)."""
    cli("cluster", "down", env=cluster2)
    assert status(cluster2) == {"running": False}
    bad = cli("cluster", "down", "--node", "1", env=cluster2, check=False)
    assert bad.returncode == 2 and "--node 1: no such worker node" in bad.stderr
    _up_again(cluster2)
    assert [w["running"] for w in status(cluster2)["workers"]] == [True]
