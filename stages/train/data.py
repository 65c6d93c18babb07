"""Window streams for training: teacher-cache rows or packed windows, batched and sliced.

Both sources yield the same per-window dict (``window_id``, ``input_ids`` int32 [L],
``doc_starts``; cache rows add ``ids`` [L, m], ``logp`` [L, m], ``counts`` [L, m] | None),
are sharded by data-parallel rank, and expose ``state_dict`` / ``load_state_dict`` so a
resumed run continues with exactly the next window. A background thread reads and collates
ahead (``train.prefetch`` micro-batches); the position saved in a checkpoint is the one
after the last batch *consumed*, never the read-ahead.

Sequence parallel: the ranks of one group read the same windows and each keeps its slice
of the sequence - input ids, position ids, labels, and the cached targets alike (DeepSpeed's
own loader adapter only slices 2-D tensors).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from stages.kd_loss import IGNORE

# ----------------------------------------------------------------------------- packed windows


class EpochStream:
    """Endless stream over epochs of a reader built by ``make(epoch)``; state = (epoch, reader state)."""

    def __init__(self, make: Callable[[int], Any]):
        self.make = make
        self.epoch = 0
        self.reader = make(0)
        self._it: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.reader = self.make(self.epoch)
        self.reader.load_state_dict(state["reader"])
        self._it = None

    def __iter__(self) -> "EpochStream":
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.reader)
            try:
                return next(self._it)
            except StopIteration:
                self.epoch += 1
                self.reader = self.make(self.epoch)
                self._it = None
        raise RuntimeError("the data source yields no windows for this rank")


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One micro-batch as one rank sees it (its sequence slice under sequence parallelism)."""

    input_ids: torch.Tensor  # [B, l] int64
    position_ids: torch.Tensor  # [B, l] int64
    labels: torch.Tensor  # [B, l] int64, -100 where no next token
    ids: torch.Tensor | None  # [B, l, m] int64 teacher ids
    logp: torch.Tensor | None  # [B, l, m] teacher log-probs
    weights: torch.Tensor | None  # [B, l, m] count / S (sampled caches)
    kd_norm: int  # KD positions in the whole (unsliced) micro-batch
    ce_norm: int  # labelled positions in the whole micro-batch
    tokens: int  # tokens in the whole micro-batch

    def to(self, device: torch.device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.position_ids), mv(self.labels), mv(self.ids), mv(self.logp),
                     mv(self.weights), self.kd_norm, self.ce_norm, self.tokens)


def first_period(ids: torch.Tensor) -> int:
    """The smallest p with ids[p:] == ids[:-p] (len(ids) when there is none)."""
    a = ids.numpy()
    for p in np.flatnonzero(a[1:] == a[0]) + 1:  # only shifts that repeat the first id can match
        if np.array_equal(a[p:], a[:-p]):
            return int(p)
    return len(a)


def mask_first_periods(labels: torch.Tensor, input_ids: torch.Tensor, starts: list[list[int]]) -> None:
    """Ignore each periodic document's first period: it is random, so its loss is noise.

    With the whole row trained (BOS and first period included) an induction mechanism
    emerged in a 2-layer student much later or not at all (docs/teacher.md)."""
    B, L = input_ids.shape
    for b in range(B):
        bounds = list(starts[b]) + [L]
        for s, e in zip(bounds[:-1], bounds[1:]):
            p = first_period(input_ids[b, s + 1:e])  # after the BOS (or the first token)
            labels[b, s:min(e, s + p + 1)] = IGNORE


def collate(rows: list[dict[str, Any]], mode: str, window_len: int, sp: int, sp_rank: int,
            with_targets: bool, periodic: bool = False) -> Batch:
    from stages.teacher import model_inputs

    input_ids = torch.stack([r["input_ids"].long() for r in rows])  # [B, L]
    B, L = input_ids.shape
    if L != window_len:
        raise ValueError(f"window {rows[0]['window_id']} has {L} tokens, the phase expects {window_len}")
    starts = [r["doc_starts"].tolist() if torch.is_tensor(r["doc_starts"]) else list(r["doc_starts"]) for r in rows]
    pos = model_inputs(input_ids, starts, mode)["position_ids"]  # [B, L]
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]  # next token; the last position has none
    if periodic:
        mask_first_periods(labels, input_ids, starts)
    ids = logp = weights = None
    if with_targets:
        per_pos = lambda key: torch.stack([torch.as_tensor(r[key]).reshape(L, -1) for r in rows])  # noqa: E731
        ids = per_pos("ids").long()  # [B, L, m]
        logp = per_pos("logp")  # [B, L, m]
        if rows[0].get("counts") is not None:
            counts = per_pos("counts").float()  # [B, L, m]
            weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # count / S
    kd_norm, ce_norm = (B * L if with_targets else 0), max(1, int((labels != IGNORE).sum()))
    if sp > 1:  # keep this rank's slice of the sequence, of every per-position tensor
        c = L // sp
        sl = slice(sp_rank * c, (sp_rank + 1) * c)
        input_ids, pos, labels = input_ids[:, sl], pos[:, sl], labels[:, sl]
        if with_targets:
            ids, logp = ids[:, sl], logp[:, sl]
            weights = None if weights is None else weights[:, sl]
    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return Batch(cont(input_ids), cont(pos), cont(labels), cont(ids), cont(logp), cont(weights),
                 kd_norm, ce_norm, B * L)


def batches(stream: EpochStream, micro_batch: int, **collate_kwargs: Any) -> Iterator[tuple[Batch, dict]]:
    """(micro-batch, stream state right after it) forever."""
    while True:
        rows = [next(stream) for _ in range(micro_batch)]
        yield collate(rows, **collate_kwargs), stream.state_dict()


class Prefetcher:
    """Runs a (batch, state) generator in a thread, ``depth`` items ahead."""

    _END = object()

    def __init__(self, source: Iterator[tuple[Batch, dict]], depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.state: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, source: Iterator[tuple[Batch, dict]]) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # surfaced in the training thread
            self.q.put((self._END, err))

    def __next__(self) -> Batch:
        item = self.q.get()
        if item[0] is self._END:
            raise item[1]
        batch, self.state = item
        return batch

    def state_dict(self) -> dict | None:
        return self.state

    def close(self) -> None:
        self._stop.set()
        while not self.q.empty():
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- sources


def open_stream(source: str, path: Path, *, dp_rank: int, dp_size: int, seed: int) -> EpochStream:
    if source == "pack":
        from stages.windows import RankWindows

        return EpochStream(lambda e: RankWindows(path, dp_rank=dp_rank, dp_size=dp_size, seed=seed, epoch=e))
    from stages.cache.reader import ShardReader

    return EpochStream(lambda e: ShardReader(path, dp_rank=dp_rank, dp_size=dp_size, seed=seed, epoch=e))

