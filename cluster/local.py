"""Start an embedded Ray on loopback, or attach to an existing cluster.

Ray 2.60 turns token authentication on for a fresh local instance (the token lands in
``~/.ray/auth_token``); we keep that default. On Linux Ray replaces 127.0.0.1 by the
machine's routable address even when asked for loopback, so for the embedded instance we
switch off its "cluster" address resolution (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, set
for the processes it spawns and patched in this one): every Ray process then binds to
127.0.0.1 and nothing listens on an outside interface.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_PROJECT_PACKAGES = ("pipeline", "stages", "cluster")


@contextlib.contextmanager
def _loopback() -> Iterator[None]:
    """Keep Ray on 127.0.0.1 for what starts inside the block (see the module docstring)."""
    from ray._private import ray_constants

    saved_env, saved_const = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env


def start_local(num_cpus: int | None = None, num_gpus: int | None = None, **kwargs: Any) -> None:
    """A fresh single-node Ray bound to 127.0.0.1 (dashboard off, token auth as Ray's default)."""
    import ray

    from cluster.auth import DEFAULT_TOKEN_PATH, private_dir, tighten_token_file

    private_dir(DEFAULT_TOKEN_PATH.parent)
    with _loopback():
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=True,
                 logging_level="WARNING", configure_logging=True, **kwargs)
    tighten_token_file(DEFAULT_TOKEN_PATH)  # Ray writes it 0644
    _start_reaper()


# Waits for EOF on stdin (the driver exited, however it died), then stops every process of the
# embedded session: a SIGKILLed driver runs no cleanup, and Ray's agents would outlive it.
_REAPER = """
import os, select, sys, time
import psutil
driver, session = int(sys.argv[1]), sys.argv[2]
seen = {}
while True:  # every second, remember the driver's descendants (Ray renames its agents' titles)
    try:
        for p in psutil.Process(driver).children(recursive=True):
            if p.pid != os.getpid():
                seen[p.pid] = p
    except psutil.Error:
        pass
    if select.select([sys.stdin], [], [], 1.0)[0] and not os.read(sys.stdin.fileno(), 1):
        break
time.sleep(2)  # a clean ray.shutdown() finishes on its own
for p in psutil.process_iter(["cmdline"]):
    try:
        if any(session in a for a in (p.info["cmdline"] or [])):
            seen[p.pid] = p
    except psutil.Error:
        pass
procs = [p for p in seen.values() if p.pid != os.getpid()]
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(procs, timeout=3)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""
_reapers: list[Any] = []


def _start_reaper() -> None:
    import subprocess
    import sys

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    _reapers.append(subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid()), session], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))


def _release_reapers() -> None:
    """After ``ray.shutdown()``: let the reapers sweep what the shutdown left."""
    while _reapers:
        r = _reapers.pop()
        if r.stdin is not None:
            r.stdin.close()


def project_runtime_env() -> dict[str, Any]:
    """Ship the project's packages to a remote cluster's workers (a local Ray imports them
    from this installation)."""
    root = Path(__file__).resolve().parent.parent
    return {"py_modules": [str(root / p) for p in _PROJECT_PACKAGES]}


def connect(address: str) -> None:
    """Attach to a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``). A
    token-protected cluster needs ``RAY_AUTH_MODE=token`` and its token in the environment."""
    import ray

    from pipeline.errors import UserError

    if address.startswith(("http://", "https://")):
        raise UserError(f"--address: {address} is a dashboard (job submission) address; run the stage there with "
                        "`posdistill submit cache CONFIG`, or give the cluster's GCS address (host:6379) or "
                        "ray://host:10001 to drive it from here")
    check_address(address)
    # Inside a submitted Ray job ("auto") the job's runtime_env already carries the project.
    kwargs = {} if address == "auto" else {"runtime_env": project_runtime_env()}
    # A head on loopback (`posdistill cluster up`) is only reachable from a loopback driver.
    on_loopback = address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost")
    try:
        with _loopback() if on_loopback else contextlib.nullcontext():
            ray.init(address=address, logging_level="WARNING", **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            from cluster.auth import HOW_TO_AUTH

            hint = f"; if the cluster uses token authentication (Ray's default), export RAY_AUTH_MODE=token and {HOW_TO_AUTH}"
        raise UserError(f"cannot connect to Ray at '{address}': {str(err).splitlines()[0][:300]}{hint}") from None


def check_address(address: str | None) -> None:
    """A GCS address (``host:port``) answers and takes our token, else one line saying which
    (the embedded Ray, "auto" inside a job, ``ray://`` client addresses and TLS clusters are
    not asked)."""
    from cluster.auth import check_gcs

    if address in (None, "", "local", "auto") or "://" in address:
        return
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):  # the plain-text probe cannot speak TLS
        return
    if check_gcs(address) and os.environ.get("RAY_AUTH_MODE") != "token":
        # The cluster takes our token; ray.init sends it only in token mode, read from the
        # environment into Ray's config (which this refreshes) when Ray was imported.
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


def resolve_address(explicit: str | None, configured: str | None = None) -> str | None:
    """Which Ray to use: an explicit ``--address``; else the cluster this process runs in (a
    submitted job has ``RAY_ADDRESS``); else ``cluster.address`` unless it is "local" or a
    dashboard URL (those mean "start an embedded Ray" and "submit jobs there"); else None,
    which starts an embedded Ray on 127.0.0.1."""
    if explicit:
        return explicit
    if os.environ.get("RAY_ADDRESS"):
        return "auto"
    if configured and configured != "local" and not configured.startswith(("http://", "https://")):
        return configured
    return None


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Use the Ray this process is already connected to, else start (address None or "local")
    or attach to one for the duration of the block. Yields whether Ray runs embedded here."""
    import ray

    from pipeline.errors import raise_if_stopped

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address.startswith("127.0.0.1")
        return
    local = address in (None, "", "local")
    with _keep_signals():
        if local:
            start_local()
        else:
            connect(address)
    try:
        raise_if_stopped()  # one that arrived while Ray started
        yield local
    finally:
        ray.shutdown()
        _release_reapers()


@contextlib.contextmanager
def _keep_signals() -> Iterator[None]:
    """``ray.init`` installs its own handlers (a native SIGTERM handler that aborts the process,
    exit -6, skipping every ``finally``; its driver code sets SIGTERM's and may set SIGINT's):
    put back this process's own for both signals (the CLI's unwind and shut the embedded Ray
    down); ``signal.signal`` re-arms them at the C level too."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
