"""Shared setup of the training benchmarks: one in-process DeepSpeed rank (CPU, gloo, fp32)
training a Llama student through the same module, loss and step as ``posdistill train``."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)


def single_rank_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def llama(vocab: int, hidden: int, layers: int, heads: int, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=8192, use_cache=False, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def engine_for(model: Any, tile: int = 1024) -> Any:
    """A DeepSpeed ZeRO-2 engine around StudentWithLoss, as the trainer builds it."""
    import deepspeed

    from pipeline.config import parse_config
    from stages.train.ds_config import deepspeed_config
    from stages.train.loop import init_distributed
    from stages.train.model import StudentWithLoss
    from stages.train.plan import geometry

    single_rank_env()
    init_distributed()
    cfg = parse_config({"train": {"batch_size": 1, "micro_batch": 1, "phases": [{"window_len": 64, "steps": 1}]},
                        "pack": {"doc_len": [16, 64]}})
    module = StudentWithLoss(model, tile)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()),
                                      config=deepspeed_config(cfg.train, geometry(cfg.train, 1), gpu=False))
    return engine


def synthetic_rows(n: int, window: int, vocab: int, k: int, seed: int = 0) -> list[dict[str, Any]]:
    """Windows shaped like cache rows: input ids, doc starts, top-k ids and log-probs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(16)]).repeat(window // 16, 1)
        logp = torch.log_softmax(torch.randn(window, k, generator=g), -1) + torch.log(torch.tensor(0.9))
        rows.append({"window_id": i, "input_ids": torch.randint(0, vocab, (window,), generator=g, dtype=torch.int32),
                     "doc_starts": torch.tensor([0], dtype=torch.int32), "ids": ids.int(), "logp": logp.half(),
                     "counts": None})
    return rows


def one_thread() -> None:
    """Torch on one thread, so the work of a step is the CPU time of this thread
    (``time.thread_time``): other processes on a shared machine do not enter it."""
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def step(engine: Any, batch: Any, kd: Any) -> float:
    """CPU seconds of one training step (forward, backward, optimizer)."""
    t0 = time.thread_time()
    loss, _, _ = engine(batch, kd)
    engine.backward(loss)
    engine.step()
    return time.thread_time() - t0
