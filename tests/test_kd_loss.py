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


# ---- the loss family (kd.loss) -------------------------------------------------------------

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from pipeline.config import KDConfig  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from stages.kd_loss import check_loss_for_cache, check_temperature  # noqa: E402

LOSSES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"]


def _full_reference(loss: str, beta: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-position divergence over the whole vocabulary, from torch.nn.functional.
    F.kl_div(input, target, log_target=True) = KL(target || input)."""
    kl = lambda a, b: F.kl_div(b, a, reduction="none", log_target=True).sum(-1)  # KL(a || b)  # noqa: E731
    if loss == "forward_kl":
        return kl(logp, logq)
    if loss == "reverse_kl":
        return kl(logq, logp)
    if loss == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), 0)
    if loss == "skew_kl":
        return kl(logp, logm)
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)  # TRL's generalised JSD


def _logit_inputs(n: int = 40, v: int = 48, seed: int = 0, k: int | None = None, spread: float = 2.0):
    """Student logits z [n, v] fed as hidden states through an identity head, so the gradient of
    ``hidden`` IS the gradient with respect to the student logits; teacher top-k (k = V default)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * spread, -1)
    vals, ids = teacher.topk(k or v, -1)
    return z, teacher, KDTargets(ids.int(), vals.float()), torch.eye(v)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_every_loss_matches_the_full_distribution_at_k_equal_v(loss, tail, tau):
    """k = V: every bucket setting is the full distribution. Value and d/d(logits) to 1e-5.
    (Forward KL used to be inf here: the tail 1 - sum(p) > 0 by rounding met a student tail of 0.)"""
    z, _, tgt, eye = _logit_inputs(seed=5)
    beta = 0.3
    zz = z.float().requires_grad_()
    out = tiled_kd_loss(zz, eye, torch.full((z.shape[0],), -100), tgt, alpha=1.0, temperature=tau,
                        tail=tail, tile=16, loss=loss, beta=beta)
    out.loss.backward()
    z64 = z.clone().requires_grad_()
    # the reference sees the very values the cache holds (fp32), in vocabulary order
    logp = torch.empty_like(z).scatter_(1, tgt.ids.long(), tgt.logp.double())
    ref = tau ** 2 * _full_reference(loss, beta, logp, F.log_softmax(z64 / tau, -1)).mean()
    ref.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(zz.grad).all()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * max(abs(ref.item()), 1e-3)
    assert (zz.grad.double() - z64.grad).abs().max().item() <= 1e-5 * z64.grad.abs().max().item()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_every_loss_matches_the_float64_bucket_reference(loss, tail):
    """k < V, through a real head: tiled hand-written gradients against autograd in float64."""
    h, w, labels, tgt = _inputs("topk", seed=6)
    h32, w32 = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = tiled_kd_loss(h32, w32, labels, tgt, alpha=0.7, temperature=1.5, tail=tail, tile=64, loss=loss, beta=0.2)
    out.loss.backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = naive_kd_loss(h64, w64, labels, KDTargets(tgt.ids, tgt.logp.double()), alpha=0.7, temperature=1.5,
                        tail=tail, loss=loss, beta=0.2)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(h32.grad, h64.grad) <= 1e-5 and _rel(w32.grad, w64.grad) <= 1e-5


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_stays_exact_when_the_student_tail_underflows(loss):
    """The tail-underflow rows (student tail < 1e-30, recomputed in log space) for each loss.
    Logits here reach ~±50, so fp32 itself limits log q to ~3e-6: the gradient must be within
    1e-5 of float64, or at worst within 2x of what float32 autograd on full logits achieves."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(N, H, generator=g) * 3.0, torch.randn(V, H, generator=g) * 3.0
    ids = (h @ w.t()).topk(K, -1).indices.int()
    logp = torch.log_softmax(torch.randn(N, K, generator=g), -1) + math.log(0.99)
    labels = torch.randint(0, V, (N,), generator=g)
    h32 = h.clone().requires_grad_()
    out = tiled_kd_loss(h32, w, labels, KDTargets(ids, logp), alpha=1.0, tile=64, loss=loss)
    out.loss.backward()
    h64 = h.double().requires_grad_()
    ref = naive_kd_loss(h64, w.double(), labels, KDTargets(ids, logp.double()), alpha=1.0, loss=loss)
    ref.backward()
    h_f32 = h.clone().requires_grad_()
    naive_kd_loss(h_f32, w, labels, KDTargets(ids, logp), alpha=1.0, loss=loss).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h32.grad).all()
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(h32.grad, h64.grad) <= max(1e-5, 2 * _rel(h_f32.grad, h64.grad))


def _per_row(z: torch.Tensor, tgt: KDTargets, eye: torch.Tensor, loss: str, beta: float = 0.5,
             tail: str = "bucket") -> torch.Tensor:
    """Each position's divergence (kd_sum of a one-position call)."""
    lab = torch.full((1,), -100)
    return torch.tensor([tiled_kd_loss(z[i:i + 1].float(), eye, lab, KDTargets(tgt.ids[i:i + 1], tgt.logp[i:i + 1]),
                                       loss=loss, beta=beta, tail=tail).kd_sum.item() for i in range(z.shape[0])])


