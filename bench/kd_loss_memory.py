"""Peak memory and time of the tiled KD loss vs a naive full-logits KL (issue: >= 8x lower
peak, <= 1.2x the time) at window 16384, vocab 32000, on CPU.

Each variant runs in its own child process: the peak is that process's maximum resident
set size minus its resident size just before the loss (inputs already allocated), so the
two figures are measured the same way. Forward + backward, top-k 32 with a tail bucket,
alpha 0.5 (KD mixed with CE, the training default path), hidden size 512.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from common import child_json, rss_kib, write_result

N, V, H, K, TILE, REPEATS = 16384, 32000, 512, 32, 1024, 2


def child(variant: str) -> dict:
    import torch

    from stages.kd_loss import KDTargets, naive_kd_loss, tiled_kd_loss

    torch.manual_seed(0)
    h = (torch.randn(N, H) * 0.05).requires_grad_()
    w = (torch.randn(V, H) * 0.05).requires_grad_()
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(64)]).repeat(N // 64, 1).int()  # [N, K]
    logp = (torch.log_softmax(torch.randn(N, K), -1) + torch.log(torch.tensor(0.9))).half()  # 10% tail
    labels = torch.randint(0, V, (N,))
    tgt = KDTargets(ids, logp)
    base = rss_kib()
    times = []
    for _ in range(REPEATS):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        if variant == "tiled":
            loss = tiled_kd_loss(h, w, labels, tgt, alpha=0.5, tile=TILE).loss
        else:
            loss = naive_kd_loss(h, w, labels, tgt, alpha=0.5)
        loss.backward()
        times.append(time.perf_counter() - t0)
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mib": (peak - base) / 1024, "seconds": min(times), "all_seconds": times}


def run(variant: str) -> dict:
    return child_json([__file__, "--child", variant])


def main() -> None:
    tiled, naive = run("tiled"), run("naive")
    write_result(
        "kd_loss_memory", metric="tiled_kd_over_naive_full_logits", unit="ratio",
        value={"peak": round(tiled["peak_mib"] / naive["peak_mib"], 4),
               "time": round(tiled["seconds"] / naive["seconds"], 3)},
        goal={"peak": 0.125, "time": 1.2}, direction="<=", details={
            "tiled": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in tiled.items()},
            "naive": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in naive.items()},
            "setup": {"positions": N, "vocab": V, "hidden": H, "k": K, "tile": TILE, "tail": "bucket", "alpha": 0.5,
                      "dtype": "float32", "repeats": REPEATS, "time": "min over repeats, forward + backward"}})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
    else:
        main()
