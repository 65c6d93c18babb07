"""Job submission to a Ray cluster: idempotent by fingerprint, authenticated, followable.

A job's ``submission_id`` is ``posdistill-<stage>-<fingerprint>-<attempt>`` where the
fingerprint hashes the stage, its arguments and the resolved config: submitting the same
work twice finds the live or finished job instead of starting a duplicate, while a failed
or stopped attempt is followed by a fresh attempt number (the stages resume on their own).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from cluster.auth import client_headers, explain_auth_failure
from cluster.head import HeadInfo, running_head
from cluster.upload import staging_dir
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pack", "cache", "train", "eval", "analyze", "run")
CONFIG_ENV = "POSDISTILL_CONFIG_YAML"
LIVE = {"PENDING", "RUNNING", "SUCCEEDED"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str) -> Any:
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # packaging chatter on every submit

    try:
        return JobSubmissionClient(address, headers=client_headers())
    except Exception as err:
        raise explain_auth_failure(address, err) or UserError(
            f"cannot reach the Ray dashboard at {address}: {str(err).splitlines()[0][:300]}") from None


def _call(address: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:
        raise explain_auth_failure(address, err) or err from None


def submission_prefix(stage: str, cfg: Config, extra_args: list[str]) -> str:
    fp = fingerprint({"stage": stage, "args": extra_args, "config": cfg.resolved()}, length=12)
    return f"posdistill-{stage}-{fp}"


def _endpoint(address: str) -> tuple[str, int | None]:
    """(host, port) of a dashboard address given as a URL or as ``host:port``."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    return (parts.hostname or "").lower(), parts.port


def is_loopback(address: str) -> bool:
    host = _endpoint(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_python(address: str, head: HeadInfo | None) -> str:
    """The interpreter a job's entrypoint runs: ours when ``address`` is ``head``, the loopback
    head ``posdistill cluster up`` started (it runs under this very interpreter, which has the
    project's dependencies), else ``python`` on the cluster's PATH (a cluster image with
    posdistill installed). A loopback address alone is not enough: ``ray dashboard`` forwards a
    remote cluster to localhost:8265, and our interpreter's path means nothing there."""
    if head is not None and is_loopback(address) and is_loopback(head.dashboard) \
            and _endpoint(address)[1] == _endpoint(head.dashboard)[1]:
        return sys.executable
    return "python"


def entrypoint(stage: str, extra_args: list[str], python: str) -> str:
    return " ".join(shlex.quote(a) for a in [python, "-m", "pipeline.cli", stage, f"env:{CONFIG_ENV}", *extra_args])


def submit(stage: str, cfg: Config, address: str, extra_args: list[str] | None = None,
           python: str | None = None) -> tuple[str, bool]:
    """Submit (or find) the job; returns (submission_id, newly_submitted).

    ``python`` is the job's interpreter (default: :func:`default_python`). The job's
    ``working_dir`` is a staging copy of the allow-listed files only (``cluster.upload``)."""
    if stage not in STAGES:
        raise UserError(f"stage: '{stage}' is not one of {', '.join(STAGES)}")
    extra_args = list(extra_args or [])
    c = client(address)
    prefix = submission_prefix(stage, cfg, extra_args)
    attempts = [j for j in _call(address, c.list_jobs) if (j.submission_id or "").startswith(prefix + "-")]
    for job in attempts:
        if str(job.status.value if hasattr(job.status, "value") else job.status) in LIVE:
            return job.submission_id, False
    sid = f"{prefix}-{len(attempts) + 1}"
    command = entrypoint(stage, extra_args, python or default_python(address, running_head()))
    env_vars = {CONFIG_ENV: yaml.safe_dump(cfg.resolved(), sort_keys=False)}
    with staging_dir(PROJECT_ROOT) as upload:
        _submit_when_ready(c, address, sid, command, {"working_dir": str(upload), "env_vars": env_vars})
    return sid, True


def _submit_when_ready(c: Any, address: str, sid: str, command: str, runtime_env: dict) -> None:
    """Submit, waiting out a freshly started head, which answers 500 "No available agent"
    until its job agent is up."""
    deadline = time.monotonic() + 120
    while True:
        try:
            _call(address, c.submit_job, entrypoint=command, submission_id=sid, runtime_env=runtime_env)
            return
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def status(address: str, sid: str) -> str:
    s = _call(address, client(address).get_job_status, sid)
    return str(s.value if hasattr(s, "value") else s)


def follow(address: str, sid: str, poll: float = 2.0, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    c = client(address)
    shown = 0
    while True:
        st = status(address, sid)
        logs = _call(address, c.get_job_logs, sid)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if st in TERMINAL:
            return st
        time.sleep(poll)


def list_jobs(address: str) -> list[dict]:
    jobs = _call(address, client(address).list_jobs)
    rows = []
    for j in jobs:
        if not (j.submission_id or "").startswith("posdistill-"):
            continue
        rows.append({"submission_id": j.submission_id,
                     "status": str(j.status.value if hasattr(j.status, "value") else j.status),
                     "entrypoint": j.entrypoint, "start_time": j.start_time, "end_time": j.end_time})
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def logs(address: str, sid: str) -> str:
    return _call(address, client(address).get_job_logs, sid)


def stop(address: str, sid: str) -> bool:
    return bool(_call(address, client(address).stop_job, sid))


def default_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("POSDISTILL_ADDRESS")
    if not addr:
        from cluster.head import read_state

        info = read_state()
        if info is None:
            raise UserError("--address: no address given and no local head is running (`posdistill cluster up`)")
        addr = info.dashboard
    return addr
