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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

Tail = Literal["bucket", "renormalize"]
IGNORE = -100
_TINY = torch.finfo(torch.float32).tiny
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
    """x * log_y with 0 * (-inf) = 0 (a zero-probability bucket contributes nothing)."""
    return torch.where(x > 0, x * y_log, torch.zeros_like(x))


def _tile_terms(z: Tensor, targets: KDTargets | None, labels: Tensor, tail: Tail, tau: float,
                kd_coef: float, ce_coef: float, want_grad: bool,
                recompute: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
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
    under = None
    zt = z.mul_(1.0 / tau) if tau != 1.0 else z  # [T, V], z is no longer needed
    lse = torch.logsumexp(zt, dim=-1, keepdim=True)  # [T, 1]
    logq_k = zt.gather(1, ids) - lse  # [T, m]
    if tau == 1.0:
        ce_sum = ((lse - zt.gather(1, y)).squeeze(1) * ce_valid).sum()
    q = zt.sub_(lse).exp_()  # [T, V] student probabilities at tau (in place)
    q_k = logq_k.exp()  # [T, m]

    if targets.weights is not None:  # sampled cache: importance-weighted Monte-Carlo KL
        w = targets.weights.float()  # [T, m]
        kl = (w * (logp - logq_k)).sum(1)  # [T]
        dense = w.sum(1)  # [T]
        set_k = None
        add_k = -w
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
        q_mass = q_k.sum(1)  # [T]
        # Direct sum over the non-top-k probabilities (see the module docstring).
        # Zeroing q at K in place is safe: those entries of the gradient are set from q_k below.
        q_tail = q.scatter_(1, ids, 0.0).sum(1)  # [T]
        log_q_tail = q_tail.clamp_min(_TINY).log()
        dense = p_mass - p_tail * q_mass / q_tail.clamp_min(_TINY)  # [T]
        # Rows whose tail underflows fp32 (a very confident student): redo the tail in log space.
        under = (q_tail < _UNDERFLOW).nonzero().squeeze(1)  # [u]
        if under.numel():
            zu = recompute(under).mul_(1.0 / tau)  # [u, V]
            zu.scatter_(1, ids[under], float("-inf"))
            lse_tail = torch.logsumexp(zu, dim=-1, keepdim=True)  # [u, 1]
            log_q_tail[under] = (lse_tail - lse[under]).squeeze(1)
            dense[under] = p_mass[under]
            tail_dist = zu.sub_(lse_tail).exp_()  # [u, V] q_v / q_tail over the non-top-k ids
        kl = _xlogy(p, logp - logq_k).sum(1) + _xlogy(p_tail, p_tail.clamp_min(1e-45).log() - log_q_tail)
        set_k = q_k * (p_mass + p_tail).unsqueeze(1) - p
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
                kd_coef: float, ce_coef: float, tile: int, want_grad: bool):
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
            kd_s, ce_s, g = _tile_terms(z, tgt, labels[s:e], tail, tau, kd_coef, ce_coef, want_grad, recompute)
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
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def tiled_kd_loss(hidden: Tensor, weight: Tensor, labels: Tensor, targets: KDTargets | None = None, *,
                  alpha: float = 1.0, temperature: float = 1.0, tail: Tail = "bucket", tile: int = 1024,
                  kd_norm: float | None = None, ce_norm: float | None = None, scale: float = 1.0) -> KDLossOutput:
    """The KD/CE mixture for N positions without building [N, V] logits.

    hidden: [N, H] final hidden states (after the last norm); weight: [V, H] the lm_head weight;
    labels: [N] next-token ids, -100 where there is none; targets: teacher values for the same N
    positions, or None for a plain next-token step (then ``alpha`` must be 0).
    ``kd_norm``/``ce_norm`` divide the sums (default: the local counts). A sequence-parallel
    rank passes the whole window's counts: DeepSpeed sums gradients over the ranks of a
    sequence-parallel group (and averages over data-parallel groups), so the group's
    gradient is then exactly the unsplit window's. ``scale`` multiplies the loss.
    """
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
    loss, kd_sum, ce_sum = _TiledKDLoss.apply(hidden, weight, labels, ids, logp, weights, tail,
                                              float(temperature), kd_coef, ce_coef, int(tile), want_grad)
    return KDLossOutput(loss, kd_sum.detach(), ce_sum.detach(), kd_count, ce_count)


def naive_kd_loss(hidden: Tensor, weight: Tensor, labels: Tensor, targets: KDTargets | None = None, *,
                  alpha: float = 1.0, temperature: float = 1.0, tail: Tail = "bucket") -> Tensor:
    """The same loss through full [N, V] logits and autograd: the float64 reference in tests
    and the baseline of ``bench/kd_loss_memory.py``."""
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
        kl = (targets.weights.to(z.dtype) * (logp - logq_k)).sum(1)
    elif tail == "renormalize":
        lp = logp - torch.logsumexp(logp, 1, keepdim=True)
        lq = logq_k - torch.logsumexp(logq_k, 1, keepdim=True)
        kl = (lp.exp() * (lp - lq)).sum(1)
    else:
        p = logp.exp()
        p_tail = (1 - p.sum(1)).clamp_min(0)
        mask = torch.ones_like(logq, dtype=torch.bool).scatter_(1, ids, False)
        logq_tail = torch.logsumexp(logq.masked_fill(~mask, float("-inf")), dim=1)
        kl = _xlogy(p, logp - logq_k).sum(1) + _xlogy(p_tail, p_tail.clamp_min(1e-300).log() - logq_tail)
    kd = kl.mean()
    return alpha * temperature ** 2 * kd + (1.0 - alpha) * ce
