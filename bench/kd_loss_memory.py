"""Peak memory and time of the tiled sparse KD loss against the best CPU-capable peers on the
same task (issue 25, item 3): window 16384, vocab 32000, hidden 512, top-32 targets with a tail
bucket, alpha 0.5 (KD mixed with CE, the training default), forward + backward, float32.

Variants, each the same loss value (checked to 1e-4 against ours in every child):

* ``tiled``: ``stages.kd_loss.tiled_kd_loss``, tile 1024: per tile ``z = h W^T``, the loss
  terms and the hand-derived gradient of z, turned into dh and dW at once.
* ``alst_tiled``: DeepSpeed's ``TiledFusedLogitsLoss`` (the ALST tiling,
  ``deepspeed/runtime/sequence_parallel/ulysses_sp.py``) around a per-tile sparse KD: 16
  shards of 1024 positions, each one autograd forward + backward of :func:`sparse_kd` inside
  the loss's forward, dW accumulated, dh written into one preallocated [N, H] buffer.
* ``naive``: :func:`sparse_kd` on the full [N, V] logits, written well: one log-softmax shared by
  KD and CE, gathers for the targets and labels, the tail from ``1 - sum q_K`` (no [N, V] mask
  or copy), autograd for the backward.

Each measurement is one fresh child process (peak RSS is per process): its peak is the maximum
resident set size minus the resident size once inputs are built; its time the thread CPU time
of forward + backward with torch on one thread (other work on a shared machine does not enter
it). ``--repeats`` children per variant, in alternated order. Goal: our peak <= the ALST
peer's, at <= 0.8 x its time (medians).

Run: python bench/kd_loss_memory.py [--repeats 5] [--positions 16384]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

from common import alternate, child_json, paired_ratios, rss_kib, spread, write_result

V, H, K, TILE, ALPHA = 32000, 512, 32, 1024, 0.5
VARIANTS = ("tiled", "alst_tiled", "naive")


def sparse_kd(z, labels, ids, logp, n_total: int):
    """alpha * mean forward KL over the k + 1 buckets + (1 - alpha) * mean CE for the rows of
    ``z`` (logits, [n, V]), summed over these rows and divided by ``n_total``: the training
    loss at temperature 1, so one log-softmax serves KD and CE."""
    import torch

    logq = torch.log_softmax(z, dim=-1)
    logq_k = logq.gather(1, ids)
    q_tail = (1.0 - logq_k.exp().sum(1)).clamp_min(1e-30)
    p = logp.exp()
    p_tail = (1.0 - p.sum(1)).clamp_min(1e-30)
    kl = (p * (logp - logq_k)).sum(1) + p_tail * (p_tail.log() - q_tail.log())
    ce = -logq.gather(1, labels.unsqueeze(1)).squeeze(1)
    return (ALPHA * kl + (1.0 - ALPHA) * ce).sum() / n_total


def child(variant: str, n: int) -> dict:
    import torch

    from stages.kd_loss import KDTargets, tiled_kd_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = (torch.randn(n, H) * 0.05).requires_grad_()
    w = (torch.randn(V, H) * 0.05).requires_grad_()
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(64)]).repeat(n // 64, 1)  # [n, K]
    logp = (torch.log_softmax(torch.randn(n, K), -1) + math.log(0.9)).half()  # 10 % tail
    labels = torch.randint(0, V, (n,))
    if variant == "alst_tiled":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss
    base = rss_kib()
    t0 = time.thread_time()
    if variant == "tiled":
        loss = tiled_kd_loss(h, w, labels, KDTargets(ids.int(), logp), alpha=ALPHA, tile=TILE).loss
    elif variant == "alst_tiled":
        head = torch.nn.Module()  # the `self` TiledFusedLogitsLoss hands to the loss function
        head.weight = w
        y = torch.cat([labels.unsqueeze(1).float(), ids.float(), logp.float()], 1)[None]  # [1, n, 1 + 2K]

        def fn(mod, x, yy):
            return sparse_kd(x @ mod.weight.t(), yy[:, 0].long(), yy[:, 1:1 + K].long(), yy[:, 1 + K:], n)

        loss = TiledFusedLogitsLoss.apply(fn, head, h[None], y, None, n // TILE, [w], "sum")
    else:
        loss = sparse_kd(h @ w.t(), labels, ids, logp.float(), n)
    loss.backward()
    seconds = time.thread_time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.no_grad():  # the value every variant must give, after the peak is read
        want = sum(float(sparse_kd(h[i:i + TILE] @ w.t(), labels[i:i + TILE], ids[i:i + TILE],
                                   logp[i:i + TILE].float(), n)) for i in range(0, n, TILE))
    assert abs(float(loss) - want) <= 1e-4 * abs(want), (variant, float(loss), want)
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
    return {"peak_mib": round((peak - base) / 1024, 1), "seconds": round(seconds, 3), "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5, help="children per variant")
    ap.add_argument("--positions", type=int, default=16384)
    args = ap.parse_args()
    n = args.positions
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}

    def one(variant: str) -> float:
        runs[variant].append(child_json([__file__, "--child", variant, str(n)]))
        print(variant, runs[variant][-1], flush=True)
        return runs[variant][-1]["seconds"]

    secs = alternate({v: (lambda v=v: one(v)) for v in VARIANTS}, repeats=args.repeats)
    peaks = {v: [r["peak_mib"] for r in runs[v]] for v in VARIANTS}
    peak_med = {v: spread(peaks[v], 1)["median"] for v in VARIANTS}
    write_result(
        "kd_loss_memory", metric="tiled_kd_over_alst_tiled_peer", unit="ratio",
        value={"peak": round(peak_med["tiled"] / peak_med["alst_tiled"], 3),
               "time": paired_ratios(secs["tiled"], secs["alst_tiled"], 3)["median"]},
        goal={"peak": 1.0, "time": 0.8}, direction="<=", details={
            "definition": "peak: median peak of ours over the ALST peer's; time: median over alternated pairs of "
                          "our CPU seconds over the peer's (forward + backward)",
            "time_vs_naive": paired_ratios(secs["tiled"], secs["naive"], 3),
            "time_vs_alst": paired_ratios(secs["tiled"], secs["alst_tiled"], 3),
            "peak_mib": {v: spread(peaks[v], 1) for v in VARIANTS},
            "cpu_seconds": {v: spread(secs[v], 3) for v in VARIANTS},
            "full_logits_mib": round(n * V * 4 / 2**20, 1),
            "setup": {"positions": n, "vocab": V, "hidden": H, "k": K, "tile": TILE, "tail": "bucket",
                      "alpha": ALPHA, "dtype": "float32", "children_per_variant": args.repeats,
                      "torch_threads": 1, "peer": "deepspeed TiledFusedLogitsLoss, output_reduction sum"}})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
