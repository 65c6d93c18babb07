"""Loading models for evaluation and splitting them into body and head.

Long contexts are scored without the full ``[sequence, vocab]`` logits: the body gives the
final hidden states ``[B, T, H]`` and the head (``lm_head``) is applied only where a
prediction is scored (the answer positions) or tile by tile (loss by position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.locate import hub_ref, local_path
from stages.attention import implementation
from stages.teacher import DTYPES
from stages.tokenizer import TOKENIZER_FILES



@dataclass
class LoadedModel:
    """A causal LM with a name for reports and the tokenizer its probes are built with."""

    name: str
    model: Any
    tokenizer: Any
    path: str | None = None


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"eval.device: '{spec}' asked for but no CUDA device is visible")
    return torch.device(spec)


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_model(path: str | Path, dtype: str = "float32", device: str = "auto",
               tokenizer: str = "byte", name: str | None = None) -> LoadedModel:
    """A Hugging Face model (a local directory, or a Hub id ``org/name[@revision]`` fetched into
    the Hub cache; never remote code) in eval mode.

    The tokenizer comes from the model directory when it has one, else from ``tokenizer``
    (``data.tokenizer``), so probes are built in the token space the model was trained on.
    """
    from transformers import AutoModelForCausalLM

    from stages.tokenizer import load_tokenizer

    p = local_path(path, "--model", "model")
    if not (p / "config.json").is_file():
        raise UserError(f"--model: '{path}' is not a Hugging Face model directory (no config.json)")
    hub = hub_ref(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=False,
            attn_implementation=implementation("sdpa"))
    except Exception as err:  # transformers raises many types for "not a model"
        raise UserError(f"--model: cannot load '{path}' ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    model.to(resolve_device(device)).eval()
    tok = load_tokenizer(str(p), field="--model") if has_tokenizer(p) else load_tokenizer(tokenizer)
    return LoadedModel(name=name or (hub.repo_id.split("/")[1] if hub else p.name), model=model, tokenizer=tok,
                       path=str(p))


def unique_names(paths: list[str]) -> list[str]:
    """Short report names: the directory name, with the parent added (then an index) on clashes."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).resolve().parent.name}/{Path(p).resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def split_model(model: Any) -> tuple[Any, Any]:
    """(body, head): the decoder stack returning final hidden states, and the output projection."""
    body = getattr(model, "model", None)
    if body is None and hasattr(model, "get_decoder"):
        body = model.get_decoder()
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if body is None or head is None:
        raise UserError(f"model {type(model).__name__} has no decoder body / lm_head to score with")
    return body, head


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def final_hidden(body: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, H]``; attention is causal across the whole row
    when position ids increase by one (HF derives packed-document masks from them otherwise)."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
