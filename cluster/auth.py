"""Ray token authentication for clients: where the token comes from, and what a 401 means.

The token is never printed; only where it was found.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"
HOW_TO_AUTH = ("set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it "
               f"(default {DEFAULT_TOKEN_PATH}); `posdistill cluster up` prints where a local head keeps it")


def find_token() -> tuple[str, str] | None:
    """(token, where it came from), or None when no token is configured."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH)
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None


def client_headers() -> dict[str, str]:
    found = find_token()
    return {"Authorization": f"Bearer {found[0]}"} if found else {}


def explain_auth_failure(address: str, err: BaseException) -> UserError | None:
    """Turn an HTTP 401/403 from the dashboard into one actionable message."""
    text = str(err)
    markers = ("401", "403", "Unauthorized", "nauthenticated", "RAY_AUTH_TOKEN", "auth_token")
    if any(m in text for m in markers):
        found = find_token()
        where = f"the token from {found[1]} was refused" if found else "no token was found"
        return UserError(f"Ray at {address} requires token authentication and {where}: {HOW_TO_AUTH}")
    return None
