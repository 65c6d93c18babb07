"""Tokenizers: a built-in byte-level one and any Hugging Face tokenizer (a local directory, or
a Hub id ``org/name[@revision]`` fetched through ``pipeline.locate``).

The byte tokenizer is a real ``PreTrainedTokenizerFast`` (ids 0..255 are the raw bytes,
specials follow), so an exported student loads with ``AutoTokenizer.from_pretrained``
like any other model, and using it fetches nothing.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import UserError
from pipeline.fingerprint import dir_identity
from pipeline.locate import TOKENIZER_FILES, hub_ref, local_path, ref_identity

BYTE_SPECIALS = ["<pad>", "<s>", "</s>", "<sep>"]  # ids 256, 257, 258, 259
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIALS)


__all__ = ["BYTE_SPECIALS", "BYTE_VOCAB_SIZE", "TOKENIZER_FILES", "build_byte_tokenizer", "load_tokenizer",
           "tokenizer_identity"]


def build_byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    for i, tok in enumerate(BYTE_SPECIALS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # No regex split: every byte becomes exactly one token, whatever the text.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", sep_token="<sep>",
        model_max_length=1 << 30,
    )
    return tok


def load_tokenizer(spec: str, field: str = "data.tokenizer") -> Any:
    if spec == "byte":
        return build_byte_tokenizer()
    path = local_path(spec, field, "tokenizer")
    if not path.is_dir():
        raise UserError(f"{field}: '{spec}' is neither 'byte' nor a tokenizer directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many types for "not a tokenizer"
        raise UserError(f"{field}: '{spec}' is not a Hugging Face tokenizer directory ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]})") from None


def tokenizer_identity(spec: str, field: str = "data.tokenizer") -> Any:
    """The tokenizer files' contents; for a Hub id also its repository and resolved commit."""
    if spec == "byte":
        return {"kind": "byte", "vocab": BYTE_VOCAB_SIZE, "version": 1}
    path = local_path(spec, field, "tokenizer")
    if not path.is_dir():
        raise UserError(f"{field}: '{spec}' is neither 'byte' nor a tokenizer directory")
    files = [f for f in dir_identity(path) if f["name"] in TOKENIZER_FILES]
    if hub_ref(spec, "tokenizer") is None:
        return files  # a local directory's identity is what it always was
    return {"files": files, **ref_identity(spec, field, "tokenizer")}


# Texts whose encodings two tokenizers must agree on to be the same tokenizer: ASCII prose,
# digits, runs of whitespace, code, punctuation, accents, CJK, emoji — where BPEs, byte-level
# models and sentencepiece models of the same size still differ.
_PROBES = (
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159 1,000,000",
    "  two spaces,\ttabs\t and\nnew lines\r\n\n   indented",
    "def f(x):\n    return {'k': [x ** 2, x // 3]}  # code <tag attr=\"v\"/>",
    "Ünïcödé naïve café — ‘quotes’ “quotes” ½ € ß",
    "日本語のテキスト 中文文本 한국어 텍스트 Ελληνικά русский 🙂🚀",
)


def tokenizer_mismatch(a: Any, b: Any) -> str | None:
    """Why tokenizers ``a`` and ``b`` are not the same one (None if they are): size, the
    token -> id table, the ids of the probe texts and the special tokens all must agree — a
    vocabulary size alone lets a byte tokenizer pass under a BPE teacher of more ids."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tokens"
    if a.get_vocab() != b.get_vocab():
        return "the same number of tokens but other tokens or ids"
    for text in _PROBES:
        ia, ib = a.encode(text, add_special_tokens=False), b.encode(text, add_special_tokens=False)
        if ia != ib:
            return f"different ids for the text {text[:24]!r}"
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, special, None) != getattr(b, special, None):
            return f"{special} {getattr(a, special, None)} vs {getattr(b, special, None)}"
    return None


def teacher_tokenizer_spec(model: str, tokenizer: str | None) -> str:
    """Where the teacher's tokenizer comes from: ``teacher.tokenizer`` if the config names it,
    else the files beside the teacher's weights."""
    if tokenizer is not None:
        return tokenizer
    path = local_path(model, "teacher.model", "tokenizer")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"teacher.model: '{model}' has no tokenizer files, so data.tokenizer cannot be checked "
                        "against it; set teacher.tokenizer to the tokenizer the teacher was trained with "
                        "('byte' or a tokenizer directory)")
    return model


def check_teacher_tokenizer(data_tokenizer: str, model: str, tokenizer: str | None = None) -> None:
    """The windows must be tokenized as the teacher reads them: one line naming both otherwise."""
    theirs = teacher_tokenizer_spec(model, tokenizer)
    field = "teacher.tokenizer" if tokenizer is not None else "teacher.model"
    if theirs != "byte" and data_tokenizer != "byte":
        mine_files = tokenizer_identity(data_tokenizer)
        their_files = tokenizer_identity(theirs, field)
        strip = lambda i: i.get("files") if isinstance(i, dict) else i  # noqa: E731 - Hub refs aside
        if strip(mine_files) == strip(their_files):
            return  # the same files: nothing to load
    why = tokenizer_mismatch(load_tokenizer(data_tokenizer), load_tokenizer(theirs, field))
    if why is not None:
        raise UserError(f"data.tokenizer '{data_tokenizer}' is not the tokenizer of {field} '{theirs}' ({why}): "
                        "tokenize the data with the teacher's tokenizer (set data.tokenizer to it)")
