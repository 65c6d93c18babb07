"""Pack stage: short documents -> Parquet windows of exactly ``window_len`` tokens.

Documents are tokenized (BOS first when the tokenizer has one), cut into chunks of at most
``doc_len[1]`` tokens (chunks shorter than ``doc_len[0]`` are dropped and counted), shuffled
through a seeded bounded buffer, and concatenated into one stream that is cut into windows.
A chunk may continue into the next window; the stream's last partial window is discarded.

Output (DESIGN.md contract), one row per window:
    window_id int64, input_ids list<int32>, doc_starts list<int32> (0 is always a start)
``cross_doc``: positions 0..L-1, attention crosses documents.
``doc_masked``: positions restart at every doc start and documents attend only to themselves.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from pipeline.progress import Progress, human
from pipeline.resources import require_memory
from stages.corpus import iter_texts, periodic_documents
from stages.specs import PackSpec
from stages.tokenizer import PIECE_CHARS, TextEncoder

SCHEMA = pa.schema([
    ("window_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("doc_starts", pa.list_(pa.int32())),
])
META_FILE = "pack.json"
_TOKENIZE_BATCH = 256


def is_complete(out: Path) -> bool:
    return (out / META_FILE).is_file()


def read_meta(out: Path) -> dict:
    return json.loads((out / META_FILE).read_text())


def window_files(out: Path) -> list[Path]:
    return sorted(out.glob("windows-*.parquet"))


@dataclass
class PackStats:
    docs_read: int = 0
    docs_kept: int = 0
    docs_dropped: int = 0
    rows_null_text: int = 0  # records whose text field is null (dropped)
    rows_empty_text: int = 0  # records whose text field is "" (dropped)
    chunks_kept: int = 0
    chunks_dropped: int = 0
    tokens_read: int = 0
    tokens_dropped_short: int = 0
    tokens_in_windows: int = 0
    tokens_discarded_tail: int = 0
    windows: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.tokens_read / max(self.seconds, 1e-9)
        rows = (f"rows dropped {self.rows_null_text} null text, {self.rows_empty_text} empty text; "
                if self.rows_null_text or self.rows_empty_text else "")
        return (f"pack: {rows}docs read {self.docs_read}, kept {self.docs_kept}, dropped {self.docs_dropped} "
                f"(chunks dropped {self.chunks_dropped}, {self.tokens_dropped_short} tokens); "
                f"tokens {self.tokens_read} -> {self.windows} windows ({self.tokens_in_windows} tokens), "
                f"tail discarded {self.tokens_discarded_tail} tokens; "
                f"{human(rate)} tokens/s in {self.seconds:.1f}s")


def _token_documents(spec: PackSpec, drops: dict[str, int]) -> Iterator[Iterator[np.ndarray]]:
    """Documents as token ids in parts (BOS first when the tokenizer has one): a document of up
    to ``PIECE_CHARS`` characters in one part, encoded in a batch with others; a longer one
    streamed part by part, so memory does not grow with a document's length."""
    encoder = TextEncoder.load(spec.data.tokenizer)
    lo, hi = spec.pack.doc_len
    bos = [encoder.bos_token_id] if encoder.bos_token_id is not None else []
    # Synthetic lengths are in characters (periodic ones in ids); leave room for BOS so a
    # doc is one chunk.
    doc_len = (lo, max(lo, hi - len(bos)))
    if spec.data.source == "periodic":
        if spec.data.periodic.alphabet_size > encoder.vocab_size:
            raise UserError(f"data.periodic.alphabet_size {spec.data.periodic.alphabet_size} exceeds the "
                            f"vocabulary of {spec.data.tokenizer} ({encoder.vocab_size} ids)")
        for ids in periodic_documents(spec.data.periodic, doc_len, spec.seed):
            yield iter((np.asarray(bos + ids, dtype=np.int32),))
        return
    head = np.asarray(bos, dtype=np.int32)
    batch: list[str] = []
    size = 0

    def flush() -> Iterator[Iterator[np.ndarray]]:
        nonlocal size
        for ids in encoder.batch(batch):
            yield iter((np.concatenate([head, ids]) if len(head) else ids,))
        batch.clear()
        size = 0

    for doc in iter_texts(spec.data, doc_len, spec.seed, drops):
        held: list[str] = []
        n = 0
        for piece in doc:
            held.append(piece)
            n += len(piece)
            if n > PIECE_CHARS:
                break
        else:
            batch.append("".join(held))
            size += n
            if len(batch) == _TOKENIZE_BATCH or size >= PIECE_CHARS:
                yield from flush()
            continue
        yield from flush()
        yield itertools.chain([head], encoder.stream(itertools.chain(held, doc)))
    yield from flush()


def _chunks(spec: PackSpec, stats: PackStats, progress: Progress) -> Iterator[np.ndarray]:
    """Tokenized, chunked documents in corpus order; each chunk its own array, so what the
    shuffle buffer holds is bounded by its size, not by the documents the chunks came from."""
    lo, hi = spec.pack.doc_len
    drops: dict[str, int] = {}
    for doc in _token_documents(spec, drops):
        stats.docs_read += 1
        n = 0
        kept = False
        rest = np.empty(0, dtype=np.int32)
        for part in doc:
            stats.tokens_read += len(part)
            n += len(part)
            arr = np.concatenate([rest, part]) if len(rest) else part
            whole = len(arr) - len(arr) % hi
            for start in range(0, whole, hi):
                kept = True
                stats.chunks_kept += 1
                yield arr[start:start + hi].copy()
            rest = arr[whole:]
        if len(rest) >= lo:
            kept = True
            stats.chunks_kept += 1
            yield rest.copy()
        elif len(rest):
            stats.chunks_dropped += 1
            stats.tokens_dropped_short += len(rest)
        stats.docs_kept += kept
        stats.docs_dropped += not kept
        progress.update(1, n)
        stats.rows_null_text, stats.rows_empty_text = drops.get("null_text", 0), drops.get("empty_text", 0)
    stats.rows_null_text, stats.rows_empty_text = drops.get("null_text", 0), drops.get("empty_text", 0)


