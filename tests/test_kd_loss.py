"""The tiled KD loss against a float64 full-logits reference: value and gradients."""

import pytest
import torch

from stages.kd_loss import KDTargets, naive_kd_loss, tiled_kd_loss

N, H, V, K = 300, 32, 500, 16


def _inputs(kind: str, seed: int = 0, sharp: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g) * 0.5 * sharp
    w = torch.randn(V, H, generator=g) * 0.5
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)  # [N, V]
    labels = torch.randint(0, V, (N,), generator=g)
    labels[-1] = labels[7] = -100
    if kind == "topk":
        v, i = teacher.topk(K, -1)
        return h, w, labels, KDTargets(i.int(), v.half())
    S = 16  # sampled: S draws per position, distinct ids with counts, zero-count padding
    draws = torch.multinomial(teacher.exp(), S, replacement=True, generator=g)
    ids = torch.zeros(N, S, dtype=torch.int32)
    counts = torch.zeros(N, S)
    for t in range(N):
        u, c = draws[t].unique(return_counts=True)
        ids[t, :len(u)], counts[t, :len(u)] = u.int(), c.float()
    return h, w, labels, KDTargets(ids, teacher.gather(1, ids.long()).half(), counts / S)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("tau,alpha", [(1.0, 1.0), (2.0, 0.5), (0.7, 0.0), (1.0, 0.3)])
def test_matches_float64_reference(kind, tail, tau, alpha):
    h, w, labels, tgt = _inputs(kind)
    h32, w32 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = tiled_kd_loss(h32, w32, labels, tgt, alpha=alpha, temperature=tau, tail=tail, tile=64)
    out.loss.backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    tgt64 = KDTargets(tgt.ids, tgt.logp.double(), None if tgt.weights is None else tgt.weights.double())
    ref = naive_kd_loss(h64, w64, labels, tgt64, alpha=alpha, temperature=tau, tail=tail)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(h32.grad, h64.grad) <= 1e-5
    assert _rel(w32.grad, w64.grad) <= 1e-5
    assert out.ce_count == N - 2 and out.kd_count == N


def test_tile_size_does_not_change_the_result():
    h, w, labels, tgt = _inputs("topk", seed=1)
    grads = []
    for tile in (7, 64, N):
        hh = h.clone().requires_grad_()
        out = tiled_kd_loss(hh, w, labels, tgt, alpha=0.5, tile=tile)
        out.loss.backward()
        grads.append((out.loss.item(), hh.grad))
    for loss, g in grads[1:]:
        assert abs(loss - grads[0][0]) < 1e-6 and torch.allclose(g, grads[0][1], atol=1e-6)


@pytest.mark.parametrize("scale", [2.0, 3.0])
def test_tail_bucket_stays_exact_when_the_student_is_confident(scale):
    """Student mass almost all on the cached ids: at scale 2 the tail is ~1e-11 (1 - sum(q_k)
    rounds to 0 in fp32), at scale 3 it underflows fp32 in most rows (~e^-58)."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(N, H, generator=g) * scale, torch.randn(V, H, generator=g) * scale
    ids = (h @ w.t()).topk(K, -1).indices.int()  # the teacher's top-k = the student's own top-k
    logp = torch.log_softmax(torch.randn(N, K, generator=g), -1) + torch.log(torch.tensor(0.99))  # 1% tail
    tgt = KDTargets(ids, logp)
    labels = torch.randint(0, V, (N,), generator=g)
    h32 = h.clone().requires_grad_()
    out = tiled_kd_loss(h32, w, labels, tgt, alpha=1.0, tile=64)
    out.loss.backward()
    h64 = h.double().requires_grad_()
    ref = naive_kd_loss(h64, w.double(), labels, KDTargets(ids, logp.double()), alpha=1.0)
    ref.backward()
    q_tail = 1 - torch.softmax((h @ w.t()).double(), -1).gather(1, ids.long()).sum(1)
    assert q_tail.median() < 1e-6  # the regime where 1 - Q loses everything in fp32
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(h32.grad, h64.grad) <= 1e-5


def test_alpha_zero_without_targets_is_plain_cross_entropy():
    h, w, labels, _ = _inputs("topk", seed=3)
    hh = h.clone().requires_grad_()
    out = tiled_kd_loss(hh, w, labels, None, alpha=0.0, tile=50)
    ce = torch.nn.functional.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    assert abs(out.loss.item() - ce.item()) < 1e-5
    out.loss.backward()
    assert hh.grad is not None and torch.isfinite(hh.grad).all()
    with pytest.raises(ValueError, match="alpha > 0 needs teacher targets"):
        tiled_kd_loss(h, w, labels, None, alpha=0.5)


def test_no_grad_skips_the_gradient_work():
    h, w, labels, tgt = _inputs("topk", seed=4)
    with torch.no_grad():
        out = tiled_kd_loss(h.requires_grad_(), w, labels, tgt, alpha=1.0)
    assert out.loss.grad_fn is None and out.kd_sum.item() > 0
