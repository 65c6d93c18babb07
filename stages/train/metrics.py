"""One record per optimizer step: ``metrics.jsonl`` and TensorBoard scalars that mirror it.

On resume, records after the checkpoint's step are dropped (those steps are trained again),
so the file always holds exactly one record per step of the run so far.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes

FILE = "metrics.jsonl"
FIELDS = ("phase", "step", "loss", "kd", "ce", "lr", "tokens", "tokens_per_s")


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    p = Path(run) / FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Written by rank 0 only (other ranks get a no-op instance)."""

    def __init__(self, run: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(run) / FILE
        self.tb = None
        if not enabled:
            return
        keep = [r for r in read_metrics(run) if r.get("step", 0) <= resume_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        self.f = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run) / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional at runtime
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("phase", "step") and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.f.close()
        if self.tb is not None:
            self.tb.close()
