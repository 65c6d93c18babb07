"""Small builders shared by tests and benchmarks (tiny models, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_tiny_llama(dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A random LlamaForCausalLM (vocab 260, hidden 64, 2 layers, 4 heads) plus the byte
    tokenizer, saved as a Hugging Face directory. ``overrides`` go to ``LlamaConfig``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from stages.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer

    params: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=257, eos_token_id=258, pad_token_id=256, tie_word_embeddings=False,
    )
    params.update(overrides)
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**params))
    out = Path(dir)
    model.save_pretrained(out)
    build_byte_tokenizer().save_pretrained(out)
    return out
