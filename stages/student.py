"""The student: a Llama-family model built from ``student.config`` or loaded from ``student.init``
(a local directory or a Hub id, ``pipeline.locate``).

Its vocabulary must be the teacher's: the cached targets are teacher token ids, and a
student with another vocabulary would silently learn a permutation of the wrong tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import StudentArch
from pipeline.errors import UserError
from pipeline.locate import is_remote, local_path
from stages.specs import TrainSpec
from stages.tokenizer import load_tokenizer


def teacher_vocab_size(spec: TrainSpec) -> tuple[int, str]:
    """The teacher's output vocabulary and where it came from (for error messages)."""
    model = spec.teacher_model
    if model and ((Path(model) / "config.json").is_file() or is_remote(model)):
        from stages.model_config import teacher_vocab

        try:
            return teacher_vocab(model), f"teacher.model {model}"
        except UserError:
            # A Hub id that cannot be fetched (or a bootstrap target not made yet): as for a missing
            # directory the tokenizer decides; the cache stage names the teacher's problem when it needs it.
            if not is_remote(model):
                raise
    return len(load_tokenizer(spec.tokenizer)), f"data.tokenizer '{spec.tokenizer}'"


def student_vocab_size(model_config: Any) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.vocab_size)


def check_vocab(student_vocab: int, spec: TrainSpec, where: str) -> None:
    teacher_vocab, source = teacher_vocab_size(spec)
    if student_vocab != teacher_vocab:
        raise UserError(f"{where}: the student's vocabulary has {student_vocab} tokens but the teacher's "
                        f"({source}) has {teacher_vocab}; KD targets are teacher token ids, so they must match")


SEED_RANGE = 2**32  # numpy refuses a negative seed, torch one past 2**64; 2**32 is what both take


def check_seed(seed: int, field: str) -> None:
    """A seed every RNG it reaches accepts (the reader's numpy shuffle, torch's init)."""
    if not 0 <= seed < SEED_RANGE:
        raise UserError(f"{field}: seed {seed} is outside [0, 2**32)")


def check_student_seed(spec: TrainSpec) -> None:
    """:func:`check_seed` on a student's seed, naming the fields it may come from."""
    check_seed(spec.seed, f"train.seed (or run.seed, students[].seeds) of student {spec.label}")


ARCH_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size")


def check_arch(sizes: Mapping[str, Any], prefix: str, context: str = "") -> None:
    """Sizes a Llama-family attention can be built from, told before any weight exists (the
    alternative is a traceback inside a rank): positive integers; heads that split
    ``hidden_size`` evenly (LlamaConfig's rule); an even head width, since RoPE rotates
    pairs of dimensions; query heads in whole groups per key/value head. ``prefix`` names
    the fields (``student.config.``), ``context`` leads the message (``student.init X: ``)."""
    for key in ARCH_SIZES:
        v = sizes.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UserError(f"{context}{prefix}{key}: {v!r} is not a positive integer")
    hidden, heads = sizes.get("hidden_size"), sizes.get("num_attention_heads")
    if hidden is None or heads is None:
        return
    kv, head_dim = sizes.get("num_key_value_heads") or heads, sizes.get("head_dim")
    if head_dim is not None and head_dim % 2:
        raise UserError(f"{context}{prefix}head_dim {head_dim} is odd: RoPE rotates pairs of dimensions, so a head "
                        "needs an even width")
    if hidden % heads:  # transformers' LlamaConfig refuses it even with head_dim given
        raise UserError(f"{context}{prefix}hidden_size {hidden} is not divisible by {prefix}num_attention_heads "
                        f"{heads}")
    if head_dim is None and (hidden // heads) % 2:
        raise UserError(f"{context}{prefix}hidden_size {hidden} / {prefix}num_attention_heads {heads} gives an odd "
                        f"head size of {hidden // heads}: RoPE rotates pairs of dimensions, so a head needs an even "
                        f"width (or give an even {prefix}head_dim)")
    if heads % kv:
        raise UserError(f"{context}{prefix}num_attention_heads {heads} is not divisible by "
                        f"{prefix}num_key_value_heads {kv} (each key/value head serves a whole group of query heads)")


def check_hf_arch(conf: Mapping[str, Any], init: str) -> None:
    """:func:`check_arch` on a ``student.init`` model's config.json (its text part, if nested)."""
    check_arch(conf.get("text_config") or conf, "", f"student.init ({init}) config.json: ")


def check_vocab_covers(vocab: int, tokens: int, where: str) -> None:
    """Every id of a tokenizer of ``tokens`` ids has an embedding row (else an index error mid-forward)."""
    if vocab < tokens:
        raise UserError(f"{where}: a vocabulary of {vocab} tokens is smaller than data.tokenizer's {tokens}: "
                        "token ids past it have no embedding")


def hf_sizes(model_config: Any) -> dict[str, Any]:
    """The sizes :func:`check_arch` reads, from a transformers config (its text part)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return {k: getattr(text, k, None) for k in ARCH_SIZES}


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
        where = f"student.init ({scfg.init})"
        check_hf_arch(hf_sizes(mcfg), scfg.init)
        check_vocab(student_vocab_size(mcfg), spec, where)
        check_vocab_covers(student_vocab_size(mcfg), len(load_tokenizer(spec.tokenizer)), where)
        return mcfg, False
    check_arch(scfg.config.model_dump(), "student.config.")
    vocab, source = teacher_vocab_size(spec)
    tok = load_tokenizer(spec.tokenizer)
    check_vocab_covers(vocab, len(tok), f"student.config (vocabulary from {source})")
    return llama_config(scfg.config, vocab, spec.phases[0].window_len, tok), True


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
