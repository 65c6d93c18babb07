"""Sparse knowledge-distillation loss computed tile by tile from the final hidden states.

The student's logits for a long window are never materialised: for each tile of
``tile`` positions we compute ``z = h W^T`` ([tile, V]), the loss terms, and the exact
gradient with respect to ``z``, and turn that into the gradients of ``h`` ([tile, H]) and
``W`` ([V, H], accumulated). Peak memory is O(tile * V + N * H + V * H), not O(N * V).
Computing the gradient inside the forward (as fused linear cross-entropy kernels do) costs
the same three matmuls per tile as autograd on full logits, so the time stays level too.

Notation, per position t (``tau`` = ``kd.temperature``):
  q   = softmax(z / tau)                           student distribution at the KD temperature
  K   = the cached ids (top-k, or sampled ids)      p_j = exp(logp_j), the teacher's cached values
  P   = sum_j p_j,   p_tail = max(0, 1 - P)         (tail bucket: the mass outside the top-k)
  Q   = sum_j q_{K_j},  q_tail = sum_{v not in K} q_v

Targets ("tail" setting; sampled caches ignore it):
  bucket       KL = sum_j p_j (log p_j - log q_j) + p_tail (log p_tail - log q_tail)
               (k+1 buckets in teacher and student alike; the default)
  renormalize  KL = sum_j p^_j (log p^_j - log q^_j),  p^ = p / P,  q^ = q_K / Q
  sampled      KL ~ sum_j w_j (log p_j - log q_j),  w_j = count_j / S: the Monte-Carlo
               estimate of E_{x~p}[log p(x) - log q(x)] from S teacher draws (unbiased,
               and so is its gradient); padding entries have count 0.

  loss = alpha * tau^2 * mean_t KL_t  +  (1 - alpha) * mean_t CE_t,   CE_t = -log softmax(z)_{y_t}

Divergences (``kd.loss``), per position over the buckets b (the k+1 of "bucket" or the k
renormalised ones), with p_b the teacher's and q_b the student's bucket probabilities and
m_b = beta p_b + (1 - beta) q_b (``kd.beta`` in (0, 1)):
  forward_kl   KL(p || q)   = sum_b p_b (log p_b - log q_b)                      (the default)
  reverse_kl   KL(q || p)   = sum_b q_b (log q_b - log p~_b),  p~_b = max(p_b, 2^-126): the
               teacher is floored at the fp32 normal minimum so that a bucket the teacher
               rounded to 0 (a tail of 1 - sum(top-k) <= 0) costs ~87 q_b instead of inf
  jsd          beta KL(p || m) + (1 - beta) KL(q || m)   (TRL's generalised JSD; at beta 0.5
               the Jensen-Shannon divergence, <= log 2; in general <= H(beta))
  tvd          (1/2) sum_b |p_b - q_b|   (in [0, 1])
  skew_kl      KL(p || m) = sum_b p_b (log p_b - log m_b)   (beta -> 0 is forward KL; <= -log beta since m >= beta p)
Merging the non-top-k ids into one bucket can only lower a divergence (data processing
inequality): the bucket value is a lower bound of the full-vocabulary one. Sampled caches
define only forward_kl (the Monte-Carlo estimate of E_p[log p - log q] needs nothing but
log q at teacher draws); reverse_kl, jsd, tvd and skew_kl need p and q on the same buckets
and are refused for sampled caches (UserError naming kd.loss).

When the cached ids cover the whole vocabulary (k >= V) the tail bucket is empty: its
teacher mass 1 - sum(p), positive by fp rounding only, is set to 0 (it used to meet a
student tail of exactly 0 and make forward KL inf).

``tau^2`` keeps the KD gradient's scale independent of the temperature (Hinton et al.);
the teacher values are used as cached (at ``cache.temperature``). ``alpha = 0`` runs the
same function, with or without targets, and is the plain next-token baseline.

q_tail is summed over the non-top-k probabilities directly instead of ``1 - Q`` (or
log1mexp(log Q)): once a student puts nearly all its mass on the top-k, ``log Q`` is within
fp32 rounding of 0 and any function of it, however stable, loses the tail; the direct sum
keeps full relative precision at the cost of one pass over the tile. Rows whose tail sum
underflows fp32 altogether (< 1e-30) are recomputed as a logsumexp over the non-top-k logits.

Gradients with respect to z / tau (derived in docs/train.md), per position:
  bucket       v in K:  q_v (P + p_tail) - p_v       v not in K:  q_v (P - p_tail Q / q_tail)
  renormalize  v in K:  q^_v - p^_v                   v not in K:  0
  sampled      q_v sum_j w_j - sum_j w_j [K_j = v]
  CE (tau=1)   q_v - [v = y]
  other losses, with g_b = dD/dq_b and d q_b / d z_v = q_v ([v in b] - q_b):
               bucket  q_v (g_b(v) - sum_b q_b g_b)     (b(v): v's own bucket, the tail off K)
               renorm  v in K: q^_v (g_v - sum_b q^_b g_b)     v not in K: 0
               g_b: reverse_kl log q_b - log p~_b + 1;  jsd (1-beta)(log q_b - log m_b);
                    tvd sign(q_b - p_b) / 2;  skew_kl -(1-beta) p_b / m_b
               (a constant added to every g_b cancels, so the +1 is dropped and g is centred
               on the most probable bucket: precise when the student is confident)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import KDConfig

Tail = Literal["bucket", "renormalize"]
Loss = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"]
SAMPLED_LOSSES = ("forward_kl",)
IGNORE = -100
_TINY = torch.finfo(torch.float32).tiny
_LOG_TINY = math.log(_TINY)
_UNDERFLOW = 1e-30  # a tail sum below this is recomputed in log space


@dataclass
class KDTargets:
    """Teacher targets for N positions: ``ids`` [N, m] int, ``logp`` [N, m] teacher log-probs,
    ``weights`` [N, m] = count/S for sampled caches (None for top-k caches)."""

    ids: Tensor
    logp: Tensor
    weights: Tensor | None = None


@dataclass
class KDLossOutput:
    loss: Tensor  # scalar, differentiable: alpha*tau^2*KD + (1-alpha)*CE, normalised
    kd_sum: Tensor  # scalar, detached: sum over positions of KL (no tau^2)
    ce_sum: Tensor  # scalar, detached: sum over labelled positions of CE
    kd_count: int
    ce_count: int


def _xlogy(x: Tensor, y_log: Tensor) -> Tensor:
    """x * log_y with 0 * (-inf) = 0 (a zero-probability bucket contributes nothing); a NaN x
    stays NaN (``x * 0``), so a bad target shows in the loss instead of vanishing."""
    return torch.where(x > 0, x * y_log, x * 0.0)


def _divergence(loss: Loss, beta: float, lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """D [T] and g_b = dD/dq_b [T, B] (up to a constant per row, which the gradient cancels
    because sum_b q_b = 1) for bucket log-probabilities ``lp``, ``lq`` [T, B]. Entries may be
    -inf: an empty bucket contributes nothing to D, and its g is 0 (it multiplies q_b = 0)."""
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros_like(lp)
    has_q = lq > float("-inf")
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(1), 0.5 * torch.sign(q - p)
    if loss == "reverse_kl":
        r = torch.where(has_q, lq - lp.clamp_min(_LOG_TINY), zero)  # dD/dq_b - 1
        return (q * r).sum(1), r
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))  # [T, B] log m
    kl_p = torch.where(p > 0, p * (lp - lm), zero)  # terms of KL(p || m)
    if loss == "skew_kl":
        return kl_p.sum(1), torch.where(p > 0, -(1.0 - beta) * (lp - lm).exp(), zero)
    if loss == "jsd":
        r = torch.where(has_q, lq - lm, zero)
        return beta * kl_p.sum(1) + (1.0 - beta) * (q * r).sum(1), (1.0 - beta) * r
    raise ValueError(f"unknown kd loss {loss!r}")


def _centred(g: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """(g_b - g_*, C) with * the row's most probable bucket and C = sum_b q_b (g_b - g_*): the
    gradient q_v (g_b(v) - sum_b q_b g_b) = q_v ((g_b(v) - g_*) - C). Centring on the largest
    q_b keeps it precise for a confident student, where sum_b q_b g_b ~ g_* to fp32 rounding
    and the plain difference would cancel to noise."""
    q = lq.exp()
    dg = g - g.gather(1, q.argmax(1, keepdim=True))  # [T, B]
    return dg, (q * dg).sum(1)


def _empty_tail(ids: Tensor, vocab: int) -> Tensor | None:
    """[T] bool: rows whose cached ids cover the whole vocabulary (None when m < V: none can)."""
    if ids.shape[1] < vocab:
        return None
    return torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device).scatter_(1, ids, True).all(1)


def _tile_terms(z: Tensor, targets: KDTargets | None, labels: Tensor, tail: Tail, tau: float,
                kd_coef: float, ce_coef: float, want_grad: bool,
                recompute: Callable[[Tensor], Tensor], loss: Loss = "forward_kl",
                beta: float = 0.5) -> tuple[Tensor, Tensor, Tensor | None]:
    """Loss sums and d(loss)/dz for one tile. ``z``: [T, V] float32 logits (consumed in place);
    ``recompute(rows)`` gives those rows' logits again (rare: tail underflow).

    ``kd_coef``/``ce_coef`` are the weights of one position's KL / CE in the loss (normaliser,
    alpha and tau^2 folded in). Returns (kd_sum, ce_sum, grad_z [T, V] or None).
    """
    T = z.shape[0]
    ce_valid = labels != IGNORE  # [T]
    y = torch.where(ce_valid, labels, torch.zeros_like(labels)).unsqueeze(1)  # [T, 1]
    ce_sum = z.new_zeros(())
    kd_sum = z.new_zeros(())

    # CE at temperature 1; with tau == 1 the KD softmax below is the same one.
    q1 = None
    if tau != 1.0 or targets is None:
        lse1 = torch.logsumexp(z, dim=-1, keepdim=True)  # [T, 1]
        ce_sum = ((lse1 - z.gather(1, y)).squeeze(1) * ce_valid).sum()
        if want_grad and ce_coef != 0.0 and bool(ce_valid.any()):
            q1 = (z - lse1).exp_()  # [T, V]
    if targets is None:
        if q1 is None:
            return kd_sum, ce_sum, (torch.zeros_like(z) if want_grad else None)
        g = q1.mul_((ce_coef * ce_valid).unsqueeze(1))
        g.scatter_add_(1, y, (-ce_coef * ce_valid.float()).unsqueeze(1))
        return kd_sum, ce_sum, g

    ids = targets.ids.long()  # [T, m]
    logp = targets.logp.float()  # [T, m]
    empty = _empty_tail(ids, z.shape[1])  # [T] or None
    under = None
    zt = z.mul_(1.0 / tau) if tau != 1.0 else z  # [T, V], z is no longer needed
    lse = torch.logsumexp(zt, dim=-1, keepdim=True)  # [T, 1]
    logq_k = zt.gather(1, ids) - lse  # [T, m]
    if tau == 1.0:
        ce_sum = ((lse - zt.gather(1, y)).squeeze(1) * ce_valid).sum()
    q = zt.sub_(lse).exp_()  # [T, V] student probabilities at tau (in place)
    q_k = logq_k.exp()  # [T, m]

    if targets.weights is not None:  # sampled cache: importance-weighted Monte-Carlo KL
        if loss not in SAMPLED_LOSSES:
            raise UserError(_sampled_refusal(loss))
        w = targets.weights.float()  # [T, m]
        kl = (w * (logp - logq_k)).sum(1)  # [T]
        dense = w.sum(1)  # [T]
        set_k = None
        add_k = -w
    elif tail == "renormalize" and loss != "forward_kl":
        lp_b = logp - torch.logsumexp(logp, dim=1, keepdim=True)  # [T, m] log p^
        lq_b = logq_k - torch.logsumexp(logq_k, dim=1, keepdim=True)  # [T, m] log q^
        kl, g_b = _divergence(loss, beta, lp_b, lq_b)  # [T], [T, m]
        dg, C = _centred(g_b, lq_b)
        dense = torch.zeros(T, device=z.device)
        set_k = lq_b.exp() * (dg - C.unsqueeze(1))
        add_k = None
    elif tail == "renormalize":
        log_p_mass = torch.logsumexp(logp, dim=1, keepdim=True)  # [T, 1] log P
        log_q_mass = torch.logsumexp(logq_k, dim=1, keepdim=True)  # [T, 1] log Q
        p_hat = (logp - log_p_mass).exp()  # [T, m]
        kl = _xlogy(p_hat, (logp - log_p_mass) - (logq_k - log_q_mass)).sum(1)
        dense = torch.zeros(T, device=z.device)
        set_k = (logq_k - log_q_mass).exp() - p_hat
        add_k = None
    else:  # tail bucket
        p = logp.exp()  # [T, m]
        p_mass = p.sum(1)  # [T]
        p_tail = (1.0 - p_mass).clamp_min(0.0)  # [T]
        if empty is not None:  # no id outside the cache: the tail is rounding, not mass
            p_tail = p_tail.masked_fill(empty, 0.0)
        q_mass = q_k.sum(1)  # [T]
        # Direct sum over the non-top-k probabilities (see the module docstring).
        # Zeroing q at K in place is safe: those entries of the gradient are set from q_k below.
        q_tail = q.scatter_(1, ids, 0.0).sum(1)  # [T]
        log_q_tail = q_tail.clamp_min(_TINY).log()
        dense = p_mass - p_tail * q_mass / q_tail.clamp_min(_TINY)  # [T]
        # Rows whose tail underflows fp32 (a very confident student): redo the tail in log space.
        low = q_tail < _UNDERFLOW
        under = (low if empty is None else low & ~empty).nonzero().squeeze(1)  # [u]
        if under.numel():
            zu = recompute(under).mul_(1.0 / tau)  # [u, V]
            zu.scatter_(1, ids[under], float("-inf"))
            lse_tail = torch.logsumexp(zu, dim=-1, keepdim=True)  # [u, 1]
            log_q_tail[under] = (lse_tail - lse[under]).squeeze(1)
            dense[under] = p_mass[under]
            tail_dist = zu.sub_(lse_tail).exp_()  # [u, V] q_v / q_tail over the non-top-k ids
        if empty is not None:
            log_q_tail = log_q_tail.masked_fill(empty, float("-inf"))
        if loss == "forward_kl":
            kl = _xlogy(p, logp - logq_k).sum(1) + _xlogy(p_tail, p_tail.clamp_min(1e-45).log() - log_q_tail)
            set_k = q_k * (p_mass + p_tail).unsqueeze(1) - p
        else:  # the k+1 buckets: top-k entries and the tail
            lp_b = torch.cat([logp, p_tail.log().unsqueeze(1)], 1)  # [T, m+1]
            lq_b = torch.cat([logq_k, log_q_tail.unsqueeze(1)], 1)  # [T, m+1]
            kl, g_b = _divergence(loss, beta, lp_b, lq_b)
            dg, C = _centred(g_b, lq_b)
            # q_v is exact for every v (only the tail's sum needed log space), so no tail_dist
            dense = dg[:, -1] - C
            under = None
            set_k = q_k * (dg[:, :-1] - C.unsqueeze(1))
        add_k = None
    kd_sum = kl.sum()
    if not want_grad:
        return kd_sum, ce_sum, None

    # d(loss)/dz: kd_coef already holds tau^2, and d(z/tau)/dz = 1/tau.
    kd_g = kd_coef / tau
    ce_shared = ce_coef if tau == 1.0 else 0.0  # CE rides on q when tau == 1
    g = q.mul_((kd_g * dense).unsqueeze(1) + (ce_shared * ce_valid).unsqueeze(1))  # [T, V]
    if under is not None and under.numel():
        g[under] -= (kd_g * p_tail[under] * q_mass[under]).unsqueeze(1) * tail_dist
    if set_k is not None:
        g.scatter_(1, ids, kd_g * set_k + ce_shared * ce_valid.unsqueeze(1) * q_k)
    if add_k is not None:
        g.scatter_add_(1, ids, kd_g * add_k)
    if q1 is not None:
        g.add_(q1.mul_((ce_coef * ce_valid).unsqueeze(1)))
    if ce_coef != 0.0:
        g.scatter_add_(1, y, (-ce_coef * ce_valid.float()).unsqueeze(1))
    return kd_sum, ce_sum, g


class _TiledKDLoss(torch.autograd.Function):
    """Loss and its gradients in one tiled pass; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ids: Tensor | None,
                logp: Tensor | None, weights: Tensor | None, tail: Tail, tau: float,
                kd_coef: float, ce_coef: float, tile: int, want_grad: bool, loss: Loss, beta: float):
        N = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if want_grad else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, N, tile):
            e = min(N, s + tile)
            h = hidden[s:e]  # [T, H]
            z = (h @ weight.t()).float()  # [T, V]
            tgt = None if ids is None else KDTargets(ids[s:e], logp[s:e], None if weights is None else weights[s:e])
            recompute = lambda rows, h=h: (h[rows] @ weight.t()).float()  # noqa: E731
            kd_s, ce_s, g = _tile_terms(z, tgt, labels[s:e], tail, tau, kd_coef, ce_coef, want_grad, recompute,
                                        loss, beta)
            kd_total += kd_s
            ce_total += ce_s
            if g is not None:
                g = g.to(hidden.dtype)  # [T, V]
                torch.matmul(g, weight, out=grad_h[s:e])  # [T, H]
                if grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), h)  # [V, H]
                else:  # bf16 compute, fp32 accumulation across tiles
                    grad_w.add_(g.t() @ h)
            del z, g
        loss = kd_coef * kd_total + ce_coef * ce_total
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.want_grad = want_grad
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _gkd: Tensor, _gce: Tensor):
        if not ctx.want_grad:
            raise RuntimeError("tiled_kd_loss was called without gradients enabled")
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_w * grad_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None, None, None


