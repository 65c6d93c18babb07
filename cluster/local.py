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


def start_local(num_cpus: int | None = None, num_gpus: int | None = None, **kwargs: Any) -> None:
    """A fresh single-node Ray bound to 127.0.0.1 (dashboard off, token auth as Ray's default)."""
    import ray
    from ray._private import ray_constants

    saved_env, saved_const = os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=True,
                 logging_level="WARNING", configure_logging=True, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env


def project_runtime_env() -> dict[str, Any]:
    """Ship the project's packages to a remote cluster's workers (a local Ray imports them
    from this installation)."""
    root = Path(__file__).resolve().parent.parent
    return {"py_modules": [str(root / p) for p in _PROJECT_PACKAGES]}


def connect(address: str) -> None:
    """Attach to a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``). A
    token-protected cluster needs ``RAY_AUTH_MODE=token`` and its token in the environment."""
    import ray

    try:
        ray.init(address=address, runtime_env=project_runtime_env(), logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as err:
        from pipeline.errors import UserError

        raise UserError(f"cluster.address: cannot connect to Ray at '{address}': {str(err).splitlines()[0][:300]}") from None


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Use the Ray this process is already connected to, else start/attach one for the
    duration of the block. Yields whether the cluster is the embedded local one."""
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address.startswith("127.0.0.1")
        return
    local = address in (None, "", "local")
    if local:
        start_local()
    else:
        connect(address)
    try:
        yield local
    finally:
        ray.shutdown()
