"""The student: a Llama-family model built from ``student.config`` or loaded from ``student.init``
(a local directory or a Hub id, ``pipeline.locate``).

Its vocabulary must be the teacher's: the cached targets are teacher token ids, and a
student with another vocabulary would silently learn a permutation of the wrong tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import StudentArch
from pipeline.errors import UserError
from pipeline.locate import is_remote, local_path
from stages.specs import TrainSpec


def teacher_vocab_size(spec: TrainSpec) -> tuple[int, str]:
    """The teacher's output vocabulary and where it came from (for error messages)."""
    model = spec.teacher_model
    if model and ((Path(model) / "config.json").is_file() or is_remote(model)):
        from stages.teacher import teacher_vocab

        try:
            return teacher_vocab(model), f"teacher.model {model}"
        except UserError:
            # A Hub id that cannot be fetched (or a bootstrap target not made yet): as for a missing
            # directory the tokenizer decides; the cache stage names the teacher's problem when it needs it.
            if not is_remote(model):
                raise
    from stages.tokenizer import load_tokenizer

    return len(load_tokenizer(spec.tokenizer)), f"data.tokenizer '{spec.tokenizer}'"


def student_vocab_size(model_config: Any) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.vocab_size)


def check_vocab(student_vocab: int, spec: TrainSpec, where: str) -> None:
    teacher_vocab, source = teacher_vocab_size(spec)
    if student_vocab != teacher_vocab:
        raise UserError(f"{where}: the student's vocabulary has {student_vocab} tokens but the teacher's "
                        f"({source}) has {teacher_vocab}; KD targets are teacher token ids, so they must match")


def student_config(spec: TrainSpec) -> tuple[Any, bool]:
    """(transformers config, fresh) without building weights: ``fresh`` = built from student.config."""
    scfg = spec.student
    if scfg is None:
        raise UserError("student: missing section (give student.init or student.config)")
    if scfg.init is not None:
        path = local_path(scfg.init, "student.init", "model", remote_code=scfg.trust_remote_code)
        if not (path / "config.json").is_file():
            raise UserError(f"student.init: '{scfg.init}' is not a Hugging Face model directory (no config.json)")
        from transformers import AutoConfig

        try:
            mcfg = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=scfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"student.init: cannot read '{scfg.init}': {str(err).splitlines()[0][:300]}") from None
        check_vocab(student_vocab_size(mcfg), spec, f"student.init ({scfg.init})")
        return mcfg, False
    from stages.tokenizer import load_tokenizer

    vocab, _ = teacher_vocab_size(spec)
    return llama_config(scfg.config, vocab, spec.phases[0].window_len, load_tokenizer(spec.tokenizer)), True


def llama_config(arch: StudentArch, vocab_size: int, max_positions: int, tok: Any) -> Any:
    """The LlamaConfig of a model built from scratch: a ``student.config`` student, or the
    bootstrapped teacher (``teacher.bootstrap`` has a student's sizes)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads or arch.num_attention_heads,
        head_dim=arch.head_dim or arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        use_cache=False,
    )


def fresh_model(model_config: Any, seed: int, attn: str | None) -> Any:
    """A float32 model initialised from ``seed`` (the global torch RNG)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model_config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, attn_implementation=attn)


def build_student(spec: TrainSpec, model_config: Any | None = None) -> tuple[Any, bool]:
    """(model in float32, fresh). A fresh student is initialised from the spec's seed."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.attention import implementation

    scfg = spec.student
    mcfg, fresh = (model_config, scfg.init is None) if model_config is not None else student_config(spec)
    attn = implementation(scfg.attn_implementation)
    if fresh:
        model = fresh_model(mcfg, spec.seed, attn)
    else:
        try:
            path = local_path(scfg.init, "student.init", "model", remote_code=scfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True, attn_implementation=attn,
                trust_remote_code=scfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"student.init: cannot load '{scfg.init}': "
                            f"{str(err).splitlines()[0][:300]}") from None
    model.config.use_cache = False
    if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
        raise UserError(f"student: {type(model).__name__} has no model.rotary_emb; phase-wise RoPE needs a "
                        "Llama-family model")
    return model, fresh
