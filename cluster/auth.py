"""Ray token authentication for clients: where the token comes from, and what a 401 means.

The token is never printed; only where it was found. ``ray start`` writes the token file
mode 0644 (readable by every local user, who could then submit jobs as us): the file
posdistill manages (``~/.ray/auth_token``) is tightened to 0600 wherever posdistill creates or
reads it, and any other token file readable by group or others gets a one-line warning.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from pipeline.errors import UserError

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
HOW_TO_AUTH = ("set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it "
               f"(default {DEFAULT_TOKEN_PATH}); `posdistill cluster up` prints where a local head keeps it")


_warned: set[str] = set()


def private_dir(path: Path) -> bool:
    """Create ``path`` mode 0700 when missing (so a token written into it is never readable by
    others, not even before it is tightened); returns whether it was created. An existing
    directory is the user's and keeps its mode."""
    if path.exists():
        return False
    path.mkdir(parents=True, mode=0o700)
    path.chmod(0o700)  # mkdir's mode is masked by the umask
    return True


def tighten_token_file(path: Path) -> bool:
    """Make a token file we own mode 0600; returns whether its mode changed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.getuid():
        return False
    path.chmod(0o600)
    return True


def ensure_token_file(path: Path = DEFAULT_TOKEN_PATH) -> bool:
    """Create Ray's token file, mode 0600 from its first byte, when no token is configured
    (``ray start`` under ``RAY_AUTH_MODE=token`` refuses to create one); returns whether it did.
    An existing file (another Ray's, or one a concurrent ``ray.init`` just wrote) is kept."""
    if find_token() is not None:
        return False
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
    return True


def _warn_if_readable(path: Path) -> None:
    """One stderr line per file and process when a token file is readable by group/others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077 and str(path) not in _warned:
        _warned.add(str(path))
        print(f"warning: Ray token file {path} is readable by group/others (mode {mode:04o}); "
              f"run `chmod 600 {path}`", file=sys.stderr)


def find_token() -> tuple[str, str] | None:
    """(token, where it came from), or None when no token is configured."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH)
    if path == DEFAULT_TOKEN_PATH:
        tighten_token_file(path)  # ours (ray start made it 0644); a user-given path only warns
    _warn_if_readable(path)
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None


def client_headers() -> dict[str, str]:
    found = find_token()
    return {"Authorization": f"Bearer {found[0]}"} if found else {}


def refused(address: str) -> UserError:
    """The one line for a cluster that turned our token away (or wanted one we lack): where
    the token was read from, never the token."""
    found = find_token()
    where = f"the token from {found[1]} was refused" if found else "no token was found"
    return UserError(f"Ray at {address} requires token authentication and {where}: {HOW_TO_AUTH}")


def explain_auth_failure(address: str, err: BaseException) -> UserError | None:
    """Turn an HTTP 401/403 from the dashboard into one actionable message."""
    text = str(err)
    markers = ("401", "403", "Unauthorized", "nauthenticated", "RAY_AUTH_TOKEN", "auth_token")
    if any(m in text for m in markers):
        return refused(address)
    return None


def check_gcs(address: str, timeout: float = 10.0) -> bool:
    """Ask the GCS at ``host:port`` one question (with our token if it wants one) before
    ``ray.init`` attaches: a refused token or an address where nothing answers is one line
    here, where ``ray.init`` would log a retry every second for 20 s and then name neither.
    Returns whether the cluster uses token authentication."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    def ask(metadata: list[tuple[str, str]]) -> bool:
        with grpc.insecure_channel(address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=timeout)
                return True
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return False
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise UserError(f"Ray at {address}: nothing answers there ({err.code().name.lower()}); is it up "
                                    "(`posdistill cluster status`), and is this its GCS address (host:6379)?") from None
                raise

    if ask([]):
        return False
    found = find_token()
    if found is None or not ask([("authorization", f"Bearer {found[0]}")]):
        raise refused(address)
    return True
