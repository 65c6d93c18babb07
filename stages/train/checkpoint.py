"""DeepSpeed checkpoints that a killed run can always resume from.

Layout under ``<run>/checkpoints``::

    step-00000040/            DeepSpeed's files (model, optimizer shards per rank)
    step-00000040/hf/         the model config (with this phase's rope_parameters) + tokenizer
    step-00000040/state.json  global step, phase, every rank's data position, train config
    step-00000040/complete    written last, after every rank's save has returned

DeepSpeed's own ``latest`` file can be written by rank 0 before other ranks have finished
their shards, so it is not used: a checkpoint counts only with its ``complete`` marker, and
loading names the tag explicitly. Data positions are gathered from all ranks
(``all_gather_object``) into one JSON list (also passed as DeepSpeed ``client_state``) -
under ZeRO-1/2 DeepSpeed gives every rank rank 0's client_state on load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline.atomic import atomic_write_bytes, atomic_write_json
from pipeline.errors import UserError
from pipeline.fingerprint import differences

MARKER = "complete"
STATE = "state.json"
HF_DIR = "hf"
# Config keys that may change between a checkpoint and its resume without changing the numbers.
RESUME_FREE_KEYS = ("save_every", "keep_checkpoints", "max_skipped_steps", "log_every_s", "prefetch", "launcher", "local_runner",
                    "workers")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file() and (p / STATE).is_file())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint tag directory from itself, a checkpoints root, or a run directory."""
    p = Path(path)
    if (p / MARKER).is_file():
        return p
    for root in (p, p / "checkpoints"):
        tags = complete_tags(root)
        if tags:
            return tags[-1]
    raise UserError(f"{p}: no complete checkpoint here (a step-* directory with a '{MARKER}' marker)")


@dataclass
class ResumePoint:
    tag: Path
    step: int
    phase: int
    data_states: list[Any]



class Checkpointer:
    def __init__(self, root: Path, rank: int, world: int, keep: int, identity: dict[str, Any]):
        self.root, self.rank, self.world, self.keep = Path(root), rank, world, keep
        self.identity = identity  # the config sections a checkpoint must match to be resumed

    def save(self, engine: Any, step: int, phase: int, data_state: Any, model: Any, tokenizer: Any) -> Path:
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, data_state)
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():  # a stale incomplete attempt at this step
            shutil.rmtree(path)
        dist.barrier()
        meta = {"step": step, "phase": phase, "world_size": self.world, "data_states": states,
                "identity": self.identity}
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"posdistill": meta}, save_latest=False)
        if self.rank == 0:
            model.config.save_pretrained(path / HF_DIR)
            tokenizer.save_pretrained(path / HF_DIR)
            atomic_write_json(path / STATE, meta)
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            atomic_write_bytes(path / MARKER, b"")
            for old in complete_tags(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def resume_point(self) -> ResumePoint | None:
        tags = complete_tags(self.root)
        if not tags:
            return None
        tag = tags[-1]
        meta = json.loads((tag / STATE).read_text())
        if meta["world_size"] != self.world:
            raise UserError(f"{tag} was written by {meta['world_size']} ranks, this run has {self.world}: "
                            f"resume with the same train.workers / train.sequence_parallel")
        differ = differences(meta.get("identity", {}), self.identity, skip=RESUME_FREE_KEYS)
        if differ:
            raise UserError(f"{tag} was written with a different config ({', '.join(differ[:8])}); "
                            f"use another student.name / run.out_dir, or delete {self.root}")
        return ResumePoint(tag=tag, step=int(meta["step"]), phase=int(meta["phase"]), data_states=meta["data_states"])

    def load(self, engine: Any, point: ResumePoint) -> Any:
        """Load the engine state of ``point``; returns this rank's data position."""
        load_path, _ = engine.load_checkpoint(str(self.root), tag=point.tag.name, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"{point.tag}: DeepSpeed could not load this checkpoint")
        return point.data_states[self.rank]
