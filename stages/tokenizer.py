"""Tokenizers: a built-in byte-level one and any Hugging Face tokenizer (a local directory, or
a Hub id ``org/name[@revision]`` fetched through ``pipeline.locate``).

The byte tokenizer is a real ``PreTrainedTokenizerFast`` (ids 0..255 are the raw bytes,
specials follow), so an exported student loads with ``AutoTokenizer.from_pretrained``
like any other model, and using it fetches nothing.
"""

from __future__ import annotations

import bisect
import functools
import re
from typing import Any, Iterator

import numpy as np

from pipeline.errors import UserError
from pipeline.fingerprint import dir_identity
from pipeline.locate import TOKENIZER_FILES, hub_ref, local_path, ref_identity

BYTE_SPECIALS = ["<pad>", "<s>", "</s>", "<sep>"]  # ids 256, 257, 258, 259
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIALS)
BYTE_BOS = 256 + BYTE_SPECIALS.index("<s>")


__all__ = ["BYTE_BOS", "BYTE_SPECIALS", "BYTE_VOCAB_SIZE", "PIECE_CHARS", "TOKENIZER_FILES", "TextEncoder",
           "build_byte_tokenizer", "byte_ids", "load_tokenizer", "tokenizer_identity"]


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


@functools.lru_cache(maxsize=8)
def check_teacher_tokenizer(data_tokenizer: str, model: str, tokenizer: str | None = None) -> None:
    """The windows must be tokenized as the teacher reads them: one line naming both otherwise.
    Memoised: the graph's early check and the cache job's own check ask the same question."""
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


# ----------------------------------------------------------------------------- encoding in pieces

PIECE_CHARS = 1 << 18  # a document longer than this is encoded piece by piece
_CONTEXT = 512  # characters each side of a seam that decide whether it is one
_TRIES = 8  # seam candidates tried per attempt (then the piece grows and it tries again)
_SPECIAL = re.compile("|".join(re.escape(t) for t in sorted(BYTE_SPECIALS, key=len, reverse=True)))
_SEAM = re.compile(r"(?<=\S)(?=\s)")


def byte_ids(text: str) -> np.ndarray:
    """The byte tokenizer's ids for ``text``, as ``build_byte_tokenizer()`` gives them (its
    specials spelled out in the text are those specials), without building Python lists."""
    parts = []
    at = 0
    for m in _SPECIAL.finditer(text) if "<" in text else ():
        parts.append(np.frombuffer(text[at:m.start()].encode("utf-8"), dtype=np.uint8))
        parts.append(np.array([256 + BYTE_SPECIALS.index(m.group())]))
        at = m.end()
    parts.append(np.frombuffer(text[at:].encode("utf-8"), dtype=np.uint8))
    return np.concatenate(parts).astype(np.int32) if len(parts) > 1 else parts[0].astype(np.int32)


