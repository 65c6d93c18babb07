"""``posdistill cache info``: what a cache holds and what it costs on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.cache.manifest import read_manifest


def cache_summary(cache_dir: str | Path) -> dict[str, Any]:
    m = read_manifest(cache_dir)
    return {
        "dir": str(cache_dir), "fingerprint": m["fingerprint"], "teacher": m["teacher"],
        "windows": m["windows"], "window_len": m["window_len"], "mode": m["mode"], "tokens": m["tokens"],
        "kind": m["kind"], "k": m["k"], "samples": m["samples"], "entries_per_position": m["width"],
        "temperature": m["temperature"], "codec": m["codec"], "shards": len(m["shards"]), "bytes": m["bytes"],
        "bytes_per_token": m["bytes_per_token"], "bytes_per_entry": m["bytes_per_entry"],
    }


def format_summary(s: dict[str, Any]) -> str:
    what = f"top-{s['k']}" if s["kind"] == "topk" else f"sampled ({s['samples']} draws/position)"
    return "\n".join([
        f"cache     {s['dir']}",
        f"teacher   {s['teacher']}",
        f"windows   {s['windows']} x {s['window_len']} tokens ({s['mode']}) = {s['tokens']} tokens in {s['shards']} shards",
        f"targets   {what}, temperature {s['temperature']}, codec {s['codec']}",
        f"size      {s['bytes'] / 2**20:.2f} MiB: {s['bytes_per_token']:.2f} B/token, "
        f"{s['bytes_per_entry']:.3f} B/entry",
        f"fingerprint {s['fingerprint']}",
    ])
