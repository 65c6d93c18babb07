"""Cache stage: the teacher runs once over the packed windows; its sparse targets go to shards.

The work is a fixed shard plan (shard i = windows [i*W, (i+1)*W)). ``CacheWorker.run_shard``
is the one per-shard routine every executor calls (Ray actors in ``cluster.executor``, or
the in-process ``LocalExecutor`` for debugging); it knows nothing about Ray. ``run_cache``
is the driver: given the cache spec, the packed windows and the output directory, it skips
shards that are already valid, hands the rest to the executor it is given (``cluster/``
owns them) and writes ``manifest.json`` last.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from pipeline.atomic import atomic_write_json
from pipeline.config import CacheConfig, TeacherConfig
from pipeline.errors import UserError, raise_if_stopped, write_failure
from pipeline.fingerprint import FORMAT_VERSION, fingerprint
from pipeline.locks import exclusive
from pipeline.progress import Progress, human
from stages.cache.codec import make_codec
from stages.cache.manifest import (CONFIG_FILE, MANIFEST_FILE, PLAN_FILE, shard_plan,
                                   write_manifest, write_plan)
from stages.cache.verify import check_shard, read_verified, stat_key, verify_cache, write_verified
from stages.cache.writer import TEMP_GLOB, CacheWriter, shard_name
from stages.model_config import check_context, teacher_vocab
from stages.specs import CacheSpec, spec_to_dict
from stages.windows import PackedWindows

# ----------------------------------------------------------------------------- the job


@dataclass
class CacheJob:
    """Everything a worker needs, as plain data (it travels to Ray actors)."""

    cache_dir: str
    pack_dir: str
    pack_files: list[tuple[str, int, int]]  # (file name, first window id, rows)
    fingerprint: str
    teacher: dict[str, Any]
    cache: dict[str, Any]
    mode: str
    window_len: int
    seed: int
    vocab: int
    shards: list[dict[str, int]]

    @property
    def teacher_cfg(self) -> TeacherConfig:
        return TeacherConfig.model_validate(self.teacher)

    @property
    def cache_cfg(self) -> CacheConfig:
        return CacheConfig.model_validate(self.cache)

    def width(self) -> int:
        c = self.cache_cfg
        return min(c.k if c.kind == "topk" else c.samples, self.vocab)


_AHEAD = 2  # batches of teacher hidden states computed ahead of the top-k selection
SHARDS_IN_FLIGHT = 2  # per worker: one computing its forwards, one finishing its tail


class CacheWorker:
    """Holds one teacher replica; ``run_shard`` computes and publishes one shard."""

    def __init__(self, job: CacheJob, device: str = "cpu", threads: int | None = None):
        import torch

        from stages.teacher import TeacherScorer, load_teacher

        if threads:
            torch.set_num_threads(threads)
        self.job = job
        self.device = device
        c = job.cache_cfg
        t = job.teacher_cfg
        self.model = load_teacher(t, device)
        self.scorer = TeacherScorer(self.model, kind=c.kind, k=c.k, samples=c.samples, temperature=c.temperature,
                                    chunk_len=t.chunk_len, seed=job.seed)
        self.scorer.check_head()
        self.windows = PackedWindows(job.pack_dir)
        self._teacher = threading.Lock()

    def run_shard(self, index: int) -> dict[str, Any]:
        import torch

        job, c = self.job, self.job.cache_cfg
        spec = job.shards[index]
        t0 = time.monotonic()
        codec = make_codec(c.codec, c.kind, job.vocab)
        writer = CacheWriter(Path(job.cache_dir) / shard_name(index), codec, job.fingerprint, index)
        wids, inputs, starts = self.windows.read_range(spec["first_window"], spec["first_window"] + spec["rows"])
        if len(wids) != spec["rows"] or (len(wids) and wids[0] != spec["first_window"]):
            raise UserError(f"{job.pack_dir}: expected {spec['rows']} windows from {spec['first_window']}, "
                            f"found {len(wids)}")
        batch = job.teacher_cfg.batch_size
        # Three stages overlap: the teacher forward of batch b+1 (this thread), the top-k
        # selection of batch b (a second thread) and the encoding and write of the previous row
        # group (a third). Torch ops, zstd and Parquet release the GIL, so on a CPU with a core
        # to spare the selection and I/O hide behind the forward; on a GPU they keep host work
        # off the device's critical path. At most ``_AHEAD`` batches of hidden states wait.
        # The teacher lock is held for the forwards only: an executor that runs two shards at
        # once (``SHARDS_IN_FLIGHT``) starts the next shard's forwards while this one's last
        # selection, write, fsync and rename finish, so the teacher never waits on a shard's tail.
        select_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-select")
        write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        in_flight: list[Future] = []
        pending: Future | None = None

        def write_group(gs: slice, parts: list[Future]) -> None:
            out = [f.result() for f in parts]
            cat = lambda key: np.concatenate([o[key].numpy() for o in out]) if out[0][key] is not None else None  # noqa: E731
            writer.write(wids[gs].tolist(), inputs[gs], starts[gs], cat("ids"), cat("logp"), cat("counts"))

        try:
            with self._teacher:
                for g in range(0, len(wids), c.windows_per_row_group):
                    gs = slice(g, min(len(wids), g + c.windows_per_row_group))
                    parts = []
                    for b in range(gs.start, gs.stop, batch):
                        bs = slice(b, min(b + batch, gs.stop))
                        hidden = self.scorer.hidden(torch.from_numpy(inputs[bs]).long(), starts[bs], job.mode)
                        parts.append(select_pool.submit(self.scorer.select, hidden, wids[bs].tolist()))
                        in_flight = [f for f in in_flight + [parts[-1]] if not f.done()]
                        if len(in_flight) > _AHEAD:
                            in_flight.pop(0).result()
                    if pending is not None:
                        pending.result()
                    pending = write_pool.submit(write_group, gs, parts)
            if pending is not None:
                pending.result()
            size = writer.close()
        except BaseException as err:
            select_pool.shutdown(wait=True, cancel_futures=True)
            if pending is not None:
                wait([pending])
            writer.abort()
            # A full or read-only cache volume: one line naming the cache, from a Ray actor too.
            user = write_failure(err, job.cache_dir) if isinstance(err, Exception) else None
            if user is not None:
                raise user from None
            raise
        finally:
            select_pool.shutdown(wait=True)
            write_pool.shutdown(wait=True)
        # ``process_cpu_seconds`` is the process's CPU so far (all threads, start-up and teacher
        # load included); the driver takes differences of it between shards, which stay
        # correct when two shards overlap. On a shared machine CPU is a steadier measure of
        # cost than wall time.
        return {"index": index, "rows": len(wids), "tokens": len(wids) * job.window_len, "bytes": size,
                "stat": stat_key(writer.final),
                "seconds": time.monotonic() - t0, "process_cpu_seconds": time.process_time(), "pid": os.getpid()}


# ----------------------------------------------------------------------------- executors


class Executor(Protocol):
    """Runs ``CacheWorker.run_shard`` for every index of ``todo`` (``cluster.executor``)."""

    def run(self, job: CacheJob, todo: list[int], on_done: Callable[[dict[str, Any]], None]) -> None: ...


# ----------------------------------------------------------------------------- the driver


def _check_vocab(data_tokenizer: str, vocab: int) -> None:
    from stages.tokenizer import load_tokenizer

    n = len(load_tokenizer(data_tokenizer))
    if n > vocab:
        raise UserError(f"data.tokenizer has {n} tokens but teacher.model's vocabulary has only {vocab}: "
                        "the windows must be tokenized with the teacher's tokenizer")


def check_inputs(spec: CacheSpec) -> int:
    """What can be told wrong from the teacher's files and the config alone, before any
    window is packed or a worker starts; returns the teacher's vocabulary size."""
    from stages.teacher import check_weight_files
    from stages.tokenizer import check_teacher_tokenizer

    vocab = teacher_vocab(spec.teacher.model)
    check_context(spec.teacher.model, spec.pack.pack.window_len)
    check_weight_files(spec.teacher.model)
    _check_vocab(spec.pack.data.tokenizer, vocab)
    check_teacher_tokenizer(spec.pack.data.tokenizer, spec.teacher.model, spec.teacher.tokenizer)
    if spec.cache.kind == "topk" and spec.cache.k > vocab:
        raise UserError(f"cache.k: {spec.cache.k} is more than teacher.model's vocabulary of {vocab} tokens "
                        f"(k = {vocab} already stores the whole distribution)")
    return vocab


