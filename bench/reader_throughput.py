"""Windows/s the cache reader delivers vs windows/s a demo-size training step consumes.

Caches: the demo-size teacher (random tiny Llama unless ``--teacher``) over 64 demo windows
of 1024 tokens, top-32, once per codec. Reader: ``ShardReader`` over a whole epoch, in the
training process (0 workers) and through a DataLoader with 2 workers (``reader.loader``).
Training step: the demo-size student (Llama, hidden 64, 2 layers, 4 heads), one window per
micro-batch, forward + the real tiled KD loss (stages.kd_loss) against the cached targets +
backward + AdamW, all cores. The ratio is reader windows/s over step windows/s (> 1: the
reader keeps up).

Run: python bench/reader_throughput.py [--teacher DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import write_result

L = 1024


def reader_rate(cache: Path, workers: int, epochs: int = 2) -> float:
    from stages.cache.reader import ShardReader

    reader = ShardReader(cache, dp_rank=0, dp_size=1, seed=0)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for item in reader.loader(workers):
            n += item["ids"].shape[0] > 0
    return n / (time.perf_counter() - t0)


def step_rate(cache: Path, steps: int = 12) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.cache.reader import ShardReader
    from stages.kd_loss import KDTargets, tiled_kd_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=L))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    items = [x for _, x in zip(range(steps + 2), ShardReader(cache, dp_rank=0, dp_size=1, seed=0))]

    def step(item: dict) -> None:
        ids = item["input_ids"].long()[None]
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]  # [L, H]
        labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
        out = tiled_kd_loss(hidden, model.lm_head.weight, labels,
                            KDTargets(ids=item["ids"].long(), logp=item["logp"].float()), alpha=0.5, tile=512)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for item in items[:2]:
        step(item)
    t0 = time.perf_counter()
    for item in items[2:]:
        step(item)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None)
    args = ap.parse_args()
    from helpers import make_tiny_llama

    from pipeline.config import parse_config
    from cluster.executor import LocalExecutor
    from helpers import build_cache

    torch.set_num_threads(os.cpu_count() or 1)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher = args.teacher or str(make_tiny_llama(tmp / "teacher", initializer_range=0.2))
        caches = {}
        for codec in ("plain", "compact"):
            cfg = parse_config({"run": {"out_dir": str(tmp / "run")}, "data": {"synthetic": {"num_docs": 900}},
                                "pack": {"window_len": L, "mode": "cross_doc", "doc_len": [32, 128]},
                                "teacher": {"model": teacher, "batch_size": 4},
                                "cache": {"k": 32, "windows_per_shard": 16, "codec": codec}})
            caches[codec] = build_cache(cfg, executor=LocalExecutor())
        for codec, cache in caches.items():
            for workers in (0, 2):
                rates[f"{codec}_{workers}w"] = reader_rate(cache, workers)
                print(f"reader {codec:8s} {workers} workers: {rates[f'{codec}_{workers}w']:.0f} windows/s", flush=True)
        step = step_rate(caches["plain"])
        print(f"training step (demo student, 1 window/step): {step:.2f} windows/s", flush=True)
    worst = min(rates.values())
    # Goal 10x: a GPU step is many times faster than this CPU one; the reader must still keep up.
    write_result(
        "reader_throughput", metric="reader_vs_training_step_windows_per_s", value=round(worst / step, 1), goal=10.0,
        direction=">=", unit="ratio", details={
            "definition": "slowest reader configuration's windows/s over the demo training step's windows/s",
            "reader_windows_per_s": {k: round(v, 1) for k, v in rates.items()},
            "training_step_windows_per_s": round(step, 2),
            "window_len": L, "k": 32, "teacher": args.teacher or "random tiny Llama (demo size)",
            "student": "Llama hidden 64, 2 layers, 4 heads, vocab 260; tiled KD loss, AdamW"})


if __name__ == "__main__":
    main()
