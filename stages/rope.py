"""Phase-wise RoPE: choose each phase's rotary parameters and rebuild the rotary embedding.

A RoPE head of dimension d rotates pair i (i = 0 .. d/2-1) at frequency theta^(-2i/d), i.e.
with period 2*pi*theta^(2i/d) positions. Pairs whose period fits inside the training window
complete a full rotation during training; the rest only ever see part of a turn.

``rope.theta: auto`` (type ``default``) picks, for a phase of window L after a phase (or a
pretrained student) of window L0 with base theta0:

    theta = max( theta0 ** (ln(L / 2pi) / ln(L0 / 2pi)),      # critical-dimension scaling
                 lower_bound(L, d) )                          # base lower bound

1. Critical-dimension scaling (Liu et al. 2023, "Scaling laws of RoPE-based extrapolation"):
   the number of pairs that complete a full rotation within the window,
   floor((d/2) * ln(L/2pi) / ln(theta)) + 1, stays what it was in the previous phase, so
   each phase uses the same share of the rotational spectrum at its own window (the seed
   paper's principle). The rule composes: scaling 256 -> 1024 -> 4096 equals 256 -> 4096.
2. Lower bound (Men et al. 2024, "Base of RoPE bounds context length"): the smallest base
   for which B(m) = sum_i cos(m * theta^(-2i/d)) >= 0 for every distance m in [0, L]
   (found by an upward scan over theta, like the paper; d = 128 gives 8K -> 8.4e4,
   32K -> 6.3e5). Below it, attention can no longer prefer a similar token far away.

The first phase is anchored on the student itself: ``rope_theta`` and
``max_position_embeddings`` of ``student.init`` (``original_max_position_embeddings`` when
its config already carries a scaling type), or 1e4 at 4096 (Llama 2) for a student built
from ``student.config``. With a scaling type (linear, dynamic, yarn, longrope,
llama3) ``theta: auto`` keeps the previous base and lets the scaling do the extension;
``factor`` defaults to L / original_max_position_embeddings (the previous window).

transformers computes the rotary frequencies when the model is built; changing
``config.rope_parameters`` afterwards changes nothing, so :func:`apply_rope` rebuilds
``model.model.rotary_emb`` from the updated config.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from pipeline.config import PhaseConfig, RopeConfig
from pipeline.errors import UserError

FRESH_ANCHOR = (10_000.0, 4096)  # (theta, window) a config-built student counts as pretrained at
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass(frozen=True)
class RopeAnchor:
    theta: float
    window_len: int


def head_dim_of(model_config: Any) -> int:
    return int(getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads)


def scaled_theta(theta0: float, len0: int, length: int) -> float:
    """Critical-dimension scaling: keep the number of fully rotating pairs constant."""
    a, b = math.log(length / (2 * math.pi)), math.log(len0 / (2 * math.pi))
    if a <= 0 or b <= 0:  # windows under 2*pi positions: nothing rotates; keep the base
        return theta0
    return float(theta0 ** (a / b))


def _bmin_is_nonnegative(theta: float, length: int, head_dim: int, chunk: int = 4096) -> bool:
    freqs = theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)  # [d/2]
    for start in range(0, length + 1, chunk):
        m = np.arange(start, min(length + 1, start + chunk), dtype=np.float64)  # [chunk]
        if np.cos(np.outer(m, freqs)).sum(1).min() < 0:  # B(m) over the chunk
            return False
    return True


@lru_cache(maxsize=64)
def theta_lower_bound(length: int, head_dim: int) -> float:
    """Smallest base with B(m) >= 0 on [0, length], by an upward scan (24 steps per decade,
    then 16 between the last failure and the first success)."""
    step = math.log(10) / 24
    prev = math.log(2.0)
    x = prev
    while x < math.log(1e15):
        if _bmin_is_nonnegative(math.exp(x), length, head_dim):
            break
        prev, x = x, x + step
    else:
        return 1e15
    for y in np.linspace(prev, x, 17)[1:]:
        if _bmin_is_nonnegative(math.exp(y), length, head_dim):
            return float(math.exp(y))
    return float(math.exp(x))


def auto_theta(length: int, head_dim: int, anchor: RopeAnchor) -> float:
    return max(scaled_theta(anchor.theta, anchor.window_len, length), theta_lower_bound(length, head_dim))


def rotating_pairs(inv_freq: Any, length: int) -> int:
    """How many frequency pairs complete a full rotation within ``length`` positions."""
    f = np.asarray(inv_freq.detach().cpu().double() if hasattr(inv_freq, "detach") else inv_freq, dtype=np.float64)
    return int((2 * math.pi / f <= length).sum())


def initial_anchor(model_config: Any, fresh: bool) -> RopeAnchor:
    if fresh:
        return RopeAnchor(*FRESH_ANCHOR)
    params = getattr(model_config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(model_config, "rope_theta", 10_000.0)))
    # A student already extended by a scaling type (e.g. Llama 3.x's llama3) was pretrained
    # at original_max_position_embeddings with this base.
    window = params.get("original_max_position_embeddings") or model_config.max_position_embeddings
    return RopeAnchor(theta, int(window))


def rope_parameters(rope: RopeConfig, window_len: int, anchor: RopeAnchor, head_dim: int,
                    where: str = "rope") -> dict[str, Any]:
    """Complete ``rope_parameters`` for one phase (the dict transformers 5 expects)."""
    if rope.type == "default":
        theta = auto_theta(window_len, head_dim, anchor) if rope.theta == "auto" else float(rope.theta)
        if rope.factor is not None or rope.original_max_position_embeddings is not None:
            raise UserError(f"{where}: factor / original_max_position_embeddings need a scaling type, "
                            f"got type 'default'")
        return {"rope_type": "default", "rope_theta": theta, **rope.extra}
    theta = anchor.theta if rope.theta == "auto" else float(rope.theta)
    original = rope.original_max_position_embeddings or anchor.window_len
    factor = rope.factor if rope.factor is not None else max(1.0, window_len / original)
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": theta, "factor": float(factor)}
    if rope.type in ("yarn", "longrope", "llama3"):
        out["original_max_position_embeddings"] = int(original)
    if rope.type == "llama3":
        out.update(LLAMA3_DEFAULTS)
    out.update(rope.extra)
    return out


def plan_phases(phases: list[PhaseConfig], model_config: Any, fresh: bool) -> list[dict[str, Any]]:
    """``rope_parameters`` of every phase, each anchored on the phase before it."""
    head_dim = head_dim_of(model_config)
    anchor = initial_anchor(model_config, fresh)
    plan = []
    for i, phase in enumerate(phases):
        params = rope_parameters(phase.rope, phase.window_len, anchor, head_dim, where=f"train.phases[{i}].rope")
        plan.append(params)
        anchor = RopeAnchor(params["rope_theta"], phase.window_len)
    return plan


def config_for_phase(model_config: Any, params: dict[str, Any], window_len: int) -> Any:
    """A copy of the model config carrying the phase's rope_parameters (validated)."""
    cfg = copy.deepcopy(model_config)
    cfg.rope_parameters = dict(params)
    if params["rope_type"] == "dynamic":
        # dynamic NTK scales beyond max_position_embeddings: that is the pre-extension length
        cfg.max_position_embeddings = int(window_len / params["factor"])
    else:
        cfg.max_position_embeddings = int(window_len)
    try:
        cfg.validate_rope()
    except (KeyError, ValueError) as err:
        raise UserError(f"rope_parameters {params}: {err}") from None
    return cfg


@dataclass
class RopeReport:
    rope_parameters: dict[str, Any]
    rotating_pairs: int
    total_pairs: int

    def line(self, window_len: int) -> str:
        p = self.rope_parameters
        extra = "" if p["rope_type"] == "default" else f" {p['rope_type']} x{p.get('factor')}"
        return (f"rope: theta {p['rope_theta']:.4g}{extra}; {self.rotating_pairs}/{self.total_pairs} frequency "
                f"pairs complete a full rotation within {window_len} positions")


def apply_rope(model: Any, params: dict[str, Any], window_len: int) -> RopeReport:
    """Write ``params`` into the model's config and rebuild its rotary embedding."""
    new_cfg = config_for_phase(model.config, params, window_len)
    model.config.rope_parameters = new_cfg.rope_parameters
    model.config.max_position_embeddings = new_cfg.max_position_embeddings
    old = model.model.rotary_emb
    new = type(old)(model.config).to(old.inv_freq.device)
    model.model.rotary_emb = new
    pairs = rotating_pairs(new.inv_freq, window_len)
    return RopeReport(dict(model.config.rope_parameters), pairs, new.inv_freq.numel())
