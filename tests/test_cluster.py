"""A real local Ray head on loopback: jobs are submitted, deduplicated, authenticated, stopped."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.head import free_port

pytestmark = pytest.mark.slow

# Free ports, not fixed ones: two suites on one machine (or a stale head) must not meet.
PORT, DASH = free_port(), free_port()
ADDRESS = f"http://127.0.0.1:{DASH}"


def cli(*args, env=None, check=True, cwd=None):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=600, cwd=cwd)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    env = {"POSDISTILL_STATE_DIR": str(state)}
    up = cli("cluster", "up", "--port", str(PORT), "--dashboard-port", str(DASH), "--num-cpus", "2", env=env)
    assert "127.0.0.1" in up.stdout and "token authentication: on" in up.stdout
    yield env
    cli("cluster", "down", env=env)


def _listening_addresses(pids):
    addrs = set()
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    addrs.add(c.laddr.ip)
        except psutil.Error:
            pass
    return addrs


def test_head_binds_loopback_only(head):
    status = json.loads(cli("cluster", "status", env=head).stdout)
    assert status["running"] and status["gcs_address"] == f"127.0.0.1:{PORT}"
    from cluster.head import HeadInfo, _our_processes
    info = HeadInfo(**{k: status[k] for k in HeadInfo.__dataclass_fields__})
    addrs = _listening_addresses([p.pid for p in _our_processes(info)])
    assert addrs and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addrs), addrs


def test_token_file_private(head):
    token_path = json.loads(cli("cluster", "status", env=head).stdout)["token_path"]
    assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600


def _uploaded_packages(temp_dir: str) -> list:
    """The working dirs the head unpacked for its jobs."""
    found = Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/*")
    return sorted({d.resolve() for d in found if d.is_dir()})  # session_latest links to the session


def test_submit_uploads_only_the_allow_list(head, tmp_path):
    """Submitted from a tree holding secrets and outputs, the job runs (on our interpreter:
    the local head's) and what the head unpacked holds none of them."""
    from helpers import PLANTED_MARKER, PLANTED_SECRETS, planted_tree

    tree = planted_tree(tmp_path / "tree")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "upload", "out_dir": str(tmp_path / "run")},
                                   "data": {"synthetic": {"num_docs": 60}},
                                   "pack": {"window_len": 128, "doc_len": [16, 48]}}))
    env = {**head, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    out = cli("submit", "pack", str(cfg), "--address", ADDRESS, "--follow", env=env, cwd=tree)
    assert out.stdout.rstrip().endswith("SUCCEEDED") and "pack: computed" in out.stdout, out.stdout[-2000:]
    sid = out.stdout.split("submitted: ")[1].split()[0]
    row = next(r for r in cli("jobs", "list", "--address", ADDRESS, env=head).stdout.splitlines() if sid in r)
    assert f"{sys.executable} -m pipeline.cli pack" in row
    temp_dir = json.loads(cli("cluster", "status", env=head).stdout)["temp_dir"]
    ours = [d for d in _uploaded_packages(temp_dir) if (d / PLANTED_MARKER).is_file()]
    assert len(ours) == 1, _uploaded_packages(temp_dir)
    got = {str(p.relative_to(ours[0])) for p in ours[0].rglob("*") if p.is_file()}
    assert "pipeline/cli.py" in got and "cluster/upload.py" in got and "configs/demo.yaml" in got
    leaked = [f for f in got if f in PLANTED_SECRETS or f == "configs/link.yaml"
              or any(part.startswith(".") for part in Path(f).parts)]
    assert leaked == []
    assert not any(Path(f).parts[0] in ("tests", "bench", "runs") for f in got)


def test_submit_dedup_and_auth(head, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "jobtest", "out_dir": str(tmp_path / "run")},
                                   "data": {"synthetic": {"num_docs": 100}},
                                   "pack": {"window_len": 128, "doc_len": [16, 64]}}))
    first = cli("submit", "pack", str(cfg), "--address", ADDRESS, "--follow", env=head)
    assert "submitted: posdistill-pack-" in first.stdout and first.stdout.rstrip().endswith("SUCCEEDED")
    assert "pack: computed" in first.stdout  # the job ran the graph's pack node
    assert len(list((tmp_path / "run" / "pack").glob("*/_done.json"))) == 1
    sid = first.stdout.split("submitted: ")[1].split()[0]
    again = cli("submit", "pack", str(cfg), "--address", ADDRESS, env=head)
    assert again.stdout.startswith(f"already submitted: {sid}")
    listed = cli("jobs", "list", "--address", ADDRESS, env=head).stdout
    assert listed.count(sid) == 1
    # A client without the token is refused with one clear message, and nothing prints a token.
    no_token = cli("jobs", "list", "--address", ADDRESS, check=False,
                   env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")})
    assert no_token.returncode == 2
    assert "requires token authentication" in no_token.stderr and "RAY_AUTH_TOKEN" in no_token.stderr
    token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    assert token not in first.stdout + first.stderr + no_token.stderr


def test_failed_job_gets_new_attempt(head, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "run")},
                                   "data": {"source": str(tmp_path / "missing.jsonl")},
                                   "pack": {"window_len": 128, "doc_len": [16, 64]}}))
    first = cli("submit", "pack", str(cfg), "--address", ADDRESS, "--follow", env=head, check=False)
    assert first.returncode == 1 and "FAILED" in first.stdout and "data.source" in first.stdout
    second = cli("submit", "pack", str(cfg), "--address", ADDRESS, env=head, check=False)
    assert second.stdout.startswith("submitted: ") and second.stdout.split()[1].endswith("-2")


