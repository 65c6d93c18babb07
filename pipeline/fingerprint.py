"""Content fingerprints that name stage outputs.

A stage output's directory is named by the hash of exactly what changes its numbers, so a
changed teacher, tokenizer, packing or input never silently reuses a stale result, and an
unchanged one is reused instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Bump a stage's version whenever its output format or semantics change.
FORMAT_VERSION = {"pack": 1, "cache": 1, "train": 1, "bootstrap": 1}

# Files up to this size are hashed whole; larger ones (model weights, corpora) by size plus
# three sampled blocks, which catches every realistic change at a tiny cost.
_FULL_HASH_LIMIT = 64 << 20
_BLOCK = 1 << 20


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(parts: dict[str, Any], length: int = 16) -> str:
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:length]


def file_identity(path: str | Path) -> dict[str, Any]:
    """Identity of one file by content, independent of its location and mtime."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
        else:
            for offset in (0, size // 2, size - _BLOCK):
                f.seek(offset)
                h.update(f.read(_BLOCK))
    return {"name": p.name, "size": size, "sha256": h.hexdigest()[:32]}


def dir_identity(path: str | Path) -> list[dict[str, Any]]:
    """Identity of every regular file below a directory (sorted by relative path)."""
    root = Path(path)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            ident = file_identity(full)
            ident["name"] = str(full.relative_to(root))
            out.append(ident)
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
