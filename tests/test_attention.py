"""Attention backends on packed windows: per-document results equal to running each document
alone (values and gradients), and no ``[L, L]`` tensor anywhere in a ``doc_masked`` step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig

from pipeline.errors import UserError
from stages.attention import check_backend, documents, implementation
from stages.teacher import model_inputs


def tiny(attn: str, vocab: int = 96) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 16,
                      use_cache=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()


def window(L: int, starts: list[int], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 96, size=(1, L)))


class LargestTensor(TorchDispatchMode):
    """The largest tensor any aten op returns (masks, scores, logits alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def test_documents_follow_transformers_rule() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert documents(pos) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_doc_masked_equals_each_document_alone(attn: str) -> None:
    """Per-document attention gives, for every document, the logits and gradients of the stock
    backend run on that document alone — including a one-token document."""
    L, starts = 64, [0, 17, 18, 40]
    ids = window(L, starts)
    model = tiny(implementation(attn))
    stock = tiny(attn)
    stock.load_state_dict(model.state_dict())
    packed = model(**model_inputs(ids, [starts], "doc_masked")).logits
    packed.float().square().mean().backward()
    for s, e in zip(starts, starts[1:] + [L]):
        alone = stock(input_ids=ids[:, s:e], use_cache=False).logits
        torch.testing.assert_close(packed[:, s:e], alone, atol=1e-5, rtol=1e-5)
    # Gradients: the stock backend with its dense block-diagonal mask on the whole window.
    ref = stock(**model_inputs(ids, [starts], "doc_masked")).logits
    ref.float().square().mean().backward()
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cross_doc_and_padding_match_stock_sdpa() -> None:
    """A cross_doc window is one document; a padded batch (evals) takes the stock mask path."""
    model, stock = tiny(implementation("sdpa")), tiny("sdpa")
    stock.load_state_dict(model.state_dict())
    ids = window(48, [0])
    a = model(**model_inputs(ids, [[0]], "cross_doc")).logits
    torch.testing.assert_close(a, stock(**model_inputs(ids, [[0]], "cross_doc")).logits, atol=1e-6, rtol=1e-6)
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 5:],
                               stock(input_ids=ids, attention_mask=mask).logits[:, 5:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_long_doc_masked_step_builds_no_window_square(attn: str) -> None:
    """Forward and backward of a 4096-token doc_masked window (256-token documents): no tensor
    as large as L×L/16 — the stock backend's mask alone is L×L, which the same probe sees."""
    L = 4096
    starts = list(range(0, L, 256))
    ids = window(L, starts)
    inputs = model_inputs(ids, [starts], "doc_masked")
    probe = LargestTensor()
    model = tiny(implementation(attn))
    with probe:
        model.model(**inputs).last_hidden_state.square().mean().backward()
    assert probe.numel < L * L // 16, (probe.numel, probe.op)

    stock_probe = LargestTensor()
    stock = tiny(attn)
    with torch.no_grad(), stock_probe:
        stock.model(**inputs)
    assert stock_probe.numel >= L * L, (stock_probe.numel, stock_probe.op)


def test_backend_checks_name_the_field() -> None:
    with pytest.raises(UserError, match="student.attn_implementation: unknown attention backend 'flash'"):
        check_backend("flash", "student.attn_implementation")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="teacher.attn_implementation: flash_attention_2 needs the flash-attn"):
            check_backend("flash_attention_2", "teacher.attn_implementation", "cpu")
    with pytest.raises(UserError, match="student.attn_implementation: flex_attention has no backward pass on cpu"):
        check_backend("flex_attention", "student.attn_implementation", "cpu", training=True)
    check_backend("sdpa", "student.attn_implementation", "cpu", training=True)
    check_backend("flex_attention", "teacher.attn_implementation", "cpu")


def test_flex_attention_teacher_forward_on_cpu() -> None:
    """flex_attention (a BlockMask, no dense mask) forward on CPU, as a caching teacher runs it,
    equals per-document sdpa on a doc_masked window."""
    L, starts = 512, [0, 100, 101, 300]
    ids = window(L, starts)
    flex, ref = tiny("flex_attention"), tiny(implementation("sdpa"))
    ref.load_state_dict(flex.state_dict())
    inputs = model_inputs(ids, [starts], "doc_masked")
    with torch.no_grad():
        torch.testing.assert_close(flex(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-5)
