"""The DeepSpeed config of a run: what posdistill derives from ``train``, merged with the
user's own DeepSpeed JSON (``train.deepspeed.config``) without silently overriding either."""

from __future__ import annotations

from typing import Any

from pipeline.errors import UserError


def precision(t: Any, gpu: bool) -> str:
    """``train.precision`` resolved: bf16 on a GPU and fp32 on CPU unless set."""
    p = t.precision if t.precision != "auto" else ("bf16" if gpu else "fp32")
    if p == "fp16" and not gpu:
        raise UserError("train.precision: fp16 needs a GPU (on CPU use bf16 or fp32)")
    return p


def deepspeed_config(t: Any, geo: Any, gpu: bool) -> dict[str, Any]:
    """What posdistill derives from the config, merged with ``train.deepspeed.config``; a key
    set differently in both is an error naming both values ("auto" takes ours)."""
    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    for kind, device in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if device != "none":
            zero[kind] = {"device": device, **({"nvme_path": ds.nvme_path} if device == "nvme" else {})}
    p = precision(t, gpu)
    out: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": geo.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": p == "bf16"},
        "fp16": {"enabled": p == "fp16", **({"loss_scale": 0, "initial_scale_power": 16} if p == "fp16" else {})},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return merge_ds_config(out, ds.config)


# Where each derived key comes from, for the conflict message.
_DERIVED_FROM = {"train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch",
                 "gradient_accumulation_steps": "train.batch_size / (micro_batch x data-parallel ranks)",
                 "gradient_clipping": "train.grad_clip", "optimizer": "train.lr, betas, eps, weight_decay",
                 "zero_optimization": "train.deepspeed", "bf16": "train.precision", "fp16": "train.precision"}


def merge_ds_config(ours: dict[str, Any], theirs: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = dict(ours)
    for key, value in theirs.items():
        where = f"{path}.{key}" if path else key
        if value == "auto":  # HF-Trainer style: take what posdistill derives (or leave it unset)
            continue
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = merge_ds_config(out[key], value, where)
        elif value != out[key]:
            source = _DERIVED_FROM.get(where.split(".")[0], "the config")
            raise UserError(f"train.deepspeed.config: {where} is {value!r} there, but posdistill derives "
                            f"{out[key]!r} from {source}; remove it from the DeepSpeed config or set {source}")
    return out