class TextEncoder:
    """Token ids of documents, whole or streamed piece by piece with the same result.

    A document longer than ``PIECE_CHARS`` is cut at seams and each part encoded alone, so
    memory does not grow with its length. For the byte tokenizer any seam outside a special's
    spelling is exact. For a Hugging Face tokenizer a seam is taken only where the ids around
    it (``_CONTEXT`` characters each side) are the same whether the text is encoded across it
    or from it on, and each part is encoded with that left context, so prefix spaces and
    merges across the seam cannot differ; where no place passes, the part grows until one does.
    A slow (Python) tokenizer has no offsets to check with and encodes the document whole.
    """

    def __init__(self, tok: Any, byte: bool):
        self.tok = tok
        self.byte = byte
        self.bos_token_id = BYTE_BOS if byte else tok.bos_token_id
        self.vocab_size = BYTE_VOCAB_SIZE if byte else len(tok)

    @classmethod
    def load(cls, spec: str, field: str = "data.tokenizer") -> "TextEncoder":
        """The encoder of a ``data.tokenizer`` value; the byte tokenizer's needs no
        ``transformers`` (its import alone is seconds and hundreds of MB)."""
        return cls(None, True) if spec == "byte" else cls(load_tokenizer(spec, field), False)

    def batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.byte or not texts:
            return [byte_ids(t) for t in texts]
        return [np.asarray(ids, dtype=np.int32) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def stream(self, pieces: Iterator[str]) -> Iterator[np.ndarray]:
        if self.byte:
            yield from self._byte_stream(pieces)
        elif not getattr(self.tok, "is_fast", False):
            yield from self.batch(["".join(pieces)])
        else:
            yield from self._hf_stream(pieces)

    def _byte_stream(self, pieces: Iterator[str]) -> Iterator[np.ndarray]:
        held, at = "", 0
        longest = max(map(len, BYTE_SPECIALS))
        for piece in pieces:
            held = held[at:] + piece
            at = 0
            while len(held) - at >= PIECE_CHARS:
                cut = at + PIECE_CHARS
                tail = held[cut - (longest - 1):cut]
                if "<" in tail:  # a special's spelling may go on past the cut
                    cut -= len(tail) - tail.index("<")
                yield byte_ids(held[at:cut])
                at = cut
        if len(held) > at:
            yield byte_ids(held[at:])

    def _encode(self, text: str) -> tuple[list[int], list[int], list[int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        return list(enc["input_ids"]), [s for s, _ in offsets], [e for _, e in offsets]

    def _hf_stream(self, pieces: Iterator[str]) -> Iterator[np.ndarray]:
        text, base = "", 0  # text[:base]: context already encoded; text[base:]: not yet
        span = PIECE_CHARS  # grows while no seam passes
        for piece in pieces:
            keep = max(0, base - _CONTEXT)
            text, base = text[keep:] + piece, base - keep
            while len(text) - base >= span + _CONTEXT:
                found = self._seam(text, base, span)
                if found is None:
                    span *= 2
                    continue
                ids, base = found
                span = PIECE_CHARS
                yield ids
        w0 = max(0, base - _CONTEXT)
        ids, starts, _ = self._encode(text[w0:])
        yield np.asarray([i for i, s in zip(ids, starts) if s + w0 >= base], dtype=np.int32)

    def _seam(self, text: str, base: int, span: int) -> tuple[np.ndarray, int] | None:
        """(ids of text[base:cut], cut) for the latest seam in the next ``span`` characters
        that passes the check, else None."""
        w0, hi = max(0, base - _CONTEXT), base + span
        lo = base + span // 2
        ids, starts, ends = self._encode(text[w0:hi + _CONTEXT])
        starts, ends = [s + w0 for s in starts], [e + w0 for e in ends]
        spaced = [m.start() for m in _SEAM.finditer(text, lo, hi)][-_TRIES:][::-1]
        anywhere = list(range(hi, lo, -max(1, (hi - lo) // _TRIES)))[:_TRIES]
        for cut in spaced + anywhere:
            k = _boundary(starts, ends, cut)
            if k is None:
                continue
            v_ids, v_starts, v_ends = self._encode(text[cut - _CONTEXT:cut + _CONTEXT])
            v_starts = [s + cut - _CONTEXT for s in v_starts]
            v_ends = [e + cut - _CONTEXT for e in v_ends]
            if _boundary(v_starts, v_ends, cut) is None or _near(v_ids, v_starts, cut) != _near(ids, starts, cut):
                continue
            first = bisect.bisect_left(starts, base)
            return np.asarray(ids[first:k], dtype=np.int32), cut
        return None


def _boundary(starts: list[int], ends: list[int], cut: int) -> int | None:
    """The index of the first token at or after ``cut`` when no token spans it, else None."""
    k = bisect.bisect_left(starts, cut)
    if k == 0 or k == len(starts) or ends[k - 1] > cut:
        return None
    return k


def _near(ids: list[int], starts: list[int], cut: int) -> list[tuple[int, int]]:
    """(start, id) of the tokens starting within half a context of ``cut``."""
    a = bisect.bisect_left(starts, cut - _CONTEXT // 2)
    b = bisect.bisect_left(starts, cut + _CONTEXT // 2)
    return list(zip(starts[a:b], ids[a:b]))
