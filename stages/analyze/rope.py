"""RoPE frequency pairs in Hugging Face's layout.

HF Llama-family attention rotates with ``rotate_half``: within a head of dimension d, the
rotation plane of frequency i (inverse frequency ``theta^(-2i/d)``) is the pair of
dimensions (i, i + d/2), not (2i, 2i+1) as in the original interleaved layout (HF's
conversion scripts permute W_q and W_k rows into this layout). With partial rotary
embeddings only the first ``rot = 2 * len(inv_freq)`` dimensions rotate, pairs (i, i + rot/2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stages.rope import head_dim_of  # one definition for training and analysis


def rope_pairs(head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """``[n_pairs, 2]`` dimension indices of each rotation plane, lowest wavelength first."""
    rot = rotary_dim or head_dim
    half = rot // 2
    i = torch.arange(half)
    return torch.stack([i, i + half], dim=1)


def inv_freq_of(config: Any) -> torch.Tensor:
    """Inverse frequencies ``[n_pairs]`` the model's rotary embedding uses (float64)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(config.rope_parameters or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = int(head_dim_of(config) * params.get("partial_rotary_factor", 1.0))
        base = float(params["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.double()


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """Positions per full turn of each pair: ``2 pi / inv_freq``."""
    return 2 * math.pi / inv_freq


def rotate_pairs(x: torch.Tensor, head_dim: int, inv_freq: torch.Tensor, delta: float) -> torch.Tensor:
    """Rotate every head's RoPE pairs by ``delta`` positions: ``R(delta) x``.

    ``x`` is ``[..., n_heads * head_dim]`` (or ``[..., n_heads, head_dim]``). Since RoPE then
    applies ``R(t)`` and rotations in one plane commute, the result is rotated as if it sat
    at position ``t + delta``. At ``delta = 0`` this is the identity, bit for bit (cos = 1, sin = 0).
    """
    shape = x.shape
    xh = x.reshape(*shape[:-1], -1, head_dim) if shape[-1] != head_dim else x  # [..., H, d]
    half = inv_freq.numel()
    ang = delta * inv_freq.double()  # [half], float64 so large deltas keep their phase
    cos = torch.cos(ang).to(device=x.device, dtype=x.dtype)
    sin = torch.sin(ang).to(device=x.device, dtype=x.dtype)
    x1, x2, rest = xh[..., :half], xh[..., half:2 * half], xh[..., 2 * half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.reshape(shape)
