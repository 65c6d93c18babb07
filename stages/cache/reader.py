"""Streaming reader of a teacher cache: the training side's input.

The unit of work is one Parquet row group of one shard (``cache.windows_per_row_group``
windows). Each epoch a permutation of all units seeded by ``(seed, epoch)`` is dealt out
to the data-parallel ranks in equal contiguous blocks (the remainder units sit the epoch
out, a different few each epoch); ranks of one sequence-parallel group pass the same
``dp_rank`` and so see the same rows. Ranks must step in lockstep, so every rank stops
after the same number of windows (the smallest share, when row groups differ in size).

Inside a rank the units are dealt to ``W`` lanes (``W`` = DataLoader workers, 1 without):
lane l takes units l, l+W, ... of the rank's list. A DataLoader fetches one item from each
worker in turn, so the rank's stream is lane 0's first window, lane 1's first, ... — the
same with 0 workers (1 lane) as a fixed function of (seed, epoch, rank, W).

Exact resume: the state is ``(epoch, consumed)``. After a restart each lane skips the
windows that came before position ``consumed`` and the workers are rotated so that the
DataLoader's first worker serves the lane that was next: the stream continues exactly where
it stopped. Resume with the same number of workers (else a clear error).

Items are dicts of tensors as stored: ids int32 [L, m], logp float16 [L, m], counts int16
[L, m] or None (see ``stages.cache.codec``); nothing is upcast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from pipeline.errors import UserError
from pipeline.fingerprint import differences
from stages.cache.codec import codec_from_footer, flat_values
from stages.cache.manifest import read_manifest

# Shards carry page CRCs; checking them costs little next to decoding (bench/checksum_cost.py
# measures it by switching this off).
PAGE_CHECKSUMS = True


def check_cache(cache_dir: str | Path, expected_identity: dict[str, Any]) -> dict[str, Any]:
    """The cache's manifest if it was computed for ``expected_identity``, else a UserError
    naming every field that differs (e.g. ``k``, ``teacher.files``, ``pack``)."""
    manifest = read_manifest(cache_dir)
    diff = differences(manifest.get("identity", {}), expected_identity)
    if diff:
        raise UserError(f"{cache_dir}: teacher cache does not match this run's config; differing fields: "
                        + "; ".join(diff))
    return manifest


class ShardReader(IterableDataset):
    """Iterable of cached windows for one data-parallel rank (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, *, dp_rank: int, dp_size: int, seed: int, epoch: int = 0,
                 num_workers_ok: bool = True, expected_fingerprint: str | dict[str, Any] | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.cache_dir = Path(cache_dir)
        if isinstance(expected_fingerprint, dict):
            manifest = check_cache(cache_dir, expected_fingerprint)
        else:
            manifest = read_manifest(cache_dir)
            if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
                raise UserError(f"{cache_dir}: cache fingerprint {manifest['fingerprint']} != expected "
                                f"{expected_fingerprint} (check_cache with the run's identity names the fields)")
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self.kind = manifest["kind"]
        self.codec_name = manifest["codec"]
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers_ok = num_workers_ok
        self.epoch, self.consumed = epoch, 0
        self._lanes = 1
        self._resume: tuple[int, int, int] | None = None  # (epoch, consumed, lanes)
        self._files: dict[str, tuple[pq.ParquetFile, Any]] = {}
        # units: (shard file, row group, rows)
        self.units: list[tuple[str, int, int]] = []
        for s in manifest["shards"]:
            md = pq.read_metadata(self.cache_dir / s["file"])
            self.units += [(s["file"], g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        if len(self.units) < dp_size:
            raise UserError(f"{cache_dir}: {len(self.units)} row groups cannot be shared by {dp_size} ranks; "
                            "lower cache.windows_per_row_group or use fewer ranks")

    # -- planning (pure functions of seed, epoch, rank, lanes)

    def rank_units(self, epoch: int, rank: int | None = None) -> list[int]:
        rank = self.dp_rank if rank is None else rank
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        per = len(self.units) // self.dp_size
        return perm[rank * per:(rank + 1) * per].tolist()

    def epoch_len(self, epoch: int | None = None) -> int:
        """Windows each rank gets this epoch (the same for every rank)."""
        e = self.epoch if epoch is None else epoch
        return min(sum(self.units[u][2] for u in self.rank_units(e, r)) for r in range(self.dp_size))

    def __len__(self) -> int:
        return self.epoch_len()

    def _lane_plan(self, epoch: int, lanes: int, consumed: int) -> tuple[list[list[int]], list[int], list[int], int]:
        """Per lane: its units, how many of its windows to skip, how many to yield; and the
        lane that serves the next window (the rotation)."""
        units = self.rank_units(epoch)
        lane_units = [units[l::lanes] for l in range(lanes)]
        n = np.array([sum(self.units[u][2] for u in lu) for lu in lane_units])
        # Merge key of window j of lane l is j * lanes + l; the stream is the windows in key order.
        keys = np.sort(np.concatenate([np.arange(n[l]) * lanes + l for l in range(lanes)]))
        cap = self.epoch_len(epoch)
        t_cap = keys[cap] if cap < len(keys) else keys[-1] + 1 if len(keys) else 0
        t_start = keys[consumed] if consumed < cap else t_cap
        j_start, l_start = divmod(int(t_start), lanes)
        j_cap, l_cap = divmod(int(t_cap), lanes)
        skip = [min(int(n[l]), j_start + (l < l_start)) for l in range(lanes)]
        stop = [min(int(n[l]), j_cap + (l < l_cap)) for l in range(lanes)]
        return lane_units, skip, stop, l_start

    # -- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        if info is not None and not self.num_workers_ok:
            raise UserError("ShardReader(num_workers_ok=False) cannot run inside DataLoader workers")
        lanes, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, consumed = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch and self._resume[1] > 0:
            _, consumed, saved_lanes = self._resume
            if saved_lanes != lanes:
                raise UserError(f"cannot resume the cache reader with {lanes} DataLoader worker lane(s): the "
                                f"position was saved with {saved_lanes}; use the same number of workers")
        lane_units, skip, stop, first_lane = self._lane_plan(epoch, lanes, consumed)
        lane = (first_lane + worker) % lanes
        main = info is None
        if main:
            self._lanes, self.consumed = 1, consumed
        for item in self._lane_items(lane_units[lane], skip[lane], stop[lane]):
            if main:
                self.consumed += 1
            yield item
        if main:
            self.epoch, self.consumed, self._resume = epoch + 1, 0, None

    def _lane_items(self, units: list[int], skip: int, stop: int) -> Iterator[dict[str, Any]]:
        import torch

        j = 0
        for u in units:
            name, group, rows = self.units[u]
            if j + rows <= skip:
                j += rows
                continue
            if j >= stop:
                return
            pf, codec = self._open(name)
            try:
                table = pf.read_row_group(group)
            except OSError as err:  # a page whose CRC does not match: never train on altered targets
                raise UserError(f"{self.cache_dir / name}: row group {group} is corrupt ({str(err)[:160]}); "
                                "re-run `posdistill cache` to regenerate the shard") from None
            window_ids = table.column("window_id").to_numpy()
            input_ids = np.array(flat_values(table.column("input_ids")), dtype=np.int32).reshape(rows, -1)
            doc_starts = table.column("doc_starts").to_pylist()
            for r, target in enumerate(codec.decode(table)):
                if skip <= j < stop:
                    yield {
                        "window_id": int(window_ids[r]),
                        "input_ids": torch.from_numpy(input_ids[r]),
                        "doc_starts": torch.tensor(doc_starts[r], dtype=torch.int32),
                        "ids": torch.from_numpy(np.array(target["ids"], dtype=np.int32)),
                        "logp": torch.from_numpy(np.array(target["logp"], dtype=np.float16)),
                        "counts": None if target["counts"] is None
                        else torch.from_numpy(np.array(target["counts"], dtype=np.int16)),
                    }
                j += 1
                if j >= stop:
                    return

    def _open(self, name: str) -> tuple[pq.ParquetFile, Any]:
        if name not in self._files:
            pf = pq.ParquetFile(self.cache_dir / name, page_checksum_verification=PAGE_CHECKSUMS)
            self._files[name] = (pf, codec_from_footer(self.codec_name, self.kind, pf.metadata.metadata))
        return self._files[name]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files do not travel to DataLoader workers
        return state

    # -- DataLoader and state

    def loader(self, num_workers: int = 0, **dataloader_kwargs: Any) -> Iterator[dict[str, Any]]:
        """One epoch through a DataLoader with ``num_workers`` workers, keeping this reader's
        position current (so ``state_dict()`` is exact) and advancing the epoch at its end."""
        if num_workers == 0:
            yield from self
            return
        import torch.utils.data

        self._lanes = num_workers
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None
        start = self._resume[1] if self._resume is not None else 0
        self.consumed = start
        dl = torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, **dataloader_kwargs)
        for item in dl:
            self.consumed += 1
            yield item
        self.epoch, self.consumed, self._resume = self.epoch + 1, 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed, self._resume = epoch, 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "lanes": self._lanes, "seed": self.seed,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "dp_size", "fingerprint"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"reader state was saved with {key}={state[key]!r}, this reader has "
                                f"{getattr(self, key)!r}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._lanes = int(state.get("lanes", 1))
        self._resume = (self.epoch, self.consumed, self._lanes)
