"""Marginal memory per token of one training step and of the cache job's per-window work, as
the window doubles (8k -> 16k -> 32k -> 64k), in both packing modes (issue 25, item 2).

A fixed few hundred MB (model, optimizer, one [tile, V] logits chunk) dominates the peak at
these sizes, so peak-per-token ratios say little: a full [L, L] bool mask would pass them.
The figure here is the marginal: (peak at 2L - peak at L) / L, bytes per added token. Linear
memory keeps it flat as L doubles; one [L, L] tensor adds 3L bytes per token from L to 2L
(48 KiB from 16k to 32k for a bool mask), one [L, V] float32 logits tensor 4V.

Each point is ``--children`` (default 5) fresh child processes; children run in rounds over
every part and mode, the windows in ascending then descending order, and round r's child at
2L is paired with round r's at L: the marginal is the median of those pairs, with the range.
Every child is appended to ``results/long_window_memory_children.jsonl`` as it ends
(``--resume`` keeps them; ``--budget-s`` starts no round after that many seconds, and the JSON
says how many children each point got).
A child's figure is its maximum resident set size minus its resident size once the model is
built (batch, cached targets, activations, gradients, optimizer state and outputs all count),
under ``MALLOC_MMAP_THRESHOLD_=131072`` so large blocks are returned to the system when freed
and the peak follows live memory rather than heap fragmentation.

Vocabulary 8192 (not 32000): the lm_head matmuls, O(L V H), are most of a child's time, and
on a shared 2-core machine 5 children per point at 32000 do not fit the time; the marginal it
measures does not depend on V unless an [L, V] tensor exists, and one such float32 tensor
(4V = 32 KiB per token) would still be well over the goal.

Training: a tiny Llama student through the trainer's own module
(``StudentWithLoss``: tiled KD against top-32 targets, alpha 0.5), gradient checkpointing,
per-document sdpa, forward + backward + AdamW step, one window per step. Cache: the teacher
forward and top-32 selection of ``TeacherScorer`` (chunked logits) on one window.
``doc_masked`` windows hold documents of 128-1024 tokens.

Goal, per part and mode: the 16k->32k marginal <= 1.25 x the 8k->16k marginal (linear) and
<= a quarter of what one [L, L] bool mask adds per token there (12 KiB).

Run: python bench/long_window_memory.py [--windows 8192 16384 32768 65536] [--children 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from common import child_json, rss_kib, spread, write_result

MODES = ("cross_doc", "doc_masked")
PARTS = ("train_step", "cache_window")
V, K, LINEAR, MASK_SHARE = 8192, 32, 1.25, 0.25
ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
LOG = Path(__file__).parent / "results" / "long_window_memory_children.jsonl"  # every child, as it ends


def _llama(hidden: int, layers: int, heads: int) -> object:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from stages.attention import implementation

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1 << 16,
                      use_cache=False, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=implementation("sdpa"))


def _doc_starts(L: int, mode: str) -> list[int]:
    import numpy as np

    if mode == "cross_doc":
        return [0]
    lens = np.random.default_rng(L).integers(128, 1025, size=L // 128)
    starts = np.concatenate([[0], np.cumsum(lens)])
    return [int(s) for s in starts if s < L]


def child(part: str, mode: str, L: int) -> dict:
    import torch

    from stages.teacher import TeacherScorer, model_inputs

    torch.set_num_threads(1)  # one thread: on a shared machine, OpenMP threads waiting on each other cost more than they add
    starts = _doc_starts(L, mode)
    if part == "cache_window":
        model = _llama(hidden=128, layers=2, heads=4).eval()
        scorer = TeacherScorer(model, kind="topk", k=K, samples=0, temperature=1.0, chunk_len=1024)
        base = rss_kib()
        t0 = time.perf_counter()
        ids = torch.randint(0, V, (1, L))
        out = scorer.score(ids, [starts], mode)
        assert out["ids"].shape == (1, L, K)
    else:
        from pipeline.config import KDConfig
        from stages.train.data import Batch
        from stages.train.model import StudentWithLoss, enable_checkpointing

        model = _llama(hidden=64, layers=2, heads=2).train()
        enable_checkpointing(model)
        module = StudentWithLoss(model, tile=1024)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        base = rss_kib()
        t0 = time.perf_counter()
        ids = torch.randint(0, V, (1, L))
        pos = model_inputs(ids, [starts], mode)["position_ids"]
        tgt_ids = torch.randint(0, V, (1, L, K), dtype=torch.int32)
        logp = (torch.log_softmax(torch.randn(1, L, K), -1) + torch.log(torch.tensor(0.9))).half()
        batch = Batch(ids, pos, ids.roll(-1, 1), tgt_ids, logp, None, L, L, L)
        loss, _, _ = module(batch, KDConfig(alpha=0.5))
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"part": part, "mode": mode, "window": L, "peak_mib": round((peak - base) / 1024, 1),
            "bytes_per_token": round((peak - base) * 1024 / L, 1), "seconds": round(seconds, 2),
            "documents": len(starts)}


def run(part: str, mode: str, L: int) -> float:
    """One fresh child's peak (MiB over its post-build resident size)."""
    return child_json([__file__, "--child", part, mode, str(L)], env=ENV)["peak_mib"]


