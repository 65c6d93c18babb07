"""Is a shard (and a whole cache) what its plan says? Used by re-runs and ``cache verify``.

The same ``check_shard`` decides both which shards a re-run regenerates and which ones
``verify`` reports, so "verify says bad" and "re-run regenerates" never disagree. Besides the
footer, fingerprint, completion flag and window coverage it reads every page and checks its
CRC (shards are written with ``write_page_checksum``), so a flipped byte anywhere in the data
is caught. A re-run need not re-read a shard it has checked before: ``.verified.json`` records
each checked shard's (size, mtime_ns, ctime_ns, inode), and any write to the file (even one
that restores its mtime) changes its ctime. ``cache verify`` never trusts that record;
``--deep`` also decodes every target and checks it is finite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from stages.cache.manifest import read_manifest, read_plan, PLAN_FILE, MANIFEST_FILE
from stages.cache.writer import COMPLETE_KEY, FINGERPRINT_KEY, TEMP_GLOB, shard_name


VERIFIED_FILE = ".verified.json"


def stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_verified(cache_dir: Path) -> dict[str, Any]:
    try:
        memo = json.loads((Path(cache_dir) / VERIFIED_FILE).read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def write_verified(cache_dir: Path, memo: dict[str, Any]) -> None:
    """Best effort: a read-only cache is simply re-checked next time."""
    from pipeline.atomic import atomic_write_json

    try:
        atomic_write_json(Path(cache_dir) / VERIFIED_FILE, memo)
    except OSError:
        pass


def check_shard(path: Path, fingerprint: str, first_window: int, rows: int, deep: bool = False,
                verified: dict[str, Any] | None = None) -> str | None:
    """None if the shard is valid, else the reason it is not. ``verified``: the cache's record
    of shards whose pages were checked (read and updated); None reads every page."""
    if path.is_symlink():
        return "a symbolic link (shards are files of the cache directory, never links)"
    if not path.is_file():
        return "missing"
    try:
        meta = pq.read_metadata(path)
    except Exception as err:  # truncated or not Parquet: pyarrow raises several types
        return f"unreadable footer ({type(err).__name__})"
    kv = meta.metadata or {}
    if kv.get(FINGERPRINT_KEY, b"").decode() != fingerprint:
        return f"fingerprint {kv.get(FINGERPRINT_KEY, b'<none>').decode()} != {fingerprint}"
    if kv.get(COMPLETE_KEY) != b"1":
        return "no completion flag"
    if meta.num_rows != rows:
        return f"{meta.num_rows} rows, expected {rows}"
    try:
        got = pq.read_table(path, columns=["window_id"]).column("window_id").to_numpy()
    except Exception as err:
        return f"unreadable window_id column ({type(err).__name__})"
    want = np.arange(first_window, first_window + rows, dtype=np.int64)
    if not np.array_equal(got, want):
        return f"window ids {got[:3].tolist()}... do not cover [{first_window}, {first_window + rows})"
    key = stat_key(path)
    if verified is not None and verified.get(path.name) == key and not deep:
        return None
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as err:
        return f"corrupt data ({type(err).__name__}: {str(err)[:120]})"
    if deep:
        reason = _non_finite(path, table, meta)
        if reason:
            return reason
    if verified is not None:
        verified[path.name] = key
    return None


def _non_finite(path: Path, table: Any, meta: Any) -> str | None:
    from stages.cache.codec import codec_from_footer
    from stages.cache.writer import CODEC_KEY, KIND_KEY

    kv = meta.metadata or {}
    codec = codec_from_footer(kv.get(CODEC_KEY, b"plain").decode(), kv.get(KIND_KEY, b"topk").decode(), kv)
    ids = table.column("window_id").to_pylist()
    for wid, target in zip(ids, codec.decode(table)):
        bad = ~np.isfinite(np.asarray(target["logp"], dtype=np.float32))
        if bad.any():
            pos = int(np.argwhere(bad)[0][0])
            return f"non-finite teacher log-probs at window {wid}, position {pos}"
    return None


def verify_cache(cache_dir: str | Path, deep: bool = False, trust_verified: bool = False) -> list[tuple[str, str]]:
    """(shard file, reason) for every bad shard; [] for a complete, valid cache.
    ``trust_verified``: skip re-reading shards unchanged since their pages were last checked
    (the graph's reuse check); ``cache verify`` reads everything."""
    cache_dir = Path(cache_dir)
    verified = read_verified(cache_dir) if trust_verified else None
    from pipeline.errors import UserError

    try:
        if (cache_dir / MANIFEST_FILE).is_file():
            plan = read_manifest(cache_dir)
            problems: list[tuple[str, str]] = []
        elif (cache_dir / PLAN_FILE).is_file():
            plan = read_plan(cache_dir)
            problems = [(MANIFEST_FILE, "missing (the cache job has not finished)")]
        else:
            return [(str(cache_dir), f"not a teacher cache (no {MANIFEST_FILE} or {PLAN_FILE})")]
    except UserError as err:  # a damaged manifest or plan: the cache is not done, a re-run rewrites it
        return [(MANIFEST_FILE if (cache_dir / MANIFEST_FILE).is_file() else PLAN_FILE, str(err))]
    fp = plan["fingerprint"]
    planned = set()
    for s in plan["shards"]:
        name = shard_name(s["index"])
        planned.add(name)
        reason = check_shard(cache_dir / name, fp, s["first_window"], s["rows"], deep=deep, verified=verified)
        if reason:
            problems.append((name, reason))
    for stray in sorted(cache_dir.glob("shard-*.parquet")):
        if stray.name not in planned:
            problems.append((stray.name, "not in the shard plan"))
    for tmp in sorted(cache_dir.glob(TEMP_GLOB)):
        problems.append((tmp.name, "leftover temporary file"))
    if verified is not None and not problems:
        write_verified(cache_dir, verified)
    return problems

