"""Stale JIT-build locks: fail with the file to delete instead of waiting on it forever.

DeepSpeed JIT-builds C++ ops (on CPU, its shared-memory communication op, when each rank
initialises its backend) under torch's extensions directory, guarded by a bare ``lock`` file
(``torch.utils.file_baton.FileBaton``). A build killed mid-way leaves the file, and every
later run's ranks then spin on it forever without a word. Before ranks start, a lock older
than ``min_age_s`` with no live process working in its build directory (ninja and the
compiler run there) is reported by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.errors import UserError


def extensions_root() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _busy_dirs() -> set[Path]:
    """Working directories of this user's live processes."""
    import psutil

    dirs = set()
    for p in psutil.process_iter(["cwd"]):
        cwd = p.info.get("cwd")
        if cwd:
            dirs.add(Path(cwd))
    return dirs


def stale_locks(root: Path | None = None, min_age_s: float = 60.0) -> list[Path]:
    root = extensions_root() if root is None else root
    # The build dir is <root>/<op> (TORCH_EXTENSIONS_DIR) or <root>/<py..._cpu>/<op> (default).
    locks = [p for p in [*root.glob("*/lock"), *root.glob("*/*/lock")] if p.is_file()]
    now = time.time()
    old = [p for p in locks if now - p.stat().st_mtime > min_age_s]
    if not old:
        return []
    busy = _busy_dirs()
    return [p for p in old if not any(d == p.parent or p.parent in d.parents for d in busy)]


def check_jit_locks(root: Path | None = None) -> None:
    stale = stale_locks(root)
    if stale:
        raise UserError(f"{stale[0]}: a JIT build lock left by a killed build (no process is building there); "
                        f"training would wait on it forever. Delete it: rm {' '.join(map(str, stale))}")
