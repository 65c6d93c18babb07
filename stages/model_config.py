"""A model's config.json read without torch (``plan`` and the drivers' checks import this,
not the model code): the teacher's config and the context it was trained for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.locate import local_path


def teacher_config(model: str) -> tuple[dict[str, Any], Path]:
    """The teacher's config.json (its text part, when nested) and where it lies; no weights loaded."""
    path = local_path(model, "teacher.model", "config") / "config.json"
    if not path.is_file():
        raise UserError(f"teacher.model: '{model}' is not a Hugging Face model directory (no config.json)")
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"teacher.model: {path} is not readable JSON ({err})") from None
    if not isinstance(conf, dict):
        raise UserError(f"teacher.model: {path} is not a JSON object")
    return text_part(conf), path


def text_part(conf: dict[str, Any]) -> dict[str, Any]:
    """A config.json with its ``text_config`` (a multimodal model's language model) laid over it."""
    text = conf.get("text_config")
    return {**conf, **text} if isinstance(text, dict) else conf


def teacher_vocab(model: str) -> int:
    """The teacher's output vocabulary, from its config.json (no weights loaded)."""
    conf, path = teacher_config(model)
    vocab = conf.get("vocab_size")
    if not vocab:
        raise UserError(f"teacher.model: {path} has no vocab_size")
    return int(vocab)


SCALED_ROPE = ("linear", "dynamic", "yarn", "longrope", "llama3")  # types that stretch the trained context


def scaled_context(conf: dict[str, Any]) -> tuple[int, str] | None:
    """The context a RoPE-scaled teacher covers, ``factor * original_max_position_embeddings``
    (the original defaults to ``max_position_embeddings``), and how that was read; None
    without scaling. Reads ``rope_parameters`` (transformers 5) or a legacy ``rope_scaling``,
    per layer type too (the widest entry counts)."""
    raw = conf.get("rope_parameters") or conf.get("rope_scaling")
    if not isinstance(raw, dict):
        return None
    entries = [raw] if any(k in raw for k in ("rope_type", "type")) else [v for v in raw.values() if isinstance(v, dict)]
    best: tuple[int, str] | None = None
    for e in entries:
        kind, factor = e.get("rope_type") or e.get("type"), e.get("factor")
        original = e.get("original_max_position_embeddings") or conf.get("original_max_position_embeddings") \
            or conf.get("max_position_embeddings")
        if kind not in SCALED_ROPE or not isinstance(factor, (int, float)) or not isinstance(original, int):
            continue
        covered = int(factor * original)
        if best is None or covered > best[0]:
            best = (covered, f"{kind} RoPE scaling, factor {factor:g} x original_max_position_embeddings {original}")
    return best


def check_context(model: str, window_len: int) -> str | None:
    """:func:`context_note` on the teacher's config.json."""
    conf, path = teacher_config(model)
    return context_note(conf, f"teacher.model {model}", window_len, path)


def context_note(conf: dict[str, Any], where: str, window_len: int, path: Path | str) -> str | None:
    """A teacher asked for windows longer than it was trained on is refused: its top-k past
    ``max_position_embeddings`` would be targets from positions it never saw, silently. When
    the config's RoPE scaling stretches the context over the window, returns the line that
    says so (the caller logs it); else None."""
    limit = conf.get("max_position_embeddings")
    if not isinstance(limit, int) or limit >= window_len:
        return None
    scaled = scaled_context(conf)
    if scaled is not None and scaled[0] >= window_len:
        return (f"{where}: max_position_embeddings {limit} is below the {window_len}-token window; "
                f"its {scaled[1]} covers {scaled[0]}")
    how = f"; its {scaled[1]} covers only {scaled[0]}" if scaled else ""
    raise UserError(f"{where}: max_position_embeddings {limit} (in {path}) is below the window of "
                    f"{window_len} tokens (pack.window_len or the phase's window_len){how}: shorten the window, or "
                    "use a teacher (or rope_parameters) trained for it")
