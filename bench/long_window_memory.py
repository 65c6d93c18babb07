"""Peak resident memory per token of one training step and of the cache job's per-window work
at windows of 4k, 8k, 16k and 32k tokens, in both packing modes (issue: bytes per token at 32k
within 1.25x of 4k — no [L, L] and no [L, V] tensor anywhere).

Each point runs in its own child process: its figure is the process's maximum resident set
size minus its resident size once the model is built (the batch, the cached targets, every
activation and gradient, the optimizer state and the outputs all count). Training: a tiny
Llama student (vocab 32000) through the trainer's own module (``StudentWithLoss``: tiled KD
against top-32 targets, alpha 0.5), gradient checkpointing, per-document sdpa, forward +
backward + AdamW step, one window per step. Cache: the teacher forward and top-32 selection
of ``TeacherScorer`` (chunked logits) on one window. ``doc_masked`` windows hold documents of
128–1024 tokens.

At these sizes a constant ~300 MB (model, optimizer, one [tile, V] logits chunk) dominates, so
the ratio the issue asks for is flattered by it. The figure that is not: the marginal bytes
per token from 16k to 32k, set beside what one [L, L] boolean mask (48 KiB per added token
there) or one [L, V] float32 logits tensor (125 KiB per token) would add; ``met_marginal``
requires every marginal to be under half the mask's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WINDOWS = (4096, 8192, 16384, 32768)
MODES = ("cross_doc", "doc_masked")
PARTS = ("train_step", "cache_window")
V, K, GOAL, REPEATS = 32000, 32, 1.25, 3


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


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

    torch.set_num_threads(2)
    starts = _doc_starts(L, mode)
    if part == "cache_window":
        model = _llama(hidden=128, layers=2, heads=4).eval()
        scorer = TeacherScorer(model, kind="topk", k=K, samples=0, temperature=1.0, chunk_len=1024)
        base = _rss_kib()
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
        base = _rss_kib()
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


def run(part: str, mode: str, L: int) -> dict:
    """The median peak of REPEATS children (one child's peak varies by up to ~50 MB here)."""
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run([sys.executable, __file__, "--child", part, mode, str(L)], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent,
                             env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        if out.returncode:
            raise SystemExit(f"{part} {mode} {L}: child failed\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["peak_mib"])
    mid = dict(runs[len(runs) // 2])
    mid["all_peak_mib"] = [r["peak_mib"] for r in runs]
    return mid


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"train_step": "#0072B2", "cache_window": "#D55E00"}  # Okabe-Ito
    for part in PARTS:
        for mode, style in zip(MODES, ("-", "--")):
            pts = [p for p in points if p["part"] == part and p["mode"] == mode]
            ax.plot([p["window"] for p in pts], [p["bytes_per_token"] / 1024 for p in pts], style, marker="o",
                    color=colors[part], label=f"{part}, {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(WINDOWS, [f"{w // 1024}k" for w in WINDOWS])
    ax.set_xlabel("window (tokens)")
    ax.set_ylabel("peak resident KiB per token")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory per token: tiny Llama student step / teacher cache window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import torch

    points = []
    for part in PARTS:
        for mode in MODES:
            for L in WINDOWS:
                points.append(run(part, mode, L))
                print(json.dumps(points[-1]), flush=True)
    summary = {}
    for part in PARTS:
        for mode in MODES:
            by = {p["window"]: p for p in points if p["part"] == part and p["mode"] == mode}
            marginal = ((by[32768]["peak_mib"] - by[16384]["peak_mib"]) * 2**20 / (32768 - 16384))
            xs = list(WINDOWS)
            ys = [by[w]["peak_mib"] * 2**20 for w in xs]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            summary[f"{part}/{mode}"] = {
                "ratio_32k_to_4k": round(by[32768]["bytes_per_token"] / by[4096]["bytes_per_token"], 3),
                "marginal_bytes_per_token_16k_32k": round(marginal, 1),
                "fit_slope_bytes_per_token_4k_32k": round(slope, 1),
            }
    worst = max(s["ratio_32k_to_4k"] for s in summary.values())
    mask = (32768**2 - 16384**2) / (32768 - 16384)  # bytes per added token of one [L, L] bool tensor
    reference = {"one_LxL_bool_mask": mask, "one_LxV_float32_logits": 4.0 * V}
    worst_marginal = max(s["marginal_bytes_per_token_16k_32k"] for s in summary.values())
    result = {
        "metric": "bytes_per_token_ratio_32k_to_4k", "value": worst, "unit": "x (worst of 4)",
        "limits": {"max": GOAL}, "met": worst <= GOAL,
        "worst_marginal_bytes_per_token_16k_32k": worst_marginal, "reference_marginal_bytes_per_token": reference,
        "met_marginal": worst_marginal < 0.5 * mask, "summary": summary, "points": points,
        "setup": {"vocab": V, "k": K, "student": "Llama hidden 64, 2 layers, 2 heads, grad checkpointing, tile 1024",
                  "teacher": "Llama hidden 128, 2 layers, 4 heads, chunk_len 1024",
                  "attention": "sdpa (per document for doc_masked)", "doc_masked_doc_len": [128, 1024],
                  "measure": "child ru_maxrss minus RSS after model build, one window; median of 3 children"},
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_window_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(points, RESULTS / "long_window_memory.png")
    print(json.dumps({k: result[k] for k in ("metric", "value", "met", "worst_marginal_bytes_per_token_16k_32k",
                                             "met_marginal", "summary")}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
