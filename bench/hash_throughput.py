"""Whole-file hashing throughput of the input fingerprints (pipeline.fingerprint), and the memo.

Every input file (teacher weights, corpora) is hashed whole, so the hash's speed is what a
changed or new input costs before a stage starts. One random temp file of ``--mib`` MiB is read
in the fingerprint's 8 MiB readinto blocks and hashed by hashlib.sha256 (the chosen hash) and,
side by side, by the faster non-stdlib candidates that are installed (xxhash xxh3_128, blake3):
from the page cache (the hash's own speed) and with the file dropped from the page cache first
(posix_fadvise DONTNEED after fsync: disk + hash; a no-op on tmpfs, reported as such). Then
``file_identity`` itself: the first call (memo miss), a second call (in-process memo hit) and a
call with the in-process memo forgotten (as a new process: hit in the memo file).

Run: python bench/hash_throughput.py [--mib 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import machine, write_result

CHUNK = 8 << 20
GOAL_GB_PER_S = 0.55  # an 8B teacher's 16 GB of weights hashed in under 30 s when it changes


def candidates() -> dict[str, Callable[[], Any]]:
    """sha256 (the chosen hash, no dependency) and whichever faster hashes are installed."""
    out: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256}
    for module, name, attr in (("xxhash", "xxh3_128", "xxh3_128"), ("blake3", "blake3", "blake3")):
        try:
            out[name] = getattr(importlib.import_module(module), attr)
        except ImportError:
            pass
    return out


def write_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(0, mib << 20, CHUNK):
            f.write(os.urandom(CHUNK))
        f.flush()
        os.fsync(f.fileno())


def drop_from_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's cached pages; True when that is possible at all."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def hash_file(path: Path, new: Callable[[], Any]) -> float:
    """Seconds to read the whole file in 8 MiB readinto blocks and hash it."""
    buf = memoryview(bytearray(CHUNK))
    h = new()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    h.digest()
    return time.perf_counter() - t0


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process): on a shared machine other work
    stretches the wall time; the CPU time is what hashing itself costs."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024, help="size of the temp file (MiB)")
    ap.add_argument("--dir", default=None, help="where the temp file goes (default: the temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg")  # a private memo file, not ~/.cache
        import pipeline.fingerprint as fp

        path = tmp / "weights.bin"
        write_file(path, args.mib)
        nbytes = path.stat().st_size
        time.sleep(fp._RACY_NS / 1e9 + 0.1)  # older than the racy window, so it may be memoised
        cached, uncached, droppable = {}, {}, False
        for name, new in candidates().items():
            hash_file(path, new)  # into the page cache
            cached[name] = gbps(nbytes, min(hash_file(path, new) for _ in range(2)))
            droppable = drop_from_page_cache(path)
            uncached[name] = gbps(nbytes, hash_file(path, new))
            print(f"{name:9s} page cached {cached[name]:6.2f} GB/s   dropped first {uncached[name]:6.2f} GB/s",
                  flush=True)
        hash_file(path, hashlib.sha256)
        calls = fp.hash_calls
        ident, first, first_cpu = timed(lambda: fp.file_identity(path))
        assert fp.hash_calls == calls + 1
        _, memo_hit, _ = timed(lambda: fp.file_identity(path))
        fp._memo_file = None  # forget the in-process memo, as a new process would
        _, disk_hit, _ = timed(lambda: fp.file_identity(path))
        assert fp.hash_calls == calls + 1, "memo missed"
        print(f"file_identity first call {gbps(nbytes, first):.2f} GB/s ({first:.3f} s); memo hit "
              f"{memo_hit * 1e3:.3f} ms in process, {disk_hit * 1e3:.3f} ms from the memo file", flush=True)
    write_result(
        "hash_throughput", metric="file_identity_cold_gb_per_cpu_s", value=gbps(nbytes, first_cpu), goal=GOAL_GB_PER_S,
        direction=">=", unit="GB per CPU second", details={
            "definition": "bytes over the CPU seconds of the first file_identity call (memo miss, page cached) on "
                          f"a random file of {args.mib} MiB: whole-file hashlib.sha256 in 8 MiB readinto blocks; "
                          "goal: 16 GB in 30 s",
            "chosen_hash": fp._ALGO,
            "hash_gb_per_s_page_cached": cached,
            "hash_gb_per_s_dropped_from_page_cache": uncached if droppable else None,
            "file_identity": {"cold_s": round(first, 4), "cold_cpu_s": round(first_cpu, 4),
                              "cold_gb_per_wall_s": gbps(nbytes, first),
                              "memo_hit_in_process_ms": round(memo_hit * 1e3, 3),
                              "memo_hit_from_file_ms": round(disk_hit * 1e3, 3)},
            "mib": args.mib, "size": ident["size"]},
        machine_info=machine(openssl=__import__("ssl").OPENSSL_VERSION, cpu_sha_ni=_sha_ni()))


def _sha_ni() -> bool | None:
    """Whether the CPU has SHA extensions (what makes sha256 fast); None where unknown."""
    try:
        return " sha_ni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


if __name__ == "__main__":
    main()
