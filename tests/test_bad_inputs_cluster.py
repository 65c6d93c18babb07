"""Bad input against a real cluster: one `error:` line, exit 2, no traceback, nothing new on disk.

A 2-node loopback cluster (`cluster up --nodes 2 --num-cpus 1`, token auth on) answers: a
wrong or missing token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) on the
dashboard (`jobs list`, `submit`) and on the GCS (`cache --address host:port`) is refused in
one line saying where the token was read from; an address nothing answers on is one line;
a teacher actor that no node can hold (a GPU on this CPU cluster) fails within a bound,
naming the request and the largest node, instead of waiting forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.head import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster, a tiny teacher and a config whose pack is built (so a failing cache job
    has nothing legitimate to write before it fails)."""
    from helpers import make_tiny_llama

    root = tmp_path_factory.mktemp("badcluster")
    env = {"POSDISTILL_STATE_DIR": str(root / "state")}
    port, dash = free_port(), free_port()
    up = cli("cluster", "up", "--nodes", "2", "--port", str(port), "--dashboard-port", str(dash), "--num-cpus", "1",
             env=env)
    assert up.returncode == 0 and "worker node 1 on 127.0.0.1" in up.stdout, up.stdout + up.stderr
    try:
        token = Path(json.loads(cli("cluster", "status", env=env).stdout)["token_path"])
        teacher = make_tiny_llama(root / "teacher")
        raw = {"run": {"name": "bad", "out_dir": str(root / "out")}, "data": {"synthetic": {"num_docs": 40}},
               "pack": {"window_len": 128, "doc_len": [16, 64]}, "teacher": {"model": str(teacher)},
               "cache": {"k": 4, "windows_per_shard": 4}}
        cfg = root / "c.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        gpu = root / "gpu.yaml"
        gpu.write_text(yaml.safe_dump({**raw, "teacher": {"model": str(teacher), "gpus_per_actor": 1}}))
        assert cli("pack", str(cfg), env=env).returncode == 0
        yield {"env": env, "gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "cfg": cfg,
               "gpu": gpu, "out": root / "out", "token": token, "root": root}
    finally:
        cli("cluster", "down", env=env)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a bad-input exit (2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("command", ["jobs", "submit", "cache"])
@pytest.mark.parametrize("source", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "none"])
def test_a_refused_token_is_one_line_naming_where_it_came_from(cluster, tmp_path, command, source):
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    env = {**cluster["env"], "HOME": str(tmp_path / "home"), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "",
           **({"RAY_AUTH_TOKEN": "0" * 32} if source == "RAY_AUTH_TOKEN" else {}),
           **({"RAY_AUTH_TOKEN_PATH": str(wrong)} if source == "RAY_AUTH_TOKEN_PATH" else {})}
    argv = {"jobs": ["jobs", "list", "--address", cluster["dashboard"]],
            "submit": ["submit", "cache", str(cluster["cfg"]), "--address", cluster["dashboard"]],
            "cache": ["cache", str(cluster["cfg"]), "--address", cluster["gcs"]]}[command]
    before = _tree(cluster["out"])
    message = one_line(cli(*argv, env=env))
    where = {"RAY_AUTH_TOKEN": "the token from RAY_AUTH_TOKEN was refused",
             "RAY_AUTH_TOKEN_PATH": f"the token from {wrong} was refused", "none": "no token was found"}[source]
    assert "requires token authentication" in message and where in message, message
    assert str(tmp_path / "home" / ".ray" / "auth_token") in message  # the default place, under this HOME
    assert "0" * 32 not in message and cluster["token"].read_text().strip() not in message
    assert _tree(cluster["out"]) == before


def test_an_address_nothing_answers_on_is_one_line(cluster):
    before = _tree(cluster["out"])
    nowhere = f"127.0.0.1:{free_port()}"
    message = one_line(cli("cache", str(cluster["cfg"]), "--address", nowhere, env=cluster["env"]))
    assert f"Ray at {nowhere}: nothing answers there" in message
    assert _tree(cluster["out"]) == before


def test_a_teacher_actor_no_node_holds_fails_in_bounded_time(cluster):
    """One GPU per actor on a cluster of two 1-CPU nodes without GPUs: one line naming the
    request and the largest node, well before any actor would have been waited on."""
    t0 = time.monotonic()
    proc = cli("cache", str(cluster["gpu"]), "--address", cluster["gcs"], env=cluster["env"], timeout=180)
    took = time.monotonic() - t0
    message = one_line(proc)
    assert ("no node can hold a teacher actor of {'CPU': 1, 'GPU': 1} (teacher.gpus_per_actor): "
            "the largest of the 2 alive node(s) has {'CPU': 1, 'GPU': 0}") in message, message
    assert took < 120, took
    caches = [d for d in (cluster["out"] / "cache").iterdir() if d.is_dir()]
    assert caches and not any((d / "manifest.json").exists() or list(d.glob("shard-*")) for d in caches)