def test_down_leaves_nothing(tmp_path):
    env = {"POSDISTILL_STATE_DIR": str(tmp_path)}
    cli("cluster", "up", "--port", str(free_port()), "--dashboard-port", str(free_port()), "--num-cpus", "1", env=env)
    status = json.loads(cli("cluster", "status", env=env).stdout)
    cli("cluster", "down", env=env)
    time.sleep(0.5)
    # Not through _our_processes (what `down` uses): any process naming the head's temp dir or
    # GCS address — the Ray client server names only the latter — is a leftover.
    marks = (status["temp_dir"], status["gcs_address"])
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks):
                left.append(" ".join(p.info["cmdline"])[:160])
        except psutil.Error:
            pass
    assert left == []
    assert json.loads(cli("cluster", "status", env=env).stdout) == {"running": False}


def test_cache_and_ray_train_jobs(head, tmp_path):
    """The issue's flow: a cache job, verified; a Ray Train job (2 CPU workers, ZeRO-2) whose
    exported model loads."""
    from helpers import make_tiny_llama

    teacher = make_tiny_llama(tmp_path / "teacher", seed=3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": "jobs", "out_dir": str(tmp_path / "run")},
        "data": {"synthetic": {"num_docs": 80}},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "teacher": {"model": str(teacher)},
        "cache": {"k": 4, "windows_per_shard": 8, "windows_per_row_group": 2},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
        "train": {"launcher": "ray", "workers": 2, "deepspeed": {"zero_stage": 2}, "batch_size": 2,
                  "save_every": 100, "phases": [{"window_len": 128, "steps": 2}]},
    }))
    cache = cli("submit", "cache", str(cfg), "--address", ADDRESS, "--follow", env=head)
    assert cache.stdout.rstrip().endswith("SUCCEEDED"), cache.stdout[-2000:]
    cache_dirs = [d for d in (tmp_path / "run" / "cache").iterdir() if not d.name.startswith(".")]
    assert len(cache_dirs) == 1
    cli("cache", "verify", str(cache_dirs[0]))
    train = cli("submit", "train", str(cfg), "--address", ADDRESS, "--follow", env=head)
    assert train.stdout.rstrip().endswith("SUCCEEDED"), train.stdout[-3000:]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "train" / "student" / "model")
    assert model.config.vocab_size == 260
