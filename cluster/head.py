"""A real local Ray head on loopback with token authentication (`posdistill cluster up|down|status`).

Ray resolves ``--node-ip-address 127.0.0.1`` to the machine's outward address for
``ray start``; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it keep loopback, so the GCS,
dashboard and client server all listen on 127.0.0.1 only. ``RAY_AUTH_MODE=token`` turns on
token auth (``ray start`` leaves it off otherwise) and creates ``~/.ray/auth_token``, mode 0644;
``up`` makes it 0600 (and creates ``~/.ray`` itself, mode 0700, when it is missing) so other
local users cannot read the token and submit jobs as us.

``down`` stops exactly the processes ``up`` started: every process whose command line
names this head's temp dir, and their descendants — never other Ray instances.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.auth import DEFAULT_TOKEN_PATH, client_headers, private_dir, tighten_token_file
from pipeline.atomic import atomic_write_json
from pipeline.errors import UserError

STATE_DIR = Path(os.environ.get("POSDISTILL_STATE_DIR", Path.home() / ".posdistill"))
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


@dataclass
class HeadInfo:
    gcs_address: str
    dashboard: str
    temp_dir: str
    token_path: str
    started_at: float


def _state_file(state_dir: Path) -> Path:
    return state_dir / "head.json"


def read_state(state_dir: Path = STATE_DIR) -> HeadInfo | None:
    f = _state_file(state_dir)
    return HeadInfo(**json.loads(f.read_text())) if f.is_file() else None


def running_head(state_dir: Path = STATE_DIR) -> HeadInfo | None:
    """The head ``up`` started, if its processes still run (a stale state file left by a
    killed head must not claim an address something else now answers on)."""
    info = read_state(state_dir)
    return info if info is not None and _our_processes(info) else None


def _our_processes(info: "HeadInfo") -> list:
    """Every process of the head: those naming its temp dir, the Ray client server (which
    names only the GCS address, and is re-parented to init), and their children."""
    import psutil

    roots = []
    marks = (info.temp_dir, f"--address={info.gcs_address}")
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs = {p.pid: p for p in roots}
    for r in roots:
        try:
            procs.update({c.pid: c for c in r.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return [p for p in procs.values() if p.pid != os.getpid()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_alive(url: str, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(f"{url}/api/version", headers=client_headers())
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except Exception:
        return False


def head_up(port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None,
            num_gpus: int | None = None, state_dir: Path = STATE_DIR) -> HeadInfo:
    existing = read_state(state_dir)
    if existing and dashboard_alive(existing.dashboard):
        tighten_token_file(Path(existing.token_path))
        return existing
    state_dir.mkdir(parents=True, exist_ok=True)
    private_dir(DEFAULT_TOKEN_PATH.parent)
    # Ray's socket paths must stay short (AF_UNIX limit), so the temp dir lives under /tmp.
    temp_dir = f"/tmp/posdistill-ray-{port}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--port", str(port), "--dashboard-port", str(dashboard_port),
           "--temp-dir", temp_dir, "--disable-usage-stats",
           # Ray's fixed default (52365) collides with any other Ray on the machine, and the
           # head then never gets a job agent ("No available agent to submit job").
           "--dashboard-agent-listen-port", str(free_port()),
           # Likewise the client server's fixed 10001.
           "--ray-client-server-port", str(free_port())]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    env = {**os.environ, **LOOPBACK_ENV}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        raise UserError(f"ray start failed (port {port}, dashboard {dashboard_port}):\n{tail}")
    tighten_token_file(DEFAULT_TOKEN_PATH)
    info = HeadInfo(gcs_address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}",
                    temp_dir=temp_dir, token_path=str(DEFAULT_TOKEN_PATH), started_at=time.time())
    atomic_write_json(_state_file(state_dir), asdict(info))
    deadline = time.monotonic() + 60
    while not dashboard_alive(info.dashboard):
        if time.monotonic() > deadline:
            raise UserError(f"Ray head started but its dashboard {info.dashboard} did not answer within 60 s")
        time.sleep(0.5)
    return info


def head_down(state_dir: Path = STATE_DIR, timeout: float = 20.0) -> int:
    """Stop what ``head_up`` started; returns how many processes were stopped."""
    import psutil

    info = read_state(state_dir)
    if info is None:
        return 0
    procs = _our_processes(info)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    _state_file(state_dir).unlink(missing_ok=True)
    shutil.rmtree(info.temp_dir, ignore_errors=True)
    return len(procs)


def head_status(state_dir: Path = STATE_DIR) -> dict:
    info = read_state(state_dir)
    if info is None:
        return {"running": False}
    return {"running": dashboard_alive(info.dashboard), "processes": len(_our_processes(info)),
            **asdict(info)}
