"""Write one cache shard so that a reader sees either nothing or a complete, valid file.

The shard is written under a temporary name in the cache directory, its footer gets the
fingerprint and ``posdistill.complete = "1"``, the file is fsynced, renamed into place and
the directory fsynced. A process killed at any moment leaves at most a hidden temp file
(``.shard-*.tmp-*``), which the next run deletes; the completion flag is written only by a
successful close, so a file without it is never taken for a shard.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import fsync_dir
from stages.cache.codec import CompactCodec, PlainCodec

FINGERPRINT_KEY = b"posdistill.fingerprint"
COMPLETE_KEY = b"posdistill.complete"
CODEC_KEY = b"posdistill.codec"
KIND_KEY = b"posdistill.kind"
SHARD_KEY = b"posdistill.shard"
TEMP_GLOB = ".shard-*.tmp-*"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


class CacheWriter:
    """Row groups of encoded windows into one shard; ``close()`` publishes it."""

    def __init__(self, final: Path, codec: PlainCodec | CompactCodec, fingerprint: str, shard_index: int):
        self.final = Path(final)
        self.codec = codec
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        meta = {FINGERPRINT_KEY: fingerprint.encode(), CODEC_KEY: codec.name.encode(),
                KIND_KEY: codec.kind.encode(), SHARD_KEY: str(shard_index).encode()}
        self.schema = codec.schema().with_metadata(meta)
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def _open(self) -> pq.ParquetWriter:
        # The compact payload is zstd inside already; compressing it twice only costs time.
        # Per-column options are keyed by leaf path ("topk_ids.list.element"); a top-level
        # name of a nested column is silently ignored.
        leaves = [f.name + (".list.element" if pa.types.is_list(f.type) else "") for f in self.schema]
        compression = {c: ("none" if c == "payload" else "zstd") for c in leaves}
        level = {c: 3 for c in leaves if c != "payload"}
        return pq.ParquetWriter(
            self.tmp, self.schema, compression=compression, compression_level=level, use_dictionary=False,
            column_encoding=self.codec.column_encoding(), write_page_checksum=True, write_statistics=["window_id"],
        )

    def write(self, window_ids: list[int], input_ids: np.ndarray, doc_starts: list[list[int]],
              ids: np.ndarray, logp: np.ndarray, counts: np.ndarray | None) -> None:
        """One row group: ids [B, L, m] int32, logp [B, L, m] float32, counts int16 | None."""
        if self._writer is None:
            self.codec.fit(ids)
            self._writer = self._open()
        table = self.codec.encode(window_ids, input_ids, doc_starts, ids, logp, counts)
        self._writer.write_table(table.replace_schema_metadata(self.schema.metadata),
                                 row_group_size=max(1, table.num_rows))
        self.rows += table.num_rows

    def close(self) -> int:
        """Write the footer with the completion flag, fsync, rename into place; returns bytes."""
        if self._writer is None:
            raise ValueError("an empty shard cannot be published")
        self._writer.add_key_value_metadata({**self.codec.footer(), COMPLETE_KEY: b"1"})
        self._writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final.stat().st_size

    def abort(self) -> None:
        """Drop the temp file; closing a writer whose write failed (a full disk) may fail too."""
        try:
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)