def test_bucket_forward_kl_is_a_lower_bound_of_the_full_one():
    z, teacher, _, eye = _logit_inputs(n=30, seed=7)
    full = _full_reference("forward_kl", 0.5, teacher, F.log_softmax(z, -1))  # [n]
    fp32 = 1e-5 * full + 1e-6  # the tiled value is computed in float32
    for k in (1, 4, 16, 40):
        _, _, tgt, _ = _logit_inputs(n=30, seed=7, k=k)
        bucket = _per_row(z, tgt, eye, "forward_kl").double()
        assert (bucket <= full + fp32).all(), k
        assert (bucket < full - 1e-3).any(), k  # merging ids loses information somewhere
    _, _, tgt, _ = _logit_inputs(n=30, seed=7, k=47)  # a one-id tail merges nothing: equality
    assert ((_per_row(z, tgt, eye, "forward_kl").double() - full).abs() <= fp32).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_bounds_hold_even_for_disjoint_distributions(beta):
    """TVD in [0, 1], JSD <= H(beta) <= log 2, skew_kl <= -log beta, all >= 0 -- on disjoint near-one-hot pairs (where
    the bounds are approached), on identical ones (where every loss is 0) and on random ones."""
    v = 32
    eye = torch.eye(v)
    teacher = torch.full((3, v), -60.0, dtype=torch.float64)
    teacher[:, 0] = 0.0
    teacher = torch.log_softmax(teacher, -1)
    z = torch.full((3, v), -60.0, dtype=torch.float64)
    z[0, 1] = 0.0  # disjoint
    z[1, 0] = 0.0  # identical
    z[2] = torch.randn(v, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    vals, ids = teacher.topk(4, -1)
    tgt = KDTargets(ids.int(), vals.float())
    h_beta = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    d = {loss: _per_row(z, tgt, eye, loss, beta) for loss in LOSSES}
    for loss in LOSSES:
        assert (d[loss] >= -1e-6).all() and torch.isfinite(d[loss]).all(), loss
        assert abs(d[loss][1].item()) < 1e-5, loss
    assert (d["tvd"] <= 1 + 1e-6).all() and d["tvd"][0] > 0.999
    assert (d["jsd"] <= h_beta + 1e-6).all() and d["jsd"][0] > h_beta - 1e-3 and h_beta <= math.log(2) + 1e-12
    assert (d["skew_kl"] <= -math.log(beta) + 1e-5).all() and d["skew_kl"][0] > -math.log(beta) - 1e-3  # m >= beta p


def test_default_forward_kl_is_bit_identical_to_before_the_loss_family():
    """Fixed inputs, values recorded with the code before kd.loss existed (float.hex)."""
    recorded = {("topk", "bucket", 1.0, 1.0): "0x1.e3fa6e0000000p+0",
                ("topk", "bucket", 2.0, 0.5): "0x1.a471900000000p+2",
                ("topk", "renormalize", 1.0, 1.0): "0x1.3352040000000p+0",
                ("sampled", "bucket", 1.0, 1.0): "0x1.67b5420000000p+1"}
    for (kind, tail, tau, alpha), want in recorded.items():
        h, w, labels, tgt = _inputs(kind, seed=11)
        out = tiled_kd_loss(h, w, labels, tgt, alpha=alpha, temperature=tau, tail=tail, tile=64)
        assert out.loss.item().hex() == want, (kind, tail, tau, alpha)
        explicit = tiled_kd_loss(h, w, labels, tgt, alpha=alpha, temperature=tau, tail=tail, tile=64,
                                 loss="forward_kl", beta=0.9)
        assert explicit.loss.item().hex() == want


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "tvd", "skew_kl"])
def test_sampled_caches_refuse_every_loss_but_forward_kl(loss):
    h, w, labels, tgt = _inputs("sampled", seed=12)
    with pytest.raises(UserError, match=rf"train\.kd\.loss: {loss} is not defined for a sampled"):
        tiled_kd_loss(h, w, labels, tgt, loss=loss)
    with pytest.raises(UserError, match=r"train\.phases\[1\]\.kd: train\.kd\.loss"):
        check_loss_for_cache(KDConfig(loss=loss), "sampled", "train.phases[1].kd")
    check_loss_for_cache(KDConfig(loss=loss), "topk", "x")  # top-k caches take every loss
    check_loss_for_cache(KDConfig(), "sampled", "x")


def test_kd_config_fields_validate():
    assert KDConfig().loss == "forward_kl" and KDConfig().beta == 0.5
    for bad in ({"loss": "hinge"}, {"beta": 0.0}, {"beta": 1.0}):
        with pytest.raises(Exception):
            KDConfig(**bad)


def test_temperature_mismatch_is_an_error_unless_allowed():
    check_temperature(KDConfig(temperature=2.0), 2.0, "train.phases[0]")
    with pytest.raises(UserError, match=r"train\.phases\[0\]: train\.kd\.temperature 2\.0 differs .* temperature 1\.0"):
        check_temperature(KDConfig(temperature=2.0), 1.0, "train.phases[0]")
    check_temperature(KDConfig(temperature=2.0, allow_temperature_mismatch=True), 1.0, "train.phases[0]")
