"""A real local Ray head on loopback with token authentication (`posdistill cluster up|down|status`).

Ray resolves ``--node-ip-address 127.0.0.1`` to the machine's outward address for
``ray start``; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it keep loopback, so the GCS,
dashboard and client server all listen on 127.0.0.1 only. ``RAY_AUTH_MODE=token`` turns on
token auth (``ray start`` leaves it off otherwise) and creates ``~/.ray/auth_token``, mode 0644;
``up`` makes it 0600 (and creates ``~/.ray`` itself, mode 0700, when it is missing) so other
local users cannot read the token and submit jobs as us.

``up --nodes N`` adds N-1 worker nodes on the same loopback address: each a ``ray start
--address GCS --block`` (through ``cluster.node``, which keeps it on 127.0.0.1) with its own
temp dir, ports and a custom resource ``posdistill_node_<i>: 1`` (the head has
``posdistill_node_0``), so they are distinct Ray nodes that work can be pinned to. The state
file records them; ``up`` again restarts whichever of them is not running.

``down`` stops exactly the processes ``up`` started: every process whose command line
names this head's (or a worker's) temp dir, and their descendants — never other Ray
instances. The order is worker nodes, then the head's other processes, then its GCS (so no
raylet outlives the GCS and retries against a closed port). ``down --node I`` stops worker
I alone: to Ray it is a lost node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.auth import DEFAULT_TOKEN_PATH, client_headers, ensure_token_file, private_dir, tighten_token_file
from pipeline.atomic import atomic_write_json
from pipeline.errors import UserError

STATE_DIR = Path(os.environ.get("POSDISTILL_STATE_DIR", Path.home() / ".posdistill"))
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


@dataclass
class WorkerNode:
    """A worker node ``up --nodes`` started: its ``ray start --block`` process leads its own
    session; its raylet and agents name ``temp_dir`` on their command lines."""

    index: int
    temp_dir: str
    resource: str  # the custom resource only this node has (1 unit)
    pid: int
    log: str


@dataclass
class HeadInfo:
    gcs_address: str
    dashboard: str
    temp_dir: str
    token_path: str
    started_at: float
    workers: list[WorkerNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = WorkerNode.__dataclass_fields__
        self.workers = [w if isinstance(w, WorkerNode) else WorkerNode(**{k: v for k, v in w.items() if k in names})
                        for w in self.workers]

    def worker(self, index: int) -> WorkerNode | None:
        return next((w for w in self.workers if w.index == index), None)


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


def node_resource(index: int) -> str:
    return f"posdistill_node_{index}"


def _our_processes(info: "HeadInfo") -> list:
    """Every process of the head: those naming its temp dir, the Ray client server (which
    names only the GCS address, and is re-parented to init), and their children. A worker
    node's temp dir (``<head temp dir>-w<i>`` would contain the head's) is named apart."""
    return _processes((info.temp_dir + "/", f"--address={info.gcs_address}"),
                      exact=(info.temp_dir,))


def _worker_processes(w: WorkerNode) -> list:
    return _processes((w.temp_dir + "/",), exact=(w.temp_dir,))


def _processes(marks: tuple[str, ...], exact: tuple[str, ...] = ()) -> list:
    """Processes with an argument that contains one of ``marks`` or equals (or ends with
    ``=``) one of ``exact``, and their descendants; never this process."""
    import psutil

    def ours(arg: str) -> bool:
        return any(m in arg for m in marks) or any(arg == e or arg.endswith("=" + e) for e in exact)

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(ours(arg) for arg in (p.info["cmdline"] or [])):
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


def ray_nodes(dashboard: str, timeout: float = 5.0) -> list[dict]:
    """The cluster's nodes as its dashboard reports them: node_id, state (ALIVE/DEAD), and
    which ``posdistill_node_<i>`` resource each has (None for a node ``up`` did not start)."""
    req = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=1000", headers=client_headers())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        rows = json.loads(r.read())["data"]["result"]["result"]
    return [{"node_id": n["node_id"], "state": n["state"],
             "posdistill_node": next((int(k.rsplit("_", 1)[1]) for k in n.get("resources_total", {})
                                      if k.startswith("posdistill_node_")), None)} for n in rows]


def head_up(port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None,
            num_gpus: int | None = None, state_dir: Path = STATE_DIR, nodes: int = 1) -> HeadInfo:
    """The head (reused when its dashboard answers) plus worker nodes 1..``nodes``-1, each
    started unless it runs. ``num_cpus``/``num_gpus`` are per node."""
    if nodes < 1:
        raise UserError(f"--nodes: {nodes}; give 1 (the head alone) or more")
    existing = read_state(state_dir)
    if existing and dashboard_alive(existing.dashboard):
        tighten_token_file(Path(existing.token_path))
        info = existing
    else:
        info = _start_head(port, dashboard_port, num_cpus, num_gpus, state_dir)
    for i in range(1, nodes):
        w = info.worker(i)
        if w is None or not _worker_running(w):
            _save(state_dir, info, _start_worker(info, i, num_cpus, num_gpus, state_dir))
    return info


def _save(state_dir: Path, info: HeadInfo, worker: WorkerNode | None = None, drop: int | None = None) -> None:
    """Record ``worker`` (replacing one of its index) or forget worker ``drop``."""
    gone = {worker.index if worker else None, drop}
    info.workers = sorted([w for w in info.workers if w.index not in gone] + ([worker] if worker else []),
                          key=lambda w: w.index)
    atomic_write_json(_state_file(state_dir), asdict(info))


def _start_head(port: int, dashboard_port: int, num_cpus: int | None, num_gpus: int | None,
                state_dir: Path) -> HeadInfo:
    state_dir.mkdir(parents=True, exist_ok=True)
    private_dir(DEFAULT_TOKEN_PATH.parent)
    ensure_token_file()  # `ray start --head` under RAY_AUTH_MODE=token wants one to exist
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
           "--ray-client-server-port", str(free_port()),
           "--resources", json.dumps({node_resource(0): 1})]
    cmd += _capacity(num_cpus, num_gpus)
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


def _capacity(num_cpus: int | None, num_gpus: int | None) -> list[str]:
    return ([] if num_cpus is None else ["--num-cpus", str(num_cpus)]) + \
        ([] if num_gpus is None else ["--num-gpus", str(num_gpus)])


def _start_worker(info: HeadInfo, index: int, num_cpus: int | None, num_gpus: int | None, state_dir: Path,
                  timeout: float = 90.0) -> WorkerNode:
    """``ray start --address GCS --block`` as worker node ``index``, in its own session; returns
    once Ray says the node runs (it has registered with the GCS by then)."""
    temp_dir = f"{info.temp_dir}-w{index}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    log = state_dir / f"worker-{index}.log"
    cmd = [sys.executable, "-m", "cluster.node", "--address", info.gcs_address, "--node-ip-address", "127.0.0.1",
           "--temp-dir", temp_dir, "--disable-usage-stats", "--resources", json.dumps({node_resource(index): 1}),
           # Each node its own agent port (the fixed default collides), and workers on ports the
           # OS picks rather than the head's range 10002-19999.
           "--dashboard-agent-listen-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0",
           *_capacity(num_cpus, num_gpus), "--block"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **LOOPBACK_ENV,
           "PYTHONPATH": os.pathsep.join([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    worker = WorkerNode(index=index, temp_dir=temp_dir, resource=node_resource(index), pid=proc.pid, log=str(log))
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(_worker_processes(worker) + ([] if proc.poll() is not None else [_proc(proc.pid)]))
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            raise UserError(f"cluster up: worker node {index} did not start (log {log}):\n{tail}")
        time.sleep(0.3)
    return worker


def _proc(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _worker_running(w: WorkerNode) -> bool:
    """Its ``ray start --block`` still runs (it exits when the raylet or an agent dies)."""
    import psutil

    p = _proc(w.pid)
    try:
        return p is not None and p.status() != psutil.STATUS_ZOMBIE and any(w.temp_dir in a for a in p.cmdline())
    except psutil.Error:
        return False


def _stop(procs: list, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL whatever still runs after ``timeout``; returns how many there were."""
    import psutil

    procs = [p for p in procs if p is not None]
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
    return len(procs)