def _shuffled(items: Iterator[np.ndarray], buffer: int, rng: random.Random) -> Iterator[np.ndarray]:
    """Seeded reservoir-style shuffle in bounded memory."""
    buf: list[np.ndarray] = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.randrange(buffer)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _windows(chunks: Iterator[np.ndarray], window_len: int, stats: PackStats) -> Iterator[tuple[np.ndarray, list[int]]]:
    buf = np.empty(window_len, dtype=np.int32)
    fill, starts = 0, []
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            if pos == 0 or fill == 0:
                starts.append(fill)  # a new document, or a document continuing into this window
            n = min(len(chunk) - pos, window_len - fill)
            buf[fill:fill + n] = chunk[pos:pos + n]
            fill += n
            pos += n
            if fill == window_len:
                yield buf.copy(), starts
                fill, starts = 0, []
    stats.tokens_discarded_tail = fill


def _layout(window_len: int) -> tuple[int, int]:
    """(windows per file, windows per row group): ~32M tokens per file, ~4M per row group."""
    per_group = max(1, min(64, (4 << 20) // window_len))
    per_file = max(per_group, ((32 << 20) // window_len) // per_group * per_group)
    return per_file, per_group


def write_windows(spec: PackSpec, out: Path, progress: Progress) -> PackStats:
    stats = PackStats()
    t0 = time.monotonic()
    per_file, per_group = _layout(spec.pack.window_len)
    # A row group of windows, its concatenation for Parquet, and the window being filled.
    require_memory("pack.window_len", 4 * spec.pack.window_len * (2 * per_group + 1),
                   f"packing windows of {spec.pack.window_len:,} tokens")
    meta = {b"posdistill.fingerprint": spec.fingerprint().encode(),
            b"posdistill.mode": spec.pack.mode.encode()}
    writer: pq.ParquetWriter | None = None
    rows: list[tuple[np.ndarray, list[int]]] = []
    file_index = 0

    def flush() -> None:
        nonlocal writer
        if not rows:
            return
        first = stats.windows - len(rows)
        ids = np.concatenate([r[0] for r in rows])
        offsets = np.arange(0, len(ids) + 1, spec.pack.window_len, dtype=np.int32)
        starts = [r[1] for r in rows]
        table = pa.table({
            "window_id": pa.array(np.arange(first, stats.windows, dtype=np.int64)),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids, type=pa.int32())),
            "doc_starts": pa.array(starts, type=pa.list_(pa.int32())),
        }, schema=SCHEMA.with_metadata(meta))
        writer.write_table(table, row_group_size=per_group)
        rows.clear()

    chunks = _shuffled(_chunks(spec, stats, progress), spec.pack.shuffle_buffer, random.Random(spec.seed))
    for window, starts in _windows(chunks, spec.pack.window_len, stats):
        if writer is None or stats.windows % per_file == 0:
            flush()
            if writer is not None:
                writer.close()
            writer = pq.ParquetWriter(out / f"windows-{file_index:05d}.parquet", SCHEMA.with_metadata(meta),
                                      compression="zstd", compression_level=3)
            file_index += 1
        rows.append((window, starts))
        stats.windows += 1
        if len(rows) == per_group:
            flush()
        if stats.windows == spec.pack.max_windows:  # the budget: read no more of the corpus
            break
    flush()
    if writer is not None:
        writer.close()
    stats.tokens_in_windows = stats.windows * spec.pack.window_len
    stats.seconds = time.monotonic() - t0
    return stats


def run_pack(spec: PackSpec, out: Path, verbose: bool = True) -> Path:
    """Pack the windows of ``spec`` into ``out`` (which appears only when complete)."""
    if is_complete(out):
        return out
    progress = Progress("pack", None, unit="docs", enabled=verbose)
    with atomic_dir(out, "pack") as tmp:
        stats = write_windows(spec, tmp, progress)
        progress.close()
        if stats.docs_read == 0:
            raise UserError(f"data.source: '{spec.data.source}' yielded no documents")
        if stats.windows == 0:
            raise UserError(f"data.source: '{spec.data.source}' has {stats.tokens_read} tokens in kept documents, "
                            f"fewer than one window of pack.window_len={spec.pack.window_len}")
        (tmp / META_FILE).write_text(json.dumps({
            "fingerprint": spec.fingerprint(),
            "identity": spec.identity(),
            "spec": spec.describe(),
            "stats": asdict(stats),
        }, indent=2))
    if verbose:
        print(stats.summary())
        if spec.pack.max_windows and stats.windows < spec.pack.max_windows:
            print(f"pack: the corpus gave {stats.windows} windows, fewer than the {spec.pack.max_windows} its phases "
                  "consume: they are read more than once")
    return out
