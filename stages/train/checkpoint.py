"""DeepSpeed checkpoints that a killed run can always resume from.

Layout under ``<run>/checkpoints``::

    step-00000040/            DeepSpeed's files (model, optimizer shards per rank)
    step-00000040/hf/         the model config (with this phase's rope_parameters) + tokenizer
    step-00000040/state.json  global step, phase, every rank's data position, train config
    step-00000040/complete    written last, after every rank's save has returned: the name
                              and size of every file of the checkpoint

DeepSpeed's own ``latest`` file can be written by rank 0 before other ranks have finished
their shards, so it is not used: a checkpoint counts only with its ``complete`` marker, and
loading names the tag explicitly. Data positions are gathered from all ranks
(``all_gather_object``) into one JSON list (also passed as DeepSpeed ``client_state``) -
under ZeRO-1/2 DeepSpeed gives every rank rank 0's client_state on load.

Resume and export take the newest checkpoint that is *intact* — every file its marker lists
is there with its size, and every zip member's CRC checks out — and say which newer one was
skipped and why. Loading never unpickles arbitrary objects: ``torch.load`` runs with
``weights_only=True`` and only the few plain-data DeepSpeed classes its files hold.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import zipfile
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


def _safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed's checkpoint files contain: plain data, no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading() -> Any:
    """Every ``torch.load`` inside (DeepSpeed's engine, ``zero_to_fp32``) runs with
    ``weights_only=True``: a checkpoint someone else wrote cannot run code when loaded."""
    import pickle

    import torch

    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0][:200]
            raise UserError(f"{f}: refused to load this checkpoint file: it holds objects other than tensors "
                            f"and plain data ({first})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def damage(tag: Path) -> str | None:
    """Why the checkpoint ``tag`` cannot be loaded (a missing, resized or corrupt file), or None."""
    try:
        listed = json.loads((tag / MARKER).read_text() or "{}").get("files")
    except (OSError, ValueError, AttributeError):
        return f"its '{MARKER}' marker is unreadable"
    if listed:
        for name, size in listed.items():
            f = tag / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for f in sorted(tag.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as err:
            return f"{f.name} is not readable ({err})"
        if bad is not None:
            return f"{f.name} is corrupt (member {bad})"
    return None


def intact_tags(root: Path, say: Any = None) -> list[Path]:
    """Complete checkpoints, oldest first, from the newest intact one down (a damaged newer one
    is reported through ``say`` and skipped)."""
    tags = complete_tags(root)
    while tags:
        why = damage(tags[-1])
        if why is None:
            return tags
        bad, tags = tags[-1], tags[:-1]
        if say is not None:
            say(f"train: checkpoint {bad.name} is damaged ({why}); "
                + (f"using the previous complete one, {tags[-1].name}" if tags else "no earlier complete checkpoint"))
    return []


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file() and (p / STATE).is_file())


def discard_incomplete(root: Path) -> None:
    """Remove the ``step-*`` directories without a marker, once no rank writes any more: a save
    that failed (a full disk) is never loaded, and its files would hold the space a re-run needs."""
    if root.is_dir():
        for tag in root.glob("step-*"):
            if tag.is_dir() and not (tag / MARKER).is_file():
                shutil.rmtree(tag, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint tag directory from itself, a checkpoints root, or a run directory."""
    p = Path(path)
    if (p / MARKER).is_file():
        return p
    for root in (p, p / "checkpoints"):
        tags = intact_tags(root, say=lambda m: print(m, file=sys.stderr, flush=True))
        if tags:
            return tags[-1]
        if complete_tags(root):
            raise UserError(f"{root}: every complete checkpoint here is damaged ({damage(complete_tags(root)[-1])})")
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
            files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
            atomic_write_bytes(path / MARKER, json.dumps({"files": files}, indent=1).encode())
            for old in complete_tags(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def resume_point(self) -> ResumePoint | None:
        """The newest intact checkpoint; rank 0 decides and every rank takes its choice."""
        choice: list[Any] = [None]
        if self.rank == 0:
            tags = intact_tags(self.root, say=lambda m: print(m, file=sys.stderr, flush=True))
            if tags and self._stale(tags[-1]):
                tags = []
            choice[0] = str(tags[-1]) if tags else None
        if dist.is_initialized():
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        tag = Path(choice[0])
        meta = json.loads((tag / STATE).read_text())
        if meta["world_size"] != self.world:
            raise UserError(f"{tag} was written by {meta['world_size']} ranks, this run has {self.world}: "
                            f"resume with the same train.workers / train.sequence_parallel")
        differ = differences(meta.get("identity", {}), self.identity, skip=RESUME_FREE_KEYS)
        if differ:
            raise UserError(f"{tag} was written with a different config ({', '.join(differ[:8])}); "
                            f"use another student.name / run.out_dir, or delete {self.root}")
        return ResumePoint(tag=tag, step=int(meta["step"]), phase=int(meta["phase"]), data_states=meta["data_states"])

    def _stale(self, tag: Path) -> bool:
        """True (and the checkpoints removed) when ``tag`` was trained on other inputs than this
        run's: a pack, cache or parent student upstream changed, so the graph re-runs this node
        and nothing of the old training may be continued or exported."""
        have = json.loads((tag / STATE).read_text()).get("identity", {})
        if have.get("inputs") == self.identity.get("inputs") or \
                differences({**have, "inputs": None}, {**self.identity, "inputs": None}, skip=RESUME_FREE_KEYS):
            return False  # same inputs, or another config: resume_point says which
        print(f"train: the checkpoints in {self.root} were trained on other inputs (an upstream pack, "
              "cache or parent student changed); training afresh", file=sys.stderr, flush=True)
        for old in sorted(self.root.glob("step-*")):  # ours: tag directories this class writes
            shutil.rmtree(old)
        return True

    def load(self, engine: Any, point: ResumePoint) -> Any:
        """Load the engine state of ``point``; returns this rank's data position."""
        with weights_only_loading():
            load_path, _ = engine.load_checkpoint(str(self.root), tag=point.tag.name, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"{point.tag}: DeepSpeed could not load this checkpoint")
        return point.data_states[self.rank]
