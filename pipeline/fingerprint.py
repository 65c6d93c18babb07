"""Content fingerprints that name stage outputs.

A stage output's directory is named by the hash of exactly what changes its numbers, so a
changed teacher, tokenizer, packing or input never silently reuses a stale result, and an
unchanged one is reused instead of recomputed.

Every input file is hashed whole: sampling blocks of big files (weights, corpora) let an edit
between the samples keep its fingerprint and reuse a stale pack or cache. To keep re-runs cheap,
digests are memoised by the file's (resolved path, device, inode, size, mtime_ns, ctime_ns), in
this process and across processes in ``$XDG_CACHE_HOME/posdistill/hash-memo.json``. ctime is
in the key because user code cannot set it: an in-place edit followed by ``os.utime`` restoring
the mtime still changes the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Bump a stage's version whenever its output format or semantics change.
FORMAT_VERSION = {"pack": 1, "cache": 1, "train": 1, "bootstrap": 2}

log = logging.getLogger(__name__)

# hashlib.sha256 hashes files at ~1.4 GB/s (SHA-NI; bench/results/hash_throughput.json), above
# the 1 GB/s bar and close to what disks deliver, so a faster hash (xxhash, blake3) is not worth
# a new dependency; and small files keep the digests they had before.
_ALGO = "sha256"
_DIGEST_HEX = 32
_READ_BLOCK = 8 << 20
# Files smaller than this are rehashed every time: it costs less than a millisecond, and
# memoising them would only grow the memo file.
_MEMO_MIN_SIZE = 1 << 20
# A file whose ctime/mtime is this close to "now" is hashed but not memoised: timestamps come
# from a coarse clock (a kernel tick; seconds on some filesystems), so a write landing in the
# same tick right after the hash could leave the key unchanged (git's "racy clean" problem).
_RACY_NS = 2_000_000_000
_MEMO_VERSION = 1
_MEMO_MAX_ENTRIES = 4096

# Files actually read and hashed by this process (memo misses); tests and the bench read it.
hash_calls = 0

_lock = threading.Lock()
_local = threading.local()
_memo: dict[str, str] = {}  # key -> digest, this process (seeded from the memo file)
_memo_file: Path | None = None  # the file _memo was seeded from
_dirty: dict[str, str] = {}  # digests computed here and not yet written to the memo file


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(parts: dict[str, Any], length: int = 16) -> str:
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:length]


def memo_path() -> Path:
    """Where the cross-process memo lives (read at each use, so XDG_CACHE_HOME set later counts)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "posdistill" / "hash-memo.json"


def _memo_key(resolved: Path, st: os.stat_result) -> str:
    """Everything a write changes: an edit keeps neither ctime nor (for a replace) the inode."""
    return json.dumps([str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])


def _read_memo_file(path: Path) -> dict[str, str]:
    """The persisted memo, or {} when it is missing, unreadable, corrupt or for another hash:
    the memo only saves time, so nothing wrong with it may fail or mislead a run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _MEMO_VERSION or data.get("algo") != _ALGO:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items()
            if isinstance(k, str) and isinstance(v, str) and len(v) == _DIGEST_HEX}


def _write_memo_file(path: Path, entries: dict[str, str]) -> None:
    """Atomically replace the memo file (temp file + os.replace), so a reader or a crash never
    sees half a file; any OSError (read-only home, full disk) is logged and ignored."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hash-memo.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _MEMO_VERSION, "algo": _ALGO, "entries": entries}, f, separators=(",", ":"))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.debug("hash memo not written to %s: %s", path, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _seed_memo() -> None:
    """Load the memo file once per process (and again if XDG_CACHE_HOME now points elsewhere)."""
    global _memo_file, _memo
    path = memo_path()
    if _memo_file != path:
        _memo, _memo_file = _read_memo_file(path), path
        _dirty.clear()


def _save_memo() -> None:
    """Merge this process's new digests into the memo file; other processes may have added
    theirs since it was read. Oldest entries go first once the file holds too many."""
    with _lock:
        if not _dirty:
            return
        path = memo_path()
        entries = _read_memo_file(path)
        for key, digest in _dirty.items():
            entries.pop(key, None)
            entries[key] = digest  # re-insert: dict order is age order
        _dirty.clear()
    while len(entries) > _MEMO_MAX_ENTRIES:
        del entries[next(iter(entries))]
    _write_memo_file(path, entries)


def _buffer() -> memoryview:
    """One read buffer per thread, reused across files (no 8 MiB allocation per file)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(_READ_BLOCK))
    return buf


def _hash_stream(f: Any) -> str:
    """Hash an open binary file whole, in large blocks read straight into the reused buffer."""
    global hash_calls
    hash_calls += 1
    h = hashlib.new(_ALGO)
    buf = _buffer()
    while n := f.readinto(buf):
        h.update(buf[:n])
    return h.hexdigest()[:_DIGEST_HEX]


def _digest(resolved: Path) -> tuple[str, int]:
    """(digest, size) of one file, from the memo when its key still matches. The key is taken
    from the open descriptor before and after reading; a file that changed while being read,
    or too recently to trust its timestamps, is not memoised."""
    with open(resolved, "rb") as f:
        before = os.fstat(f.fileno())
        key = _memo_key(resolved, before)
        memoise = before.st_size >= _MEMO_MIN_SIZE
        if memoise:
            with _lock:
                _seed_memo()
                hit = _memo.get(key)
            if hit is not None:
                return hit, before.st_size
        started = time.time_ns()
        digest = _hash_stream(f)
        after = os.fstat(f.fileno())
    settled = started - max(before.st_mtime_ns, before.st_ctime_ns) >= _RACY_NS
    if memoise and settled and _memo_key(resolved, after) == key:
        with _lock:
            _memo[key] = _dirty[key] = digest
    return digest, before.st_size


def _identity(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    digest, size = _digest(p.resolve())
    return {"name": p.name, "size": size, "sha256": digest}


def file_identity(path: str | Path) -> dict[str, Any]:
    """Identity of one file by its whole content, independent of its location and mtime."""
    ident = _identity(path)
    _save_memo()
    return ident


def dir_identity(path: str | Path) -> list[dict[str, Any]]:
    """Identity of every regular file below a directory (sorted by relative path); the memo
    file is written once for the whole directory, not once per file."""
    root = Path(path)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            ident = _identity(full)
            ident["name"] = str(full.relative_to(root))
            out.append(ident)
    _save_memo()
    return out


def differences(have: Any, want: Any, path: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Every leaf where two identities differ, as ``path (cache: old, run: new)``; keys in
    ``skip`` are ignored at any depth (settings that do not change the numbers)."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(have) | set(want)):
            if key not in skip:
                out += differences(have.get(key), want.get(key), f"{path}.{key}" if path else str(key), skip)
        return out
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        return [d for i, (x, y) in enumerate(zip(have, want)) for d in differences(x, y, f"{path}[{i}]", skip)]
    if have == want:
        return []
    short = lambda v: (repr(v) if len(repr(v)) <= 40 else f"<{type(v).__name__}, differs>")  # noqa: E731
    return [f"{path} (cache: {short(have)}, run: {short(want)})"]
