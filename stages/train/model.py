"""The module DeepSpeed trains: the student body plus the tiled KD loss on its final hidden states.

The LM head never runs as a module: ``tiled_kd_loss`` reads its weight and computes the
loss tile by tile, so the [window, vocab] logits never exist. Under ZeRO-3 that weight is
used outside ``lm_head.forward``, so it is registered as an external parameter of this
wrapper, which makes DeepSpeed gather it for the wrapper's forward and backward.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from torch import nn

from pipeline.config import KDConfig
from stages.kd_loss import KDTargets, tiled_kd_loss
from stages.train.data import Batch


class StudentWithLoss(nn.Module):
    def __init__(self, model: nn.Module, tile: int):
        super().__init__()
        self.model = model
        self.tile = tile
        self.head = model.get_output_embeddings()
        if getattr(self.head, "bias", None) is not None:
            raise ValueError("an LM head with a bias is not supported by the tiled KD loss")
        try:
            from deepspeed.zero import register_external_parameter

            register_external_parameter(self, self.head.weight)
        except ImportError:  # plain PyTorch use (benchmarks) needs no registration
            pass

    def forward(self, batch: Batch, kd: KDConfig):
        """Returns (loss, kd_sum, ce_sum) for this rank's positions of ``batch``."""
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      use_cache=False).last_hidden_state  # [B, l, H]
        H = hidden.shape[-1]
        targets = None
        if batch.ids is not None:
            m = batch.ids.shape[-1]
            targets = KDTargets(batch.ids.reshape(-1, m), batch.logp.reshape(-1, m),
                                None if batch.weights is None else batch.weights.reshape(-1, m))
        out = tiled_kd_loss(hidden.reshape(-1, H), self.head.weight, batch.labels.reshape(-1), targets,
                            alpha=kd.alpha, temperature=kd.temperature, tail=kd.tail, tile=self.tile,
                            kd_norm=batch.kd_norm or None, ce_norm=batch.ce_norm, loss=kd.loss, beta=kd.beta)
        return out.loss, out.kd_sum, out.ce_sum


def enable_tiled_mlp(model: nn.Module) -> int:
    """Route every MLP through DeepSpeed's TiledMLP (recomputed per sequence tile in backward),
    so MLP activations are bounded by one tile of ``hidden_size`` positions. Returns the count."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp_body(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shards = max(1, math.ceil(x.shape[-2] / x.shape[-1]))
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
        return TiledMLP.apply(mlp_body, self, x, shards, params)

    n = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(tiled_forward, module)
            n += 1
    return n


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant, as DeepSpeed ZeRO-3 needs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def setup_sequence_parallel(model: nn.Module, sp: int, micro_batch: int) -> Any:
    """Register Ulysses attention with transformers; returns the mpu for deepspeed.initialize."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=model.config._attn_implementation,
        sequence_parallel_size=sp, micro_batch_size=micro_batch, seq_length_is_variable=True)
