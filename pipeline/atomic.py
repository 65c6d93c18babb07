"""Write-then-rename helpers: a reader never sees a half-written file or directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:  # a full disk: no temp file left behind either
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


OWNER_FILE = "_posdistill.json"  # in every directory atomic_dir writes: {"kind": ...}


def owned_kind(path: str | Path) -> str | None:
    """The kind of output posdistill wrote at ``path`` (its owner file), or None."""
    try:
        kind = json.loads((Path(path) / OWNER_FILE).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_output_dir(final: str | Path, kind: str, keep: tuple[str | Path, ...] = ()) -> Path:
    """The absolute path of an output directory that may be (re)written: absent, empty, or an
    earlier output of the same ``kind``. Anything else — the user's files, a run or cache
    directory, the current directory, a directory holding one of ``keep`` (what the command
    reads) — is refused with one line before any work, so nothing is ever deleted that the
    project did not write."""
    from pipeline.errors import UserError

    path = Path(os.path.abspath(final))
    for src in keep:
        s = Path(os.path.abspath(src))
        if path == s or path in s.parents:
            raise UserError(f"{final}: would replace {src}, which this command reads; choose another output directory")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{final}: exists and is not a directory posdistill wrote; choose another output directory")
    if path.is_dir() and any(path.iterdir()) and owned_kind(path) != kind:
        what = owned_kind(path)
        raise UserError(f"{final}: exists and holds " + (f"a posdistill {what!r} output, not {kind!r}"
                        if what else f"files posdistill did not write (no {OWNER_FILE})")
                        + "; choose another output directory or remove it yourself")
    return path


@contextlib.contextmanager
def atomic_dir(final: str | Path, kind: str, keep: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final``, which must be
    absent, empty, or an earlier ``kind`` output (``check_output_dir``). Only directories this
    function created are ever removed."""
    final = check_output_dir(final, kind, keep)
    created = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the output private
    try:
        (tmp / OWNER_FILE).write_text(json.dumps({"kind": kind}) + "\n")
        yield tmp
        check_output_dir(final, kind, keep)  # nobody put files there meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # innermost first: nothing of a failed attempt stays behind
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent)) if final.is_dir() else None
    if old is not None:
        os.replace(final, old)  # an empty directory or our own earlier output, onto our empty one
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
