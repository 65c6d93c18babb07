"""Is a shard (and a whole cache) what its plan says? Used by re-runs and ``cache verify``.

The same ``check_shard`` decides both which shards a re-run regenerates and which ones
``verify`` reports, so "verify says bad" and "re-run regenerates" never disagree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from stages.cache.manifest import read_manifest, read_plan, PLAN_FILE, MANIFEST_FILE
from stages.cache.writer import COMPLETE_KEY, FINGERPRINT_KEY, TEMP_GLOB, shard_name


def check_shard(path: Path, fingerprint: str, first_window: int, rows: int, deep: bool = False) -> str | None:
    """None if the shard is valid, else the reason it is not."""
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
    if deep:
        try:
            pq.read_table(path, page_checksum_verification=True)
        except Exception as err:
            return f"corrupt data ({type(err).__name__}: {str(err)[:120]})"
    return None


def verify_cache(cache_dir: str | Path, deep: bool = False) -> list[tuple[str, str]]:
    """(shard file, reason) for every bad shard; [] for a complete, valid cache."""
    cache_dir = Path(cache_dir)
    if (cache_dir / MANIFEST_FILE).is_file():
        plan = read_manifest(cache_dir)
        problems: list[tuple[str, str]] = []
    elif (cache_dir / PLAN_FILE).is_file():
        plan = read_plan(cache_dir)
        problems = [(MANIFEST_FILE, "missing (the cache job has not finished)")]
    else:
        return [(str(cache_dir), f"not a teacher cache (no {MANIFEST_FILE} or {PLAN_FILE})")]
    fp = plan["fingerprint"]
    planned = set()
    for s in plan["shards"]:
        name = shard_name(s["index"])
        planned.add(name)
        reason = check_shard(cache_dir / name, fp, s["first_window"], s["rows"], deep=deep)
        if reason:
            problems.append((name, reason))
    for stray in sorted(cache_dir.glob("shard-*.parquet")):
        if stray.name not in planned:
            problems.append((stray.name, "not in the shard plan"))
    for tmp in sorted(cache_dir.glob(TEMP_GLOB)):
        problems.append((tmp.name, "leftover temporary file"))
    return problems

