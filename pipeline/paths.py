"""Paths read from files or built from config names stay inside their root.

A manifest, a ``latest`` file or a config name is input like any other: an absolute path, a
``..`` or a symbolic link in it must not make the program read, write or delete outside the
directory it belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError


def inside(root: str | Path, rel: str, what: str) -> Path:
    """``root / rel`` if ``rel`` is a relative path whose resolved target (links followed) lies
    inside ``root``; otherwise one line naming ``what`` (the file or key it came from)."""
    if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise UserError(f"{what}: '{rel}' is not a path inside {root} (absolute paths and '..' are refused)")
    base = Path(root).resolve()
    path = Path(root) / rel
    target = path.resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{what}: '{rel}' leads outside {root} (to {target})")
    return path