def _is_gcs(p) -> bool:
    import psutil

    try:
        return bool(p.cmdline()) and Path(p.cmdline()[0]).name == "gcs_server"
    except psutil.Error:
        return False


_TEMP_DIR = re.compile(r"^/tmp/posdistill-ray-[0-9]+(-w[0-9]+)?$")


def _remove_temp_dir(d: str) -> None:
    """Remove a Ray temp dir this module named (``/tmp/posdistill-ray-<port>[-w<i>]``); a state
    file naming any other directory was not written by us and deletes nothing."""
    if _TEMP_DIR.match(d):
        shutil.rmtree(d, ignore_errors=True)


def worker_down(index: int, state_dir: Path = STATE_DIR, timeout: float = 20.0) -> int:
    """Stop worker node ``index`` alone (to Ray, a lost node); returns how many processes were stopped."""
    info = read_state(state_dir)
    w = info.worker(index) if info is not None else None
    if w is None:
        known = ", ".join(str(x.index) for x in info.workers) if info is not None else ""
        raise UserError(f"--node {index}: no such worker node" + (f" (workers: {known})" if known else
                        " (`posdistill cluster up --nodes N` starts nodes 1..N-1; the head is node 0)"))
    n = _stop(_worker_processes(w), timeout)
    _save(state_dir, info, drop=index)
    _remove_temp_dir(w.temp_dir)
    return n


def head_down(state_dir: Path = STATE_DIR, timeout: float = 20.0) -> int:
    """Stop what ``head_up`` started: worker nodes, then the head's other processes, then its
    GCS; returns how many processes were stopped."""
    info = read_state(state_dir)
    if info is None:
        return 0
    n = sum(_stop(_worker_processes(w), timeout) for w in info.workers)
    procs = _our_processes(info)
    n += _stop([p for p in procs if not _is_gcs(p)], timeout)
    n += _stop([p for p in procs if _is_gcs(p)], timeout)
    _state_file(state_dir).unlink(missing_ok=True)
    for d in [info.temp_dir, *(w.temp_dir for w in info.workers)]:
        _remove_temp_dir(d)
    return n


def head_status(state_dir: Path = STATE_DIR) -> dict:
    info = read_state(state_dir)
    if info is None:
        return {"running": False}
    out = {"running": dashboard_alive(info.dashboard), "processes": len(_our_processes(info)), **asdict(info)}
    out["workers"] = [{**asdict(w), "running": _worker_running(w), "processes": len(_worker_processes(w))}
                      for w in info.workers]
    if out["running"]:
        try:
            out["nodes"] = ray_nodes(info.dashboard)
        except (OSError, KeyError, ValueError):  # the state API not up yet: the rest still holds
            pass
    return out
