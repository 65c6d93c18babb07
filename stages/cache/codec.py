"""How teacher targets are laid out in a cache shard: the ``plain`` and ``compact`` codecs.

Both store one row per window with ``window_id`` int64, ``input_ids`` list<int32> and
``doc_starts`` list<int32>, and decode to the same arrays per window:
ids int32 [L, m], logp float16 [L, m] (teacher log-probs at the cache temperature) and, for
``kind == "sampled"``, counts int16 [L, m] (0 = padding slot).

``plain`` (exact up to float16 rounding): ``topk_ids`` list<int32> and ``topk_logp``
list<float16>, both flattened position-major (length L*m), plus ``counts`` list<int16> for
sampled caches. Top-k slots are in descending log-prob order.

``compact`` (lossy values, lossless ids): one ``payload`` blob per window holding
zstd-compressed streams; per position the entries are ordered by a frequency rank of the id
and coded as

* **ids**: rank gaps, LEB128 varints. Ranks come from the shard's first row group (ids sorted
  by how often they occur in its targets; unseen ids after them in id order) and are stored
  in the footer, so every shard decodes on its own; frequent ids get small ranks and small gaps.
* **values**: ``level = round(sqrt(p) / s)`` with ``s = 1/128`` (one byte), decoded as
  ``q = (level * s)^2`` (level 0 as ``(s/4)^2``). Uniform steps in sqrt(p) are what minimises
  the bits for a KL budget: an entry's KL contribution is about ``2 (sqrt q - sqrt p)^2``
  whatever its probability. **Error bound**: every entry has ``|sqrt q - sqrt p| <= s/2 =
  1/256``, so ``sum_i (sqrt q_i - sqrt p_i)^2 <= m / 65536`` and KL(decoded || exact) is about
  twice that at worst (``~2e-3`` nats at m = 64) and ``~m s^2 / 6`` on average (``~6.5e-4``);
  bench/cache_bytes.py measures it. Where the decoded top-k mass exceeds 1 the position is
  renormalised (tail mass 0).
* **counts** (sampled only): one byte per entry (two when ``samples > 255``).

Slots come out in descending log-prob order for ``topk`` (as in ``plain``) and ascending id
order for ``sampled``, padding last.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import zstandard

COMMON = [("window_id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("doc_starts", pa.list_(pa.int32()))]
SQRT_STEP = 1.0 / 128
_MAGIC = b"PDC1"
_HEADER = struct.Struct("<4sIIIIIII")  # magic, L, m, flags, len(n), len(gaps), len(levels), len(counts)
_ZLEVEL = 3
RANKMAP_KEY = b"posdistill.compact.rankmap"
VOCAB_KEY = b"posdistill.vocab"


def _list_column(flat: np.ndarray, rows: int, arrow_type: pa.DataType) -> pa.Array:
    per = len(flat) // max(rows, 1)
    offsets = pa.array(np.arange(0, rows * per + 1, per, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=arrow_type))


def _common_columns(window_ids: list[int], input_ids: np.ndarray, doc_starts: list[list[int]]) -> dict[str, pa.Array]:
    B = len(window_ids)
    return {
        "window_id": pa.array(np.asarray(window_ids, dtype=np.int64)),
        "input_ids": _list_column(np.ascontiguousarray(input_ids, dtype=np.int32).ravel(), B, pa.int32()),
        "doc_starts": pa.array([list(map(int, s)) for s in doc_starts], type=pa.list_(pa.int32())),
    }


def flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The child values of a list column as one numpy array (no per-row Python objects)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.offset or (len(arr) and arr.offsets[0].as_py() != 0):
        arr = pa.concat_arrays([arr])  # normalise sliced arrays
    return arr.values.to_numpy(zero_copy_only=False)


class PlainCodec:
    name = "plain"

    def __init__(self, kind: str, vocab: int):
        self.kind, self.vocab = kind, vocab

    def schema(self) -> pa.Schema:
        fields = COMMON + [("topk_ids", pa.list_(pa.int32())), ("topk_logp", pa.list_(pa.float16()))]
        if self.kind == "sampled":
            fields.append(("counts", pa.list_(pa.int16())))
        return pa.schema(fields)

    def column_encoding(self) -> dict[str, str]:
        enc = {"window_id": "BYTE_STREAM_SPLIT", "input_ids.list.element": "BYTE_STREAM_SPLIT",
               "topk_ids.list.element": "BYTE_STREAM_SPLIT", "topk_logp.list.element": "BYTE_STREAM_SPLIT"}
        if self.kind == "sampled":
            enc["counts.list.element"] = "BYTE_STREAM_SPLIT"
        return enc

    def fit(self, ids: np.ndarray) -> None:
        pass

    def footer(self) -> dict[bytes, bytes]:
        return {VOCAB_KEY: str(self.vocab).encode()}

    def encode(self, window_ids: list[int], input_ids: np.ndarray, doc_starts: list[list[int]],
               ids: np.ndarray, logp: np.ndarray, counts: np.ndarray | None) -> pa.Table:
        """ids [B, L, m] int32, logp [B, L, m] float32, counts [B, L, m] int16 | None -> rows."""
        B = len(window_ids)
        cols = _common_columns(window_ids, input_ids, doc_starts)
        cols["topk_ids"] = _list_column(np.ascontiguousarray(ids, dtype=np.int32).ravel(), B, pa.int32())
        cols["topk_logp"] = _list_column(np.ascontiguousarray(logp).astype(np.float16).ravel(), B, pa.float16())
        if self.kind == "sampled":
            cols["counts"] = _list_column(np.ascontiguousarray(counts, dtype=np.int16).ravel(), B, pa.int16())
        return pa.table(cols, schema=self.schema())

    def decode(self, table: pa.Table) -> Iterator[dict[str, Any]]:
        B = table.num_rows
        L = len(table.column("input_ids")[0]) if B else 0
        ids = flat_values(table.column("topk_ids")).reshape(B, L, -1)
        logp = flat_values(table.column("topk_logp")).reshape(B, L, -1)
        counts = flat_values(table.column("counts")).reshape(B, L, -1) if self.kind == "sampled" else None
        for b in range(B):
            yield {"ids": ids[b], "logp": logp[b], "counts": None if counts is None else counts[b]}


# ----------------------------------------------------------------------------- compact


def varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of a non-negative int array, vectorised."""
    v = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    nbytes = np.ones(len(v), dtype=np.int64)
    for j in range(1, 10):
        big = v >= np.uint64(1 << (7 * j))
        if not big.any():
            break
        nbytes += big
    start = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max()) if len(v) else 0):
        sel = nbytes > j
        byte = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        cont = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[start[sel] + j] = (byte | cont).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    last = b < 0x80
    starts = np.concatenate([[0], np.flatnonzero(last)[:-1] + 1])
    if len(starts) != count:
        raise ValueError(f"varint stream holds {len(starts)} values, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    group = np.cumsum(np.concatenate([[0], last[:-1]]))
    shift = (np.arange(len(b)) - starts[group]) * 7
    return np.add.reduceat((b & 0x7F).astype(np.int64) << shift, starts)


def sqrt_levels(logp: np.ndarray) -> np.ndarray:
    """Quantise log-probs to one byte: round(sqrt(p) / s)."""
    return np.clip(np.rint(np.exp(0.5 * logp.astype(np.float64)) / SQRT_STEP), 0, 255).astype(np.uint8)


def level_probs() -> np.ndarray:
    """Decoded probability of each of the 256 levels."""
    q = (np.arange(256) * SQRT_STEP) ** 2
    q[0] = (SQRT_STEP / 4) ** 2
    return q


_LEVEL_LOGP = np.log(level_probs())


class CompactCodec:
    name = "compact"

    def __init__(self, kind: str, vocab: int, id_of_rank: np.ndarray | None = None):
        self.kind, self.vocab = kind, vocab
        self.id_of_rank = id_of_rank
        self.rank_of_id = None if id_of_rank is None else self._invert(id_of_rank)

    def _invert(self, id_of_rank: np.ndarray) -> np.ndarray:
        rank_of_id = np.empty(self.vocab, dtype=np.int64)
        rank_of_id[id_of_rank] = np.arange(self.vocab)
        return rank_of_id

    def schema(self) -> pa.Schema:
        return pa.schema(COMMON + [("payload", pa.binary())])

    def column_encoding(self) -> dict[str, str]:
        return {"window_id": "BYTE_STREAM_SPLIT", "input_ids.list.element": "BYTE_STREAM_SPLIT"}

    def fit(self, ids: np.ndarray) -> None:
        """Rank ids by frequency in the first row group's targets (ties and unseen ids by id)."""
        if self.id_of_rank is not None:
            return
        freq = np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=self.vocab)[: self.vocab]
        self.id_of_rank = np.argsort(-freq, kind="stable").astype(np.int64)
        self.rank_of_id = self._invert(self.id_of_rank)
        self.seen = int((freq > 0).sum())

    def footer(self) -> dict[bytes, bytes]:
        # Only the seen prefix of the ranking is stored; the unseen rest follows in id order.
        assert self.id_of_rank is not None, "fit() before footer()"
        seen = self.seen
        blob = zstandard.ZstdCompressor(level=_ZLEVEL).compress(varint_encode(self.id_of_rank[:seen]))
        return {VOCAB_KEY: str(self.vocab).encode(), RANKMAP_KEY: blob.hex().encode() + b":" + str(seen).encode()}

    @classmethod
    def from_footer(cls, kind: str, meta: dict[bytes, bytes]) -> "CompactCodec":
        vocab = int(meta[VOCAB_KEY])
        blob_hex, seen = meta[RANKMAP_KEY].split(b":")
        prefix = varint_decode(zstandard.ZstdDecompressor().decompress(bytes.fromhex(blob_hex.decode())), int(seen))
        rest_mask = np.ones(vocab, dtype=bool)
        rest_mask[prefix] = False
        return cls(kind, vocab, np.concatenate([prefix, np.flatnonzero(rest_mask)]).astype(np.int64))

    # -- one window

    def encode_window(self, ids: np.ndarray, logp: np.ndarray, counts: np.ndarray | None) -> bytes:
        """ids [L, m], logp [L, m], counts [L, m] | None -> payload bytes."""
        L, m = ids.shape
        valid = np.ones((L, m), dtype=bool) if counts is None else counts > 0
        rank = np.where(valid, self.rank_of_id[ids], np.int64(1) << 40)  # padding sorts last
        order = np.argsort(rank, axis=1, kind="stable")
        rank = np.take_along_axis(rank, order, 1)
        valid = np.take_along_axis(valid, order, 1)
        n = valid.sum(1)  # [L] entries per position
        prev = np.concatenate([np.full((L, 1), -1, dtype=np.int64), rank[:, :-1]], axis=1)
        gaps = (rank - prev - 1)[valid]  # first entry of a position: its rank; then gap - 1
        levels = sqrt_levels(np.take_along_axis(logp, order, 1))[valid]
        zc = zstandard.ZstdCompressor(level=_ZLEVEL)
        n_dtype = np.uint8 if m < 256 else np.uint16
        streams = [n.astype(n_dtype).tobytes(), varint_encode(gaps), levels.tobytes()]
        if counts is not None:
            c = np.take_along_axis(counts, order, 1)[valid]
            streams.append(c.astype(np.uint8 if m < 256 else np.uint16).tobytes())
        else:
            streams.append(b"")
        packed = [zc.compress(s) if s else b"" for s in streams]
        flags = int(counts is not None)
        return _HEADER.pack(_MAGIC, L, m, flags, *map(len, packed)) + b"".join(packed)

    def decode_window(self, payload: bytes) -> dict[str, Any]:
        magic, L, m, flags, *lens = _HEADER.unpack_from(payload)
        if magic != _MAGIC:
            raise ValueError("not a compact payload")
        zd = zstandard.ZstdDecompressor()
        parts, pos = [], _HEADER.size
        for ln in lens:
            parts.append(zd.decompress(payload[pos:pos + ln]) if ln else b"")
            pos += ln
        n = np.frombuffer(parts[0], dtype=np.uint8 if m < 256 else np.uint16).astype(np.int64)
        total = int(n.sum())
        gaps = varint_decode(parts[1], total)
        levels = np.frombuffer(parts[2], dtype=np.uint8)
        # Rank = running sum of (gap + 1) restarted at each position's first entry.
        steps = np.cumsum(gaps + 1)
        row_start = np.concatenate([[0], np.cumsum(n)[:-1]])
        base = np.repeat(np.concatenate([[0], steps])[row_start], n)
        rank = steps - base - 1
        ids_flat = self.id_of_rank[rank].astype(np.int32)
        lp_flat = _LEVEL_LOGP[levels]
        sampled = bool(flags & 1)
        if not sampled and (n == m).all():
            ids = ids_flat.reshape(L, m)
            lp = lp_flat.reshape(L, m)
            lv = levels.reshape(L, m)
            order = np.argsort(-lv.astype(np.int16), axis=1, kind="stable")  # descending prob
            ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
            counts = None
        else:
            slot = np.arange(total) - np.repeat(row_start, n)
            row = np.repeat(np.arange(L), n)
            ids = np.repeat(ids_flat[row_start][:, None], m, 1) if total else np.zeros((L, m), np.int32)
            lp = np.repeat(lp_flat[row_start][:, None], m, 1) if total else np.zeros((L, m))
            ids[row, slot] = ids_flat
            lp[row, slot] = lp_flat
            counts = None
            if sampled:
                c = np.frombuffer(parts[3], dtype=np.uint8 if m < 256 else np.uint16)
                counts = np.zeros((L, m), dtype=np.int16)
                counts[row, slot] = c
        mass = np.exp(lp).sum(1) if counts is None else np.where(counts > 0, np.exp(lp), 0).sum(1)
        lp = lp - np.log(np.maximum(mass, 1.0))[:, None]  # renormalise only where the mass exceeds 1
        return {"ids": ids, "logp": lp.astype(np.float16), "counts": counts}

    # -- rows

    def encode(self, window_ids: list[int], input_ids: np.ndarray, doc_starts: list[list[int]],
               ids: np.ndarray, logp: np.ndarray, counts: np.ndarray | None) -> pa.Table:
        cols = _common_columns(window_ids, input_ids, doc_starts)
        cols["payload"] = pa.array([
            self.encode_window(ids[b], logp[b], None if counts is None else counts[b]) for b in range(len(window_ids))
        ], type=pa.binary())
        return pa.table(cols, schema=self.schema())

    def decode(self, table: pa.Table) -> Iterator[dict[str, Any]]:
        for payload in table.column("payload").to_pylist():
            yield self.decode_window(payload)


CODECS = {"plain": PlainCodec, "compact": CompactCodec}


def make_codec(name: str, kind: str, vocab: int) -> PlainCodec | CompactCodec:
    return CODECS[name](kind, vocab)


def codec_from_footer(name: str, kind: str, meta: dict[bytes, bytes]) -> PlainCodec | CompactCodec:
    if name == "compact":
        return CompactCodec.from_footer(kind, meta)
    return PlainCodec(kind, int(meta.get(VOCAB_KEY, b"0")))
