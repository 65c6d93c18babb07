"""Checks and arithmetic of a training run, done before any rank starts.

The phases arrive resolved (``stages.specs.PhaseSpec``); every rank computes the same
geometry and learning rates from the same spec, so nothing here may depend on the rank.
``preflight`` runs in the launching process: bad input (missing or stale cache, vocabulary
mismatch, batch geometry) fails there with one message instead of once per rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from stages.specs import PhaseSpec, TrainSpec

MODEL_DIR = "model"  # the exported Hugging Face directory inside a run directory


@dataclass(frozen=True)
class Geometry:
    """How the world splits: ``sp`` ranks share a window, ``dp`` groups read different ones."""

    world: int
    sp: int
    dp: int
    micro_batch: int
    grad_accum: int

    def dp_rank(self, rank: int) -> int:
        return rank // self.sp  # Ulysses groups are consecutive ranks

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp


def default_workers() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def geometry(t: TrainConfig, world: int) -> Geometry:
    sp = t.sequence_parallel
    if world % sp:
        raise UserError(f"train.sequence_parallel {sp} does not divide the world size {world} (train.workers)")
    dp = world // sp
    per_step = t.micro_batch * dp
    if t.batch_size % per_step:
        raise UserError(f"train.batch_size {t.batch_size} is not divisible by train.micro_batch x data-parallel "
                        f"ranks = {t.micro_batch} x {dp} (world {world} / sequence_parallel {sp})")
    return Geometry(world=world, sp=sp, dp=dp, micro_batch=t.micro_batch, grad_accum=t.batch_size // per_step)


def lr_at(phase: PhaseSpec, step_in_phase: int, warmup: int) -> float:
    """Linear warmup to the phase's lr, then cosine down to lr * its min_lr_ratio, per phase."""
    min_ratio = phase.min_lr_ratio
    warm = min(warmup, phase.steps)
    if step_in_phase < warm:
        return phase.lr * (step_in_phase + 1) / warm
    span = max(1, phase.steps - warm)
    t = min(1.0, (step_in_phase - warm) / span)
    return phase.lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- inputs


def check_phase_cache(phase: PhaseSpec, path: Path) -> Path:
    """The phase's teacher cache, complete and computed for exactly this phase's windows.

    The cache directory is named by the fingerprint of its identity, so a changed input makes
    the expected directory simply absent; the error then names the fields in which the
    nearest existing cache differs from this phase's spec (a stale cache).
    """
    import json

    from pipeline.fingerprint import differences
    from stages.cache.reader import check_cache

    where = f"phases[{phase.index}] ({phase.name})"
    assert phase.cache is not None
    want = phase.cache.identity()
    if not (path / "manifest.json").is_file():
        nearest: tuple[int, Path, list[str]] | None = None
        for other in sorted(path.parent.glob("*/manifest.json")) if path.parent.is_dir() else []:
            try:
                have = json.loads(other.read_text()).get("identity", {})
            except (OSError, json.JSONDecodeError):
                continue
            diff = differences(have, want)
            if nearest is None or len(diff) < nearest[0]:
                nearest = (len(diff), other.parent, diff)
        state = "incomplete (no manifest.json)" if path.is_dir() else "missing"
        msg = (f"{where}: its teacher cache {path} is {state}; `posdistill train CONFIG` builds it "
               "(or `posdistill cache CONFIG`)")
        if nearest is not None:
            msg += f". The cache at {nearest[1]} is stale for this phase; differing fields: " + "; ".join(nearest[2])
        raise UserError(msg)
    manifest = check_cache(path, want)
    from stages.kd_loss import check_loss_for_cache, check_temperature

    check_temperature(phase.kd, manifest.get("temperature", phase.kd.temperature), f"{where}.kd")
    check_loss_for_cache(phase.kd, manifest.get("kind", "topk"), f"{where}.kd")
    if manifest.get("window_len") not in (None, phase.window_len):
        raise UserError(f"{where}.window_len {phase.window_len} differs from the window length "
                        f"{manifest['window_len']} of its cache {path}")
    return path


