"""Next-token loss by position on held-out packed windows.

A model that uses its whole context keeps its loss flat (or falling) to the end of the
window; one that stops using context beyond some length shows the loss rising from there.
Held-out windows are packed like the training windows (same data, packing mode and
positions) but with a different seed, so the documents in them were never trained on.

The head is applied tile by tile: ``[tile, vocab]`` is the largest logits tensor built.
A target that starts a document (its BOS) is not predictable from the previous document
and is left out of the loss.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stages.evaluate.models import final_hidden, model_device, split_model


def _windows(rows: list[dict], mode: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from stages.windows import position_ids

    for row in rows:
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        starts = np.asarray(row["doc_starts"], dtype=np.int64)
        yield ids, position_ids(starts, len(ids), mode), starts


@torch.no_grad()
def loss_by_position(model: Any, rows: list[dict], mode: str, buckets: int, tile: int = 1024) -> dict[str, Any]:
    """Mean next-token loss per position bucket; ``loss[b]`` covers targets in [edges[b], edges[b+1])."""
    body, head = split_model(model)
    dev = model_device(model)
    L = len(rows[0]["input_ids"])
    total = np.zeros(L, dtype=np.float64)  # indexed by the target's position
    count = np.zeros(L, dtype=np.int64)
    for ids, pos, starts in _windows(rows, mode):
        x = torch.from_numpy(ids).to(dev).unsqueeze(0)  # [1, L]
        h = final_hidden(body, x, torch.from_numpy(pos).to(dev).unsqueeze(0))  # [1, L, H]
        nll = torch.empty(L - 1, dtype=torch.float64)
        for s in range(0, L - 1, tile):
            e = min(s + tile, L - 1)
            logits = head(h[0, s:e]).float()  # [t, V]
            nll[s:e] = F.cross_entropy(logits, x[0, s + 1:e + 1], reduction="none").double().cpu()
        keep = np.ones(L, dtype=bool)
        keep[0] = False  # nothing predicts position 0
        keep[starts[starts > 0]] = False
        total[1:] += np.where(keep[1:], nll.numpy(), 0.0)
        count += keep
    edges = np.unique(np.linspace(1, L, buckets + 1).round().astype(int))
    loss = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = count[lo:hi].sum()
        loss.append(float(total[lo:hi].sum() / n) if n else float("nan"))
    return {"window_len": L, "windows": len(rows), "mode": mode, "bucket_edges": edges.tolist(),
            "loss": loss, "mean_loss": float(total.sum() / max(count.sum(), 1))}
