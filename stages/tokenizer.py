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
