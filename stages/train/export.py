"""Checkpoint -> Hugging Face directory (weights, config with the last phase's RoPE, tokenizer).

``zero_to_fp32`` consolidates the ZeRO shards (any stage) into fp32 weights only, so the
model is rebuilt from the config saved with the checkpoint, loaded with those weights and
written with ``save_pretrained``; the result loads with ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError, write_failure
from pipeline.fingerprint import fingerprint
from stages.train.checkpoint import HF_DIR, STATE, find_checkpoint, weights_only_loading

PREFIX = "model."  # StudentWithLoss holds the HF model as .model


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks one (and warns)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tag = find_checkpoint(ckpt)
    hf = tag / HF_DIR
    if not (hf / "config.json").is_file():
        raise UserError(f"{tag}: no {HF_DIR}/config.json saved with this checkpoint")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loading():
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    config = AutoConfig.from_pretrained(str(hf), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"{tag}: checkpoint weights do not fit the saved config (missing {sorted(missing)[:4]}, "
                        f"unexpected {sorted(unexpected)[:4]})")
    if tied:
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    meta = json.loads((tag / STATE).read_text())
    try:
        with atomic_dir(out, "export", keep=(tag.parent,)) as tmp:  # a failed write leaves nothing
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "posdistill.json").write_text(json.dumps({"checkpoint": str(tag), "step": meta["step"],
                                                             "phase": meta["phase"],
                                                             "identity": fingerprint(meta.get("identity", {}))},
                                                            indent=2))
    except Exception as err:  # safetensors reports a full disk as a SafetensorError, without errno
        user = write_failure(err, out)
        if user is None:
            raise
        raise user from None
    return Path(out)


def is_exported(out: Path, step: int, identity: dict) -> bool:
    """True when ``out`` already holds the export of a checkpoint at ``step`` trained with
    ``identity`` (its inputs included): a student retrained on other inputs is exported anew."""
    try:
        meta = json.loads((Path(out) / "posdistill.json").read_text())
    except (OSError, ValueError):
        return False
    return (out / "config.json").is_file() and meta.get("step") == step and meta.get("identity") == fingerprint(identity)