def tiled_kd_loss(hidden: Tensor, weight: Tensor, labels: Tensor, targets: KDTargets | None = None, *,
                  alpha: float = 1.0, temperature: float = 1.0, tail: Tail = "bucket", tile: int = 1024,
                  kd_norm: float | None = None, ce_norm: float | None = None, scale: float = 1.0,
                  loss: Loss = "forward_kl", beta: float = 0.5) -> KDLossOutput:
    """The KD/CE mixture for N positions without building [N, V] logits.

    hidden: [N, H] final hidden states (after the last norm); weight: [V, H] the lm_head weight;
    labels: [N] next-token ids, -100 where there is none; targets: teacher values for the same N
    positions, or None for a plain next-token step (then ``alpha`` must be 0).
    ``kd_norm``/``ce_norm`` divide the sums (default: the local counts). A sequence-parallel
    rank passes the whole window's counts: DeepSpeed sums gradients over the ranks of a
    sequence-parallel group (and averages over data-parallel groups), so the group's
    gradient is then exactly the unsplit window's. ``scale`` multiplies the loss.
    ``loss``/``beta``: the divergence of ``kd.loss`` (module docstring); sampled targets take
    forward_kl only.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if targets is not None and targets.weights is not None and loss not in SAMPLED_LOSSES:
        raise UserError(_sampled_refusal(loss))
    if targets is None and alpha != 0.0:
        raise ValueError("alpha > 0 needs teacher targets")
    N = hidden.shape[0]
    if labels.shape != (N,):
        raise ValueError(f"labels must be [N]={N}, got {tuple(labels.shape)}")
    kd_count = N if targets is not None else 0
    ce_count = int((labels != IGNORE).sum())
    kd_den = float(kd_norm if kd_norm is not None else max(kd_count, 1))
    ce_den = float(ce_norm if ce_norm is not None else max(ce_count, 1))
    kd_coef = scale * alpha * temperature ** 2 / kd_den
    ce_coef = scale * (1.0 - alpha) / ce_den
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    ids = logp = weights = None
    if targets is not None:
        ids, logp, weights = targets.ids, targets.logp, targets.weights
        if ids.shape[0] != N or logp.shape != ids.shape or (weights is not None and weights.shape != ids.shape):
            raise ValueError(f"targets must be [N={N}, m]; got ids {tuple(ids.shape)}, logp {tuple(logp.shape)}")
    total, kd_sum, ce_sum = _TiledKDLoss.apply(hidden, weight, labels, ids, logp, weights, tail,
                                               float(temperature), kd_coef, ce_coef, int(tile), want_grad,
                                               loss, float(beta))
    return KDLossOutput(total, kd_sum.detach(), ce_sum.detach(), kd_count, ce_count)


def _sampled_refusal(loss: str) -> str:
    return (f"train.kd.loss: {loss} is not defined for a sampled teacher cache (only "
            f"{', '.join(SAMPLED_LOSSES)}: the other divergences need the teacher's and the student's "
            f"probabilities on the same buckets); use a topk cache or kd.loss: forward_kl")


def check_loss_for_cache(kd: "KDConfig", cache_kind: str, where: str) -> None:
    """Refuse, before training starts, a divergence the phase's cache cannot give."""
    if cache_kind == "sampled" and kd.loss not in SAMPLED_LOSSES:
        raise UserError(f"{where}: " + _sampled_refusal(kd.loss))


