"""Phase-wise RoPE: choose each phase's rotary parameters and rebuild the rotary embedding.

A RoPE head of dimension d rotates pair i (i = 0 .. d/2-1) at frequency theta^(-2i/d), i.e.
with period 2*pi*theta^(2i/d) positions. Pairs whose period fits inside the training window
complete a full rotation during training; the rest only ever see part of a turn.

``rope.theta: auto`` (type ``default``) picks, for a phase of window L after a phase (or a
pretrained student) of window L0 with base theta0:

    theta = max( theta0 ** (ln(L / 2pi) / ln(L0 / 2pi)),      # critical-dimension scaling
                 lower_bound(L, d) )                          # base lower bound

1. Critical-dimension scaling, continuous (Liu et al. 2023, "Scaling laws of RoPE-based
   extrapolation"): theta_new = theta_old ^ (log(L_new/2pi) / log(L_old/2pi)). It keeps
   x = (d/2) * log_theta(L/2pi), the (fractional) number of pairs whose wavelength
   2pi * theta^(2i/d) fits in the window, the same as in the previous phase, so each phase
   uses the same share of the rotational spectrum at its own window (the seed paper's
   principle). The rule composes: scaling 256 -> 1024 -> 4096 equals 256 -> 4096.
   ``rope.theta: auto_discrete`` is the discrete variant (see :func:`discrete_scaled_theta`):
   it rounds x up to whole pairs, the critical dimension
   d_c = 2 * ceil((d/2) * log_theta_old(L_old/2pi)), and puts the wavelength of pair d_c/2
   (the first pair that did not complete a turn in L_old) exactly at L_new:
   theta_new = (L_new/2pi) ^ (d/d_c). The same lower bound applies to both.
2. Lower bound (Men et al. 2024, "Base of RoPE bounds context length"): the smallest base
   for which B(m) = sum_i cos(m * theta^(-2i/d)) >= 0 for every distance m in [0, L]. Below
   it, attention can no longer prefer a similar token far away. The condition is not
   monotone in theta (narrow passing islands lie below wide failing stretches), so the bound
   is the smallest passing point of a fixed log grid theta_j = 2 * 1.001^j (0.1% steps),
   refined by bisection to 1e-4 inside the bracket (theta_{j-1}, theta_j]; d = 128 gives
   4K -> 2.70e4, 8K -> 8.38e4, 32K -> 6.30e5, 64K -> 2.09e6, 128K -> 4.87e6. A 1% grid
   steps over islands (it gives 2.87e4, 8.41e4, 9.44e5, 2.24e6, 8.77e6).

The first phase is anchored on the student itself: ``rope_theta`` and
``max_position_embeddings`` of ``student.init`` (``original_max_position_embeddings`` when
its config already carries a scaling type), or 1e4 at 4096 (Llama 2) for a student built
from ``student.config``. With a scaling type (linear, dynamic, yarn, longrope,
llama3) ``theta: auto`` (or ``auto_discrete``) keeps the previous base and lets the scaling
do the extension; ``factor`` defaults to L / original_max_position_embeddings (the previous window).

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


GRID_START, GRID_RATIO = 2.0, 1.001  # the lower bound's log grid: theta_j = 2 * 1.001^j
_GRID_END = 1e15


class _BoundCheck:
    """B(m) >= 0 on [0, length] for one theta at a time, for an upward scan over theta.

    A failing theta usually fails where a nearby one failed, so the distances m where recent
    thetas went negative are checked first, then the chunks of m in most-recently-failed
    order; a pass still evaluates every m (the answer is exact, only the order is a guess)."""

    def __init__(self, length: int, head_dim: int, chunk: int = 2048):
        self.exponents = -2.0 * np.arange(head_dim // 2) / head_dim  # [d/2]
        self.length, self.chunk = length, chunk
        self.witnesses = np.zeros(0)  # [<= 256] distances where a recent theta failed
        self.order = list(range(0, length + 1, chunk))  # chunk starts

    def passes(self, theta: float) -> bool:
        freqs = theta ** self.exponents  # [d/2]
        if self.witnesses.size and np.cos(np.outer(self.witnesses, freqs)).sum(1).min() < 0:
            return False
        for k, start in enumerate(self.order):
            m = np.arange(start, min(self.length + 1, start + self.chunk), dtype=np.float64)  # [chunk]
            b = np.cos(np.outer(m, freqs)).sum(1)  # B(m) over the chunk
            i = int(b.argmin())
            if b[i] < 0:
                self.witnesses = np.append(self.witnesses[-255:], m[i])
                self.order.insert(0, self.order.pop(k))
                return False
        return True


def grid_theta(j: int) -> float:
    """The j-th point of the lower bound's grid (computed directly, not by repeated products)."""
    return GRID_START * math.exp(j * math.log(GRID_RATIO))


