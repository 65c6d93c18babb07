"""The cache directory's two JSON files.

``plan.json`` (written first): the fixed shard plan — which windows each shard holds — so a
re-run, ``cache verify`` and the reader agree on what a complete cache is.
``manifest.json`` (written last, atomically): the plan plus per-shard bytes, totals, the
fingerprint and its identity. Its presence means every planned shard was valid when written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json
from pipeline.errors import UserError
from pipeline.paths import inside

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"


def shard_plan(num_windows: int, windows_per_shard: int) -> list[dict[str, int]]:
    """Shard i holds windows [i * per_shard, min((i + 1) * per_shard, num_windows))."""
    return [{"index": i, "first_window": start, "rows": min(windows_per_shard, num_windows - start)}
            for i, start in enumerate(range(0, num_windows, windows_per_shard))]


def write_plan(cache_dir: Path, plan: dict[str, Any]) -> None:
    atomic_write_json(cache_dir / PLAN_FILE, plan)


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(cache_dir / MANIFEST_FILE, manifest)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


# What a reader relies on, by type: a manifest (or plan) missing any of these was not written
# by this code (or was damaged), and is refused by name rather than failing with a KeyError.
_PLAN_KEYS = {"fingerprint": str, "shards": list}
_MANIFEST_KEYS = {**_PLAN_KEYS, "format": int, "identity": dict, "kind": str, "codec": str, "window_len": int,
                  "vocab": int, "windows": int, "tokens": int}
_SHARD_KEYS = {"index": int, "first_window": int, "rows": int}


def _validate(path: Path, doc: Any, keys: dict[str, type], shard_keys: dict[str, type]) -> dict[str, Any]:
    def bad(what: str) -> UserError:
        return UserError(f"{path}: not a valid {path.stem} ({what}); delete it and re-run `posdistill cache`")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    for key, kind in keys.items():
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            raise bad(f"'{key}' is {'missing' if key not in doc else type(doc[key]).__name__}")
    for i, shard in enumerate(doc["shards"]):
        for key, kind in shard_keys.items():
            if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
                raise bad(f"shards[{i}].{key} is missing or not {kind.__name__}")
    return doc


def read_plan(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / PLAN_FILE
    return _validate(path, _read(path), _PLAN_KEYS, _SHARD_KEYS)


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        hint = " (the cache job has not finished; re-run `posdistill cache`)" if (Path(cache_dir) / PLAN_FILE).is_file() else ""
        raise UserError(f"{cache_dir}: not a complete teacher cache: no {MANIFEST_FILE}{hint}")
    doc = _validate(path, _read(path), _MANIFEST_KEYS, {**_SHARD_KEYS, "file": str})
    from stages.cache.writer import shard_name

    for i, shard in enumerate(doc["shards"]):  # readers open these: nothing outside the cache
        if shard["file"] != shard_name(shard["index"]):
            raise UserError(f"{path}: shards[{i}].file is '{shard['file']}', not '{shard_name(shard['index'])}' "
                            "(shards are files of the cache directory); delete it and re-run `posdistill cache`")
        inside(cache_dir, shard["file"], f"{path}: shards[{i}].file")
    return doc