def check_temperature(kd: "KDConfig", cache_temperature: float, where: str) -> None:
    """The student's KD temperature must be the one the teacher's values were cached at.

    The cached log-probs are softmax(teacher / cache.temperature); a student softened with a
    different tau is then matched against a distribution at another temperature, which is
    rarely what was meant (``kd.allow_temperature_mismatch: true`` says it is)."""
    if kd.allow_temperature_mismatch or math.isclose(kd.temperature, float(cache_temperature), rel_tol=1e-9):
        return
    raise UserError(f"{where}: train.kd.temperature {kd.temperature} differs from the teacher cache's "
                    f"temperature {cache_temperature}; cache at the same temperature, or set "
                    f"train.kd.allow_temperature_mismatch: true")


def _reference_divergence(loss: Loss, beta: float, lp: Tensor, lq: Tensor) -> Tensor:
    """D [N] through autograd, written from the definitions (the test reference)."""
    p, q = lp.exp(), lq.exp()
    if loss == "forward_kl":
        return _xlogy(p, lp - lq).sum(1)
    if loss == "reverse_kl":
        return (q * (lq - lp.clamp_min(_LOG_TINY))).sum(1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(1)
    m = beta * p + (1 - beta) * q
    kl_pm = _xlogy(p, lp - m.log()).sum(1)
    if loss == "skew_kl":
        return kl_pm
    return beta * kl_pm + (1 - beta) * (q * (lq - m.log())).sum(1)


def naive_kd_loss(hidden: Tensor, weight: Tensor, labels: Tensor, targets: KDTargets | None = None, *,
                  alpha: float = 1.0, temperature: float = 1.0, tail: Tail = "bucket",
                  loss: Loss = "forward_kl", beta: float = 0.5) -> Tensor:
    """The same loss through full [N, V] logits and autograd: the float64 reference in tests
    (``bench/kd_loss_memory.py`` compares with DeepSpeed's TiledFusedLogitsLoss and a plain one-log-softmax loss)."""
    z = hidden @ weight.t()  # [N, V]
    valid = labels != IGNORE
    logq1 = torch.log_softmax(z, dim=-1)
    ce = -(logq1.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1) * valid).sum() / max(int(valid.sum()), 1)
    if targets is None:
        return (1.0 - alpha) * ce
    ids = targets.ids.long()
    logp = targets.logp.to(z.dtype)
    logq = torch.log_softmax(z / temperature, dim=-1)  # [N, V]
    logq_k = logq.gather(1, ids)  # [N, m]
    if targets.weights is not None:
        if loss not in SAMPLED_LOSSES:
            raise UserError(_sampled_refusal(loss))
        kl = (targets.weights.to(z.dtype) * (logp - logq_k)).sum(1)
    elif tail == "renormalize":
        lp = logp - torch.logsumexp(logp, 1, keepdim=True)
        lq = logq_k - torch.logsumexp(logq_k, 1, keepdim=True)
        kl = _reference_divergence(loss, beta, lp, lq)
    elif ids.shape[1] >= z.shape[1]:  # the ids cover the vocabulary: no tail bucket
        kl = _reference_divergence(loss, beta, logp, logq_k)
    else:
        p = logp.exp()
        p_tail = (1 - p.sum(1)).clamp_min(0)
        mask = torch.ones_like(logq, dtype=torch.bool).scatter_(1, ids, False)
        logq_tail = torch.logsumexp(logq.masked_fill(~mask, float("-inf")), dim=1)
        lp_b = torch.cat([logp, p_tail.clamp_min(1e-300).log().unsqueeze(1)], 1)
        kl = _reference_divergence(loss, beta, lp_b, torch.cat([logq_k, logq_tail.unsqueeze(1)], 1))
    kd = kl.mean()
    return alpha * temperature ** 2 * kd + (1.0 - alpha) * ce
