"""What each phase trains on, resolved once and checked before any rank starts.

Every rank recomputes the same plan from the same resolved config, so nothing here may
depend on the rank. ``preflight`` runs in the launching process: bad input (missing or
stale cache, vocabulary mismatch, batch geometry) fails there with one message instead of
once per rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import Config, DataConfig, KDConfig
from pipeline.errors import UserError


@dataclass(frozen=True)
class PhasePlan:
    index: int
    name: str
    window_len: int
    steps: int
    start: int  # global optimizer steps done before this phase
    lr: float
    min_lr_ratio: float
    kd: KDConfig  # train.kd with the phase's overrides applied
    data: DataConfig
    source: Literal["cache", "pack"]  # teacher cache (kd.alpha > 0) or packed windows (alpha 0)

    @property
    def end(self) -> int:
        return self.start + self.steps


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


def run_dir(cfg: Config) -> Path:
    name = (cfg.student.name if cfg.student and cfg.student.name else None) or "student"
    return cfg.out_dir / "train" / name


def model_dir(cfg: Config) -> Path:
    """Where the trained student is exported (a Hugging Face directory)."""
    return run_dir(cfg) / "model"


def resolve_phases(cfg: Config) -> list[PhasePlan]:
    if not cfg.train.phases:
        raise UserError("train.phases: no phases given (a list of {window_len, steps, rope, ...})")
    out, start = [], 0
    for i, ph in enumerate(cfg.train.phases):
        override = ph.kd.model_dump(exclude_none=True) if ph.kd else {}
        kd = cfg.train.kd.model_copy(update=override)
        out.append(PhasePlan(
            index=i, name=ph.name or f"phase{i}", window_len=ph.window_len, steps=ph.steps, start=start,
            lr=ph.lr or cfg.train.lr,
            min_lr_ratio=cfg.train.min_lr_ratio if ph.min_lr_ratio is None else ph.min_lr_ratio, kd=kd, data=ph.data or cfg.data,
            source="cache" if kd.alpha > 0 else "pack"))
        start += ph.steps
    return out


def default_workers() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def geometry(cfg: Config, world: int) -> Geometry:
    t = cfg.train
    sp = t.sequence_parallel
    if world % sp:
        raise UserError(f"train.sequence_parallel {sp} does not divide the world size {world} (train.workers)")
    dp = world // sp
    per_step = t.micro_batch * dp
    if t.batch_size % per_step:
        raise UserError(f"train.batch_size {t.batch_size} is not divisible by train.micro_batch x data-parallel "
                        f"ranks = {t.micro_batch} x {dp} (world {world} / sequence_parallel {sp})")
    return Geometry(world=world, sp=sp, dp=dp, micro_batch=t.micro_batch, grad_accum=t.batch_size // per_step)


def lr_at(phase: PhasePlan, step_in_phase: int, warmup: int) -> float:
    """Linear warmup to the phase's lr, then cosine down to lr * its min_lr_ratio, per phase."""
    min_ratio = phase.min_lr_ratio
    warm = min(warmup, phase.steps)
    if step_in_phase < warm:
        return phase.lr * (step_in_phase + 1) / warm
    span = max(1, phase.steps - warm)
    t = min(1.0, (step_in_phase - warm) / span)
    return phase.lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- data locations


def check_phase_cache(cfg: Config, phase: PhasePlan) -> Path:
    """The phase's teacher cache, complete and computed for exactly this phase's windows.

    The cache directory is named by the fingerprint of its identity, so a config change
    makes the expected directory simply absent; the error then names the fields in which
    the nearest existing cache differs from this phase's config (a stale cache).
    """
    import json

    from stages.cache.reader import differences, check_cache
    from stages.cache.stage import cache_dir_for, cache_identity

    where = f"train.phases[{phase.index}]"
    want = cache_identity(cfg, phase.index)
    path = Path(cache_dir_for(cfg, phase.index))
    if not (path / "manifest.json").is_file():
        nearest: tuple[int, Path, list[str]] | None = None
        for other in sorted(cfg.cache_root.glob("*/manifest.json")) if cfg.cache_root.is_dir() else []:
            try:
                have = json.loads(other.read_text()).get("identity", {})
            except (OSError, json.JSONDecodeError):
                continue
            diff = differences(have, want)
            if nearest is None or len(diff) < nearest[0]:
                nearest = (len(diff), other.parent, diff)
        state = "incomplete (no manifest.json)" if path.is_dir() else "missing"
        msg = f"{where}: its teacher cache {path} is {state}; run `posdistill cache CONFIG` first"
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


def pack_dir_for(cfg: Config, phase: PhasePlan, create: bool) -> Path:
    from stages.pack import is_complete, pack_dir, pack_spec, run_pack

    spec = pack_spec(cfg, phase.index)
    path = pack_dir(cfg, spec)
    if not is_complete(path):
        if not create:
            raise UserError(f"train.phases[{phase.index}]: packed windows {path} are missing; run "
                            f"`posdistill train` (it packs them) or `posdistill pack`")
        run_pack(cfg, spec, verbose=False)
    return path


def data_dir(cfg: Config, phase: PhasePlan, create: bool = False) -> Path:
    return check_phase_cache(cfg, phase) if phase.source == "cache" else pack_dir_for(cfg, phase, create)


# ----------------------------------------------------------------------------- preflight


def preflight(cfg: Config, world: int) -> list[PhasePlan]:
    """Every check that can fail on user input, in the launching process."""
    from stages.rope import plan_phases
    from stages.student import student_config

    phases = resolve_phases(cfg)
    geo = geometry(cfg, world)
    mcfg, fresh = student_config(cfg)  # includes the vocabulary check
    plan_phases(cfg.train.phases, mcfg, fresh)  # validates every phase's rope_parameters
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    if geo.sp > 1:
        heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        if heads % geo.sp or (kv % geo.sp and geo.sp % kv):
            raise UserError(f"train.sequence_parallel {geo.sp} must divide the student's attention heads ({heads}) "
                            f"and divide or be divisible by its key/value heads ({kv})")
        if cfg.pack.mode == "doc_masked" and "flash" not in cfg.student.attn_implementation:
            raise UserError("train.sequence_parallel > 1 with pack.mode doc_masked needs a flash-attention "
                            "student.attn_implementation: Ulysses drops attention masks, so with sdpa packed "
                            "documents would attend to each other")
        if cfg.student.attn_implementation == "eager":
            raise UserError("train.sequence_parallel > 1 needs student.attn_implementation sdpa or flash_attention_*")
    for ph in phases:
        path = data_dir(cfg, ph, create=True)
        n = count_windows(path, ph.source)
        if n < geo.dp:
            raise UserError(f"train.phases[{ph.index}]: {n} windows in {path}, fewer than the {geo.dp} "
                            f"data-parallel ranks")
    return phases


def count_windows(path: Path, source: str) -> int:
    import pyarrow.parquet as pq

    files = sorted(path.glob("windows-*.parquet" if source == "pack" else "shard-*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)