def check_inputs(phase: PhaseSpec, path: Path) -> Path:
    from stages.pack import is_complete

    if phase.source == "cache":
        return check_phase_cache(phase, path)
    if not is_complete(path):
        raise UserError(f"phases[{phase.index}] ({phase.name}): packed windows {path} are missing; "
                        "`posdistill train CONFIG` packs them (or `posdistill pack CONFIG`)")
    return path


# ----------------------------------------------------------------------------- preflight


def check_train(spec: TrainSpec, workers: int) -> None:
    """The seed, a student.config's sizes, the trackers' packages, batch geometry, precision, the
    DeepSpeed config and whether each KD phase's cache can be shared by the ranks, before
    anything computes (the graph's check of a train node)."""
    import json
    import math

    import torch

    from stages.attention import check_backend
    from stages.student import check_arch, check_hf_arch, check_student_seed
    from stages.train.ds_config import deepspeed_config
    from stages.train.metrics import check_trackers

    check_student_seed(spec)
    if spec.student.config is not None:
        check_arch(spec.student.config.model_dump(), "student.config.")
    init = spec.student.init
    if spec.init_from is None and init is not None and (Path(init) / "config.json").is_file():
        try:  # a Hub id's (or a parent's export's) sizes are checked by preflight, before any rank
            conf = json.loads((Path(init) / "config.json").read_text())
        except (OSError, ValueError):
            conf = None  # preflight names an unreadable config
        if isinstance(conf, dict):
            check_hf_arch(conf, init)
    check_trackers(spec.train.report_to)  # a missing wandb / mlflow fails here, not at step 1
    geo = geometry(spec.train, workers)
    deepspeed_config(spec.train, geo, gpu=torch.cuda.is_available())
    check_backend(spec.student.attn_implementation, "student.attn_implementation",
                  "cuda" if torch.cuda.is_available() else "cpu", training=True)
    for ph in spec.phases:
        if ph.cache is None or not ph.pack.pack.max_windows:
            continue
        groups = math.ceil(ph.pack.pack.max_windows / ph.cache.cache.windows_per_row_group)
        if groups < geo.dp:
            raise UserError(f"phases[{ph.index}] ({ph.name}): its cache would hold {ph.pack.pack.max_windows} windows "
                            f"in {groups} row group(s) of cache.windows_per_row_group="
                            f"{ph.cache.cache.windows_per_row_group}, fewer than the {geo.dp} data-parallel ranks "
                            "that share them: lower cache.windows_per_row_group, or give the phase more windows")


def preflight(spec: TrainSpec, inputs: dict[int, Path], world: int) -> None:
    """Every check that can fail on user input, in the launching process."""
    from stages.rope import plan_phases
    from stages.student import student_config

    geo = geometry(spec.train, world)
    check_train(spec, world)  # precision, DeepSpeed JSON conflicts, cache row groups
    mcfg, fresh = student_config(spec)  # includes the vocabulary check
    plan_phases(list(spec.phases), mcfg, fresh)  # validates every phase's rope_parameters
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    attn = spec.student.attn_implementation
    if geo.sp > 1:
        heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        if heads % geo.sp or (kv % geo.sp and geo.sp % kv):
            raise UserError(f"train.sequence_parallel {geo.sp} must divide the student's attention heads ({heads}) "
                            f"and divide or be divisible by its key/value heads ({kv})")
        if spec.mode == "doc_masked" and "flash" not in attn:
            raise UserError("train.sequence_parallel > 1 with pack.mode doc_masked needs a flash-attention "
                            "student.attn_implementation: Ulysses drops attention masks, so with sdpa packed "
                            "documents would attend to each other")
        if attn == "eager":
            raise UserError("train.sequence_parallel > 1 needs student.attn_implementation sdpa or flash_attention_*")
    for ph in spec.phases:
        if ph.index not in inputs:
            raise UserError(f"phases[{ph.index}] ({ph.name}): no input directory given")
        path = check_inputs(ph, Path(inputs[ph.index]))
        n = count_windows(path, ph.source)
        if n < geo.dp:
            raise UserError(f"phases[{ph.index}] ({ph.name}): {n} windows in {path}, fewer than the {geo.dp} "
                            f"data-parallel ranks")


def count_windows(path: Path, source: str) -> int:
    import pyarrow.parquet as pq

    files = sorted(path.glob("windows-*.parquet" if source == "pack" else "shard-*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)
