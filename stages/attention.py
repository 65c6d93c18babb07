"""Attention backends for packed windows: ``doc_masked`` never builds an ``[L, L]`` mask.

transformers (5.x) turns restarting ``position_ids`` into a block-diagonal causal mask. For
``flash_attention_2`` that mask is never materialised (the kernel goes varlen from the same
``position_ids``) and for ``flex_attention`` it is a ``BlockMask`` (one bit per 128×128 tile),
but for ``sdpa`` and ``eager`` it is a dense ``[B, 1, L, L]`` tensor: 16 GB of booleans for
one 128k window, before attention runs. So ``sdpa`` and ``eager`` are loaded as a variant
that builds no mask and runs causal attention once per document, found from the same
``position_ids`` (a position that is not its predecessor + 1 starts a document — the rule
transformers uses). A ``cross_doc`` window is one document, so that is plain causal
attention over the window, computed exactly as stock sdpa does. When a 2D padding mask or a
KV cache is in play (generation in evals) the stock mask and kernel are used unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, get_args

import torch

from pipeline.config import AttnBackend
from pipeline.errors import UserError

BACKENDS: tuple[str, ...] = get_args(AttnBackend)
_PER_DOCUMENT = {"sdpa": "posdistill_sdpa", "eager": "posdistill_eager"}


def check_backend(name: str | None, field: str, device: str | None = None, training: bool = False) -> None:
    """One clear error before any model loads: unknown backend, or one this machine cannot run."""
    if name is None:
        return
    if name not in BACKENDS:
        raise UserError(f"{field}: unknown attention backend '{name}'; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(f"{field}: flash_attention_2 needs the flash-attn package "
                            "(pip install flash-attn --no-build-isolation); use sdpa or flex_attention instead")
        if device is not None and not str(device).startswith("cuda"):
            raise UserError(f"{field}: flash_attention_2 runs on CUDA GPUs only; this run is on {device} "
                            "(use sdpa, which runs per document on CPU)")
    if name == "flex_attention":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            raise UserError(f"{field}: flex_attention needs torch >= 2.5 (installed: {torch.__version__})")
        if training and device is not None and not str(device).startswith("cuda"):
            raise UserError(f"{field}: flex_attention has no backward pass on {device} in torch "
                            f"{torch.__version__}; train with sdpa there (per document, no [L, L] mask)")


def implementation(name: str | None) -> str | None:
    """The ``attn_implementation`` to load a model with: sdpa/eager become their per-document
    variants (registered with transformers on first use); other backends pass through."""
    if name is None:
        name = "sdpa"
    if name not in _PER_DOCUMENT:
        return name
    _register()
    return _PER_DOCUMENT[name]


def documents(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the ``[start, end)`` spans of its documents."""
    pos = position_ids
    first = pos[:, :1] - 1
    starts = torch.diff(pos, prepend=first, dim=-1) != 1
    L = pos.shape[1]
    out = []
    for row in starts:
        s = torch.nonzero(row).flatten().tolist()
        if not s or s[0] != 0:
            s = [0] + s
        out.append(list(zip(s, s[1:] + [L])))
    return out


def _causal_bias(n: int, like: torch.Tensor) -> torch.Tensor:
    """The additive ``[1, 1, n, n]`` causal mask eager attention takes (one document's size)."""
    bias = torch.full((n, n), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return torch.triu(bias, diagonal=1)[None, None]


def _per_document(inner: Callable[..., Any], needs_bias: bool) -> Callable[..., Any]:
    def forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        position_ids = kwargs.get("position_ids")
        L = query.shape[2]
        if (attention_mask is not None or position_ids is None or key.shape[2] != L or L == 1
                or position_ids.shape[-1] != L):  # e.g. Ulysses: local position ids, full sequence
            return inner(module, query, key, value, attention_mask, **kwargs)
        if position_ids.shape[0] != query.shape[0]:
            position_ids = position_ids.expand(query.shape[0], -1)
        rows = []
        for b, spans in enumerate(documents(position_ids)):
            parts = []
            for s, e in spans:
                bias = _causal_bias(e - s, query) if needs_bias else None
                out, _ = inner(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                               bias, **kwargs)
                parts.append(out)  # [1, n, H, D]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None
    return forward


def _no_mask_when_unpadded(stock: Callable[..., Any]) -> Callable[..., Any]:
    """The mask factory for a per-document variant: no mask when the attention function will split
    documents itself (no padding mask, no KV cache offset); the stock mask otherwise."""
    def make(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function: Callable[..., Any] | None = None, attention_mask: torch.Tensor | None = None,
             **kwargs: Any) -> Any:
        if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
            return None
        extra = {"mask_function": mask_function} if mask_function is not None else {}
        return stock(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **extra, **kwargs)
    return make


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    AttentionInterface.register(_PER_DOCUMENT["sdpa"], _per_document(sdpa_attention_forward, needs_bias=False))
    AttentionInterface.register(_PER_DOCUMENT["eager"], _per_document(eager_attention_forward, needs_bias=True))
    AttentionMaskInterface.register(_PER_DOCUMENT["sdpa"], _no_mask_when_unpadded(sdpa_mask))
    AttentionMaskInterface.register(_PER_DOCUMENT["eager"], _no_mask_when_unpadded(eager_mask))
    _registered = True
