"""Scoring retrieval probes: greedy exact match and the answer's log-prob and rank.

One teacher-forced forward per probe: greedy decoding reproduces the answer exactly when,
and only when, the argmax is right at every answer position given the right prefix (it
diverges at the first wrong argmax). Only the answer positions go through ``lm_head``,
so a long context never builds ``[T, vocab]`` logits.

Rank (0 = the argmax) and log-prob are smoother than exact match on tiny models: they
show an answer climbing towards the top before it is ever produced.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.progress import Progress
from stages.evaluate.models import final_hidden, model_device, split_model
from stages.evaluate.tasks import Probe

METRICS = ("exact", "token_acc", "logprob", "rank", "distance")


@torch.no_grad()
def score_batch(model: Any, probes: list[Probe]) -> list[dict[str, float]]:
    """Scores of probes that share input length and answer length."""
    body, head = split_model(model)
    dev = model_device(model)
    a = len(probes[0].answer)
    ids = torch.tensor([p.input_ids() for p in probes], dtype=torch.long, device=dev)  # [B, T]
    target = torch.tensor([p.answer for p in probes], dtype=torch.long, device=dev)  # [B, a]
    h = final_hidden(body, ids)  # [B, T, H]
    # Position T-a+j predicts answer token j: the last context token predicts the first.
    logits = head(h[:, -a:]).float()  # [B, a, V]
    logp = torch.log_softmax(logits, dim=-1)
    tgt = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, a]
    rank = (logp > tgt.unsqueeze(-1)).sum(-1)  # [B, a]; ties count in the answer's favour
    hit = logits.argmax(-1) == target  # [B, a]
    return [{"exact": float(hit[i].all()), "token_acc": float(hit[i].float().mean()),
             "logprob": float(tgt[i].sum()), "rank": float(rank[i].float().mean()),
             "distance": float(p.distance)} for i, p in enumerate(probes)]


def score_probes(model: Any, probes: list[Probe], batch_tokens: int = 32768,
                 progress: Progress | None = None) -> list[dict[str, float]]:
    """Per-probe scores, in the order given; probes are batched by shape."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, p in enumerate(probes):
        groups[(len(p.input_ids()), len(p.answer))].append(i)
    out: list[dict[str, float] | None] = [None] * len(probes)
    for (t, _), idx in groups.items():
        bs = max(1, batch_tokens // t)
        for s in range(0, len(idx), bs):
            chunk = idx[s:s + bs]
            for i, r in zip(chunk, score_batch(model, [probes[j] for j in chunk])):
                out[i] = r
            if progress is not None:
                progress.update(len(chunk), len(chunk) * t)
    return out  # type: ignore[return-value]


def grid(probes: Iterable[Probe], scores: list[dict[str, float]], lengths: list[int],
         depths: list[float]) -> dict[str, Any]:
    """Mean of each metric per cell as ``[depth][length]`` lists (rows: depth, columns: length)."""
    acc: dict[tuple[int, float], list[dict[str, float]]] = defaultdict(list)
    for p, s in zip(probes, scores):
        acc[(p.length, p.depth)].append(s)
    out: dict[str, Any] = {"lengths": list(lengths), "depths": list(depths)}
    for m in METRICS:
        out[m] = [[float(np.mean([s[m] for s in acc[(L, d)]])) if acc[(L, d)] else float("nan")
                   for L in lengths] for d in depths]
    out["trials"] = max((len(v) for v in acc.values()), default=0)
    return out
