"""The one reader of packed-window Parquet (``windows-*.parquet``, the pack stage's output).

The cache job reads contiguous window ranges column-wise (``read_range``), evaluation and
the benches read the first rows (``rows``), and training streams one data-parallel rank's
share in a seeded order with an exact resume position (``RankWindows``). ``position_ids`` is
what a model sees of a window in either packing mode.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import UserError
from stages.cache.codec import flat_values

WINDOW_GLOB = "windows-*.parquet"


def position_ids(doc_starts: np.ndarray | list[int], window_len: int, mode: str) -> np.ndarray:
    """Position ids a model sees for one window: 0..L-1, or restarting per document."""
    pos = np.arange(window_len, dtype=np.int64)
    if mode == "cross_doc":
        return pos
    starts = np.asarray(doc_starts, dtype=np.int64)
    seg = np.searchsorted(starts, pos, side="right") - 1
    return pos - starts[seg]


class PackedWindows:
    """A pack directory's windows: ``index`` lists (file, first window id, rows) per file."""

    def __init__(self, pack_dir: str | Path):
        self.dir = Path(pack_dir)
        self.files = sorted(self.dir.glob(WINDOW_GLOB))
        if not self.files:
            raise UserError(f"{self.dir}: no packed windows ({WINDOW_GLOB}); run `posdistill pack CONFIG`")
        self.index: list[tuple[str, int, int]] = []
        first = 0
        for path in self.files:
            rows = pq.read_metadata(path).num_rows
            self.index.append((path.name, first, rows))
            first += rows
        self.num_windows = first

    def read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """Windows [start, stop): window ids [n], input_ids int32 [n, L] and doc_starts."""
        wids, inputs, starts = [], [], []
        for name, first, rows in self.index:
            if first + rows <= start or first >= stop:
                continue
            pf = pq.ParquetFile(self.dir / name)
            offset = first
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                lo, hi = max(start, offset), min(stop, offset + n)
                if lo < hi:
                    table = pf.read_row_group(g).slice(lo - offset, hi - lo)
                    wids.append(table.column("window_id").to_numpy())
                    inputs.append(np.asarray(flat_values(table.column("input_ids")), dtype=np.int32).reshape(hi - lo, -1))
                    starts += table.column("doc_starts").to_pylist()
                offset += n
        if not wids:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.int32), []
        return np.concatenate(wids), np.concatenate(inputs), starts

    def rows(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts in window_id order (the first ``limit``)."""
        n = 0
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    yield row


class RankWindows:
    """One data-parallel rank's packed windows for one epoch, in a seeded order.

    Order: a permutation of row groups (seed, epoch), rows in file order within a group;
    window j of that order goes to rank j % dp_size; the total is cut to a multiple of
    dp_size so every rank sees the same number of windows per epoch. State: (epoch, consumed).
    """

    def __init__(self, pack_dir: str | Path, *, dp_rank: int, dp_size: int, seed: int, epoch: int = 0):
        self.files = PackedWindows(pack_dir).files
        groups = []  # (file index, row group, rows)
        for fi, f in enumerate(self.files):
            md = pq.read_metadata(f)
            groups += [(fi, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        order = list(range(len(groups)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        windows = [(groups[g][0], groups[g][1], r) for g in order for r in range(groups[g][2])]
        windows = windows[: len(windows) // dp_size * dp_size]
        self.mine = windows[dp_rank::dp_size]
        self.epoch = epoch
        self.consumed = 0
        self._table: tuple[tuple[int, int], Any] | None = None

    def __len__(self) -> int:
        return len(self.mine)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] != self.epoch:
            raise ValueError(f"state is for epoch {state['epoch']}, reader is at {self.epoch}")
        self.consumed = int(state["consumed"])

    def _row(self, fi: int, g: int, r: int) -> dict[str, Any]:
        import torch

        if self._table is None or self._table[0] != (fi, g):
            pf = pq.ParquetFile(self.files[fi])
            self._table = ((fi, g), pf.read_row_group(g).to_pydict())
        cols = self._table[1]
        return {"window_id": int(cols["window_id"][r]),
                "input_ids": torch.tensor(cols["input_ids"][r], dtype=torch.int32),
                "doc_starts": list(cols["doc_starts"][r])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.consumed < len(self.mine):
            row = self._row(*self.mine[self.consumed])
            self.consumed += 1
            yield row