def plot(peaks: dict[str, dict[int, list[float]]], windows: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"train_step": "#0072B2", "cache_window": "#D55E00"}  # Okabe-Ito
    for series, by in peaks.items():
        part, mode = series.split("/")
        xs = [(a + b) / 2 for a, b in zip(windows, windows[1:])]
        ys = [spread([(y - x) * 2**20 / a / 1024 for x, y in zip(by[a], by[b])])["median"]
              for a, b in zip(windows, windows[1:])]
        ax.plot(xs, ys, "-" if mode == "cross_doc" else "--", marker="o", color=colors[part], label=series)
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [f"{w // 1024}k" for w in windows])
    ax.set_xlabel("window (tokens), marginal between neighbouring points")
    ax.set_ylabel("marginal KiB per added token")
    ax.set_ylim(bottom=0)
    ax.set_title("Marginal memory per token: student step / teacher cache window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, nargs="+", default=[8192, 16384, 32768, 65536],
                    help="doubling window lengths; must include 8192, 16384 and 32768 for the goal")
    ap.add_argument("--children", type=int, default=5, help="fresh child processes per point")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new round after this many seconds (fewer children, said in the JSON)")
    ap.add_argument("--resume", action="store_true", help="keep the children already in the log")
    args = ap.parse_args()
    windows = sorted(args.windows)
    if any(b != 2 * a for a, b in zip(windows, windows[1:])) or not {8192, 16384, 32768} <= set(windows):
        raise SystemExit("--windows must double from 8192 and include 16384 and 32768")
    series = [f"{part}/{mode}" for part in PARTS for mode in MODES]
    done = [json.loads(x) for x in LOG.read_text().splitlines()] if args.resume and LOG.is_file() else []
    LOG.write_text("".join(json.dumps(x) + "\n" for x in done))
    t0 = time.perf_counter()
    # Rounds over every part and mode, so a run cut short covers all of them alike; within a
    # round the windows go up, in the next round down (the order bench/common.alternate uses).
    for r in range(args.children):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            break
        for name in series:
            part, mode = name.split("/")
            for L in (windows if r % 2 == 0 else windows[::-1]):
                if any(x["round"] == r and x["series"] == name and x["window"] == L for x in done):
                    continue
                done.append({"round": r, "series": name, "window": L, "peak_mib": run(part, mode, L)})
                with LOG.open("a") as f:
                    f.write(json.dumps(done[-1]) + "\n")
        print(f"round {r + 1}/{args.children} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rounds = sorted({x["round"] for x in done})
    peaks: dict[str, dict[int, list[float]]] = {}
    for name in series:
        complete = [r for r in rounds if all(any(x["round"] == r and x["series"] == name and x["window"] == L
                                                 for x in done) for L in windows)]
        peaks[name] = {L: [next(x["peak_mib"] for x in done if x["round"] == r and x["series"] == name
                                and x["window"] == L) for r in complete] for L in windows}
    children = min(len(by[windows[0]]) for by in peaks.values())
    summary, value, goal = {}, {}, {}
    for name, by in peaks.items():
        marginals = {f"{a // 1024}k_{b // 1024}k": spread([(y - x) * 2**20 / a for x, y in zip(by[a], by[b])], 1)
                     for a, b in zip(windows, windows[1:])}
        summary[name] = {"marginal_bytes_per_token": marginals,
                         "peak_mib": {str(L): spread(by[L], 1) for L in windows}}
        value[name] = marginals["16k_32k"]["median"]
        goal[name] = round(min(LINEAR * marginals["8k_16k"]["median"], MASK_SHARE * 3 * 16384), 1)
    write_result(
        "long_window_memory", metric="marginal_bytes_per_token_16k_32k", value=value, goal=goal, direction="<=",
        unit="B/token", details={
            "definition": "per part/mode: median over paired children of (peak at 32k - peak at 16k) / 16k; goal: "
                          f"min({LINEAR} x the same median from 8k to 16k, {MASK_SHARE} x the 3L = 49152 bytes per "
                          "token one [L, L] bool mask adds from 16k to 32k)",
            "summary": summary,
            "reference_marginal_bytes_per_token_16k_32k": {"one_LxL_bool_mask": 3 * 16384,
                                                           "one_LxV_float32_logits": 4 * V},
            "children": children, "children_asked": args.children, "windows": windows,
            "wall_s": round(time.perf_counter() - t0), "children_log": LOG.name,
            "setup": {"vocab": V, "k": K, "student": "Llama hidden 64, 2 layers, 2 heads, grad checkpointing, tile 1024",
                      "teacher": "Llama hidden 128, 2 layers, 4 heads, chunk_len 1024",
                      "attention": "sdpa (per document for doc_masked)", "doc_masked_doc_len": [128, 1024],
                      "measure": "child ru_maxrss minus RSS after model build, one window", "child_env": ENV}})
    plot(peaks, windows, LOG.parent / "long_window_memory.png")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