@lru_cache(maxsize=64)
def theta_lower_bound(length: int, head_dim: int) -> float:
    """Smallest base with B(m) >= 0 on [0, length]: the first passing point theta_j of the
    log grid, then bisection (in log theta, to 1e-4) between theta_{j-1}, which fails, and
    theta_j, which passes; the result is a passing theta in (theta_{j-1}, theta_j]."""
    check = _BoundCheck(length, head_dim)
    j = 0
    while not check.passes(grid_theta(j)):
        j += 1
        if grid_theta(j) > _GRID_END:
            return _GRID_END
    if j == 0:
        return grid_theta(0)
    lo, hi = grid_theta(j - 1), grid_theta(j)
    while hi / lo > 1.0 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if check.passes(mid) else (mid, hi)
    return float(hi)


def critical_dimension(theta: float, length: int, head_dim: int) -> int:
    """d_c = 2 * ceil((d/2) * log_theta(L/2pi)): pairs 0 .. d_c/2 - 1 have wavelength
    2pi * theta^(2i/d) <= L (they complete a turn within L); pair d_c/2 is the first that
    does not (or, when x = (d/2) log_theta(L/2pi) is an integer, exactly does)."""
    x = (head_dim / 2) * math.log(length / (2 * math.pi)) / math.log(theta)
    return 2 * math.ceil(x - 1e-12)


def discrete_scaled_theta(theta0: float, len0: int, length: int, head_dim: int, where: str = "rope") -> float:
    """Discrete critical-dimension scaling (``theta: auto_discrete``).

    Derivation: pair i turns with wavelength lambda_i = 2pi * theta^(2i/d). At the previous
    phase (theta0, L0) the pairs i < d_c/2 complete a turn and pair d_c/2 does not, d_c as in
    :func:`critical_dimension`. Keep exactly those pairs rotating at the new window L:
    lambda_{d_c/2}(theta) = 2pi * theta^(d_c/d) = L  =>  theta = (L/2pi)^(d/d_c). Then pair
    d_c/2 has wavelength L (>= L: it is nudged up by an ulp if rounding lands below) and pair
    d_c/2 - 1 has 2pi * (L/2pi)^((d_c-2)/d_c) < L, since L/2pi > 1.
    """
    if length <= 2 * math.pi or len0 <= 2 * math.pi:
        return theta0  # windows under 2pi positions: nothing rotates; keep the base
    d_c = critical_dimension(theta0, len0, head_dim)
    if d_c <= 0 or d_c >= head_dim:
        raise UserError(f"{where}.theta: auto_discrete needs a critical dimension inside the head: at theta "
                        f"{theta0:.4g} and window {len0}, d_c = {d_c} of head_dim {head_dim}; set theta "
                        f"explicitly or use auto")
    theta = (length / (2 * math.pi)) ** (head_dim / d_c)
    while 2 * math.pi * theta ** (d_c / head_dim) < length:
        theta = float(np.nextafter(theta, math.inf))
    return float(theta)


def auto_theta(length: int, head_dim: int, anchor: RopeAnchor, discrete: bool = False, where: str = "rope") -> float:
    """``theta: auto`` (continuous scaling) or ``auto_discrete``, never below the lower bound."""
    scaled = (discrete_scaled_theta(anchor.theta, anchor.window_len, length, head_dim, where) if discrete
              else scaled_theta(anchor.theta, anchor.window_len, length))
    return max(scaled, theta_lower_bound(length, head_dim))


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
        theta = (auto_theta(window_len, head_dim, anchor, rope.theta == "auto_discrete", where)
                 if isinstance(rope.theta, str) else float(rope.theta))
        if rope.factor is not None or rope.original_max_position_embeddings is not None:
            raise UserError(f"{where}: factor / original_max_position_embeddings need a scaling type, "
                            f"got type 'default'")
        return {"rope_type": "default", "rope_theta": theta, **rope.extra}
    theta = anchor.theta if isinstance(rope.theta, str) else float(rope.theta)  # auto*: keep the base
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