def build_job(spec: CacheSpec, pack_dir: Path, cache_dir: Path, fp: str) -> CacheJob:
    from pipeline.locate import pinned

    windows = PackedWindows(pack_dir)
    vocab = check_inputs(spec)
    # A Hub teacher goes to the workers as org/name@<commit>: every replica loads the commit
    # this driver resolved and fingerprinted, even if the branch moves meanwhile.
    teacher = spec.teacher.model_copy(update={"model": pinned(spec.teacher.model, "teacher.model", "model")})
    return CacheJob(
        cache_dir=str(cache_dir), pack_dir=str(pack_dir), pack_files=windows.index, fingerprint=fp,
        teacher=teacher.model_dump(mode="json"), cache=spec.cache.model_dump(mode="json"),
        mode=spec.pack.pack.mode, window_len=spec.pack.pack.window_len, seed=spec.seed, vocab=vocab,
        shards=shard_plan(windows.num_windows, spec.cache.windows_per_shard),
    )


def _clear(cache_dir: Path) -> None:
    for p in [cache_dir / MANIFEST_FILE, cache_dir / PLAN_FILE, *cache_dir.glob("shard-*.parquet"),
              *cache_dir.glob(TEMP_GLOB)]:
        p.unlink(missing_ok=True)


def run_cache(spec: CacheSpec, pack_dir: Path, cache_dir: Path, executor: Executor, force: bool = False,
              verbose: bool = True) -> Path:
    """Compute (or finish, or reuse) the teacher cache of ``spec`` over ``pack_dir`` into
    ``cache_dir``; ``executor`` runs the shards (``cluster.executor``). ``force`` rebuilds
    every shard."""
    identity = spec.identity()
    cache_dir = Path(cache_dir)
    fp = fingerprint(identity)
    if not force and _finished(cache_dir, fp):  # reads only: a finished cache on read-only storage is reused
        if verbose:
            print(f"cache: reusing {cache_dir} (all shards valid)")
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(cache_dir, "cache job"):  # one driver per cache; dies with its process
        if force:
            _clear(cache_dir)
        for tmp in cache_dir.glob(TEMP_GLOB):  # left by a killed run; no writer is alive (we hold the lock)
            tmp.unlink(missing_ok=True)
        job = build_job(spec, Path(pack_dir), cache_dir, fp)
        note = check_context(spec.teacher.model, job.window_len)  # checked by build_job; the note if scaled
        if note and verbose:
            print(f"cache: {note}")
        plan = {"fingerprint": job.fingerprint, "num_windows": sum(s["rows"] for s in job.shards),
                "windows_per_shard": spec.cache.windows_per_shard, "shards": job.shards}
        write_plan(cache_dir, plan)
        atomic_write_json(cache_dir / CONFIG_FILE, spec_to_dict(spec))
        verified = read_verified(cache_dir)
        bad = {s["index"]: check_shard(cache_dir / shard_name(s["index"]), job.fingerprint, s["first_window"],
                                       s["rows"], verified=verified)
               for s in job.shards}
        todo = [i for i, reason in bad.items() if reason]
        (cache_dir / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete until every shard is valid again
        for i in todo:
            (cache_dir / shard_name(i)).unlink(missing_ok=True)
        planned = {shard_name(s["index"]) for s in job.shards}
        for stray in cache_dir.glob("shard-*.parquet"):  # from an earlier cache.windows_per_shard, or unknown
            if stray.name not in planned:
                if verbose:
                    print(f"cache: removing {stray.name} (not in the shard plan)")
                stray.unlink()
        verified = {name: key for name, key in verified.items() if name in planned}
        if verbose:
            done = len(job.shards) - len(todo)
            print(f"cache: {cache_dir}: {len(todo)} of {len(job.shards)} shards to compute"
                  + (f" ({done} valid, skipped)" if done else ""))
        t0 = time.monotonic()
        tokens = 0
        done_at: list[tuple[float, int]] = []  # (seconds since start, tokens) per finished shard
        # Each worker process's CPU seconds when its first shard finished and when its latest
        # did: the difference is its "steady" CPU (after start-up, teacher load and warm-up),
        # spent on the tokens of its shards after the first.
        cpu: dict[str, Any] = {"first": {}, "last": {}, "steady_tokens": 0}
        progress = Progress("cache", len(todo), unit="shards", enabled=verbose)
        try:
            if todo:
                def on_done(result: dict[str, Any]) -> None:
                    nonlocal tokens
                    tokens += result["tokens"]
                    done_at.append((time.monotonic() - t0, result["tokens"]))
                    pid, used = result.get("pid"), result.get("process_cpu_seconds", 0.0)
                    if pid in cpu["first"]:
                        cpu["steady_tokens"] += result["tokens"]
                    cpu["first"].setdefault(pid, used)
                    cpu["last"][pid] = used
                    verified[shard_name(result["index"])] = result["stat"]
                    progress.update(1, result["tokens"])

                executor.run(job, todo, on_done)
        finally:  # after a failure too (a full disk): finished shards stay for the re-run to keep
            progress.close()
            for tmp in cache_dir.glob(TEMP_GLOB):  # left by workers that died or were stopped mid-shard
                tmp.unlink(missing_ok=True)
        raise_if_stopped()  # a stop signal whose exception a library swallowed: never marked complete
        seconds = time.monotonic() - t0
        manifest = finish(cache_dir, job, identity, tokens_computed=tokens, seconds=seconds, done_at=done_at,
                          cpu=cpu, verified=verified)
        if verbose:
            print(f"cache: wrote {cache_dir}: {manifest['windows']} windows, {manifest['bytes_per_entry']:.3g} B/entry"
                  + (f", {human(tokens / max(seconds, 1e-9))} tokens/s" if tokens else ""))
        return cache_dir


def finish(cache_dir: Path, job: CacheJob, identity: dict[str, Any], tokens_computed: int,
           seconds: float, done_at: list[tuple[float, int]] | None = None,
           cpu: dict[str, Any] | None = None, verified: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every shard once more and write the manifest (last). ``verified``: shards whose
    pages were checked (or just written by a worker) and have not changed since."""
    shards, bad = [], []
    verified = {} if verified is None else verified
    for s in job.shards:
        path = cache_dir / shard_name(s["index"])
        reason = check_shard(path, job.fingerprint, s["first_window"], s["rows"], verified=verified)
        if reason:
            bad.append(f"{path.name}: {reason}")
        else:
            shards.append({**s, "file": path.name, "bytes": path.stat().st_size})
    if bad:
        raise UserError(f"{cache_dir}: shards still invalid after the run: " + "; ".join(bad))
    windows = sum(s["rows"] for s in shards)
    tokens = windows * job.window_len
    width = job.width()
    total = sum(s["bytes"] for s in shards)
    c = job.cache_cfg
    manifest = {
        "format": FORMAT_VERSION["cache"],
        "fingerprint": job.fingerprint,
        "identity": identity,
        "teacher": job.teacher["model"],
        "kind": c.kind, "k": c.k if c.kind == "topk" else None,
        "samples": c.samples if c.kind == "sampled" else None,
        "width": width, "temperature": c.temperature, "codec": c.codec,
        "window_len": job.window_len, "mode": job.mode, "vocab": job.vocab,
        "pack_dir": job.pack_dir, "pack_fingerprint": identity["pack"],
        "windows": windows, "tokens": tokens, "bytes": total,
        "bytes_per_token": total / max(tokens, 1), "bytes_per_entry": total / max(tokens * width, 1),
        "windows_per_shard": c.windows_per_shard, "windows_per_row_group": c.windows_per_row_group,
        "config": {"teacher": job.teacher, "cache": job.cache},
        "last_run": _run_stats(tokens_computed, seconds, done_at or [], cpu or {}),
        "shards": shards,
    }
    write_verified(cache_dir, verified)
    write_manifest(cache_dir, manifest)
    return manifest


def _finished(cache_dir: Path, fp: str) -> bool:
    """A complete cache of fingerprint ``fp``: a valid manifest, every planned shard valid, no
    strays (shards unchanged since they were checked are not re-read)."""
    from stages.cache.manifest import read_manifest

    if not (cache_dir / MANIFEST_FILE).is_file() or verify_cache(cache_dir, trust_verified=True):
        return False
    return read_manifest(cache_dir)["fingerprint"] == fp



def _run_stats(tokens: int, seconds: float, done_at: list[tuple[float, int]], cpu: dict[str, Any]) -> dict[str, Any]:
    """Throughput of the run, and its steady state: from the first finished shard to the last
    (what remains once actors are up and the teacher is loaded, a one-time cost)."""
    stats: dict[str, Any] = {"tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds if seconds > 0 else None,
                             "first_shard_s": done_at[0][0] if done_at else None, "steady_tokens_per_s": None,
                             "steady_cpu_seconds": sum(cpu["last"][p] - cpu["first"][p] for p in cpu["last"]) if cpu else None,
                             "steady_tokens": cpu.get("steady_tokens"),
                             "worker_cpu_seconds": sum(cpu["last"].values()) if cpu else None}
    if len(done_at) > 1 and done_at[-1][0] > done_at[0][0]:
        stats["steady_tokens_per_s"] = sum(t for _, t in done_at[1:]) / (done_at[-1][0] - done_at[0][0])
    return stats
