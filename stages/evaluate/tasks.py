"""Retrieval probes in the run's token space: passkey and needle-in-a-haystack.

The agreed formats (docs/eval.md). A probe of context length L and depth d has a context
of exactly L ids that ends with the query; the answer follows it:

needle:  haystack = held-out documents (each BOS-first, concatenated, cut to fit);
         needle = key K + value V (8 random alphabet characters each) inserted at fraction d
         of the haystack; the context ends with K again; the answer is V.
passkey: haystack = a repeated filler sentence; needle = ``pass key: NNNNN.``; the context
         ends with ``pass key: ``; the answer is the 5 digits.

Position ids run 0..L-1 over the context (cross_doc semantics). A probe's **distance** is the
RoPE offset q - p between the fact and the question: p = ``fact_at``, the position of the
answer's first token inside the needle; q = L - 1, the question's last position, whose logits
predict that token (answer token j is predicted at L - 1 + j from p + j: the same offset).
It is about (1 - d) * L. When the tokenizer has a BOS, the context starts
with it. Pieces (key, value, prefix, digits) are tokenized separately and concatenated, so
the query's ids are exactly the needle's ids under any tokenizer, not only the byte one.
Every probe is a pure function of (seed, task, length, depth, trial).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import UserError
from stages.corpus import KEY_LEN, PASSKEY_DIGITS, PASSKEY_PREFIX, VALUE_LEN, iter_documents

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("passkey", "needle")
_TOKENIZE_BATCH = 256
_MAX_POOL_TOKENS = 4 << 20


@dataclass(frozen=True)
class Probe:
    task: str
    length: int
    depth: float
    trial: int
    context: list[int]  # exactly `length` ids, ending with the query
    answer: list[int]
    distance: int  # q - p: the question's last position (length - 1) minus ``fact_at``

    @property
    def fact_at(self) -> int:
        """p: the position of the answer's first token inside the needle."""
        return self.length - 1 - self.distance

    def input_ids(self) -> list[int]:
        """Teacher-forced input: the context, then every answer token but the last."""
        return self.context + self.answer[:-1]


def encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


class Haystack:
    """A bounded pool of tokenized held-out documents (BOS first), read once.

    A probe draws a random document to start at and reads on, wrapping around the pool, so
    each probe sees a different haystack while the corpus is read only once.
    """

    def __init__(self, data: DataConfig, tok: Any, doc_len: tuple[int, int], seed: int, min_tokens: int):
        bos = tok.bos_token_id
        docs = iter_documents(data, doc_len, seed)
        parts: list[np.ndarray] = []
        total = 0
        target = min(max(min_tokens, 1), _MAX_POOL_TOKENS)
        while total < target:
            batch = [d for _, d in zip(range(_TOKENIZE_BATCH), docs)]
            if not batch:
                break
            for ids in tok(batch, add_special_tokens=False)["input_ids"]:
                arr = np.asarray(([bos] if bos is not None else []) + list(ids), dtype=np.int64)
                if len(arr):
                    parts.append(arr)
                    total += len(arr)
        if not parts:
            raise UserError(f"eval.data.source: '{data.source}' yielded no documents for the needle haystack")
        self.starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        self.tokens = np.concatenate(parts)

    def take(self, rng: random.Random, n: int) -> list[int]:
        start = int(self.starts[rng.randrange(len(self.starts))])
        idx = (start + np.arange(n)) % len(self.tokens)  # wraps when the pool is short
        return self.tokens[idx].tolist()


def _rng(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and machines.
    return random.Random(f"{seed}-{task}-{length}-{depth:g}-{trial}")


def _assemble(tok: Any, hay: list[int], needle: list[int], query: list[int], answer: list[int],
              answer_offset: int, length: int, depth: float, task: str) -> tuple[list[int], int]:
    """``[BOS] + hay[:at] + needle + hay[at:] + query`` of exactly ``length`` ids; also the
    distance q - p from the answer's first token in the needle (p) to the last context
    position (q = length - 1), whose logits predict that token."""
    bos = tok.bos_token_id
    prefix = [bos] if bos is not None else []
    if hay and bos is not None and hay[0] == bos:
        hay = hay[1:]  # the prefix already is this document's BOS
    room = length - len(prefix) - len(needle) - len(query)
    if room < 0:
        raise UserError(f"eval.lengths: {length} is too short for the {task} probe "
                        f"(needs at least {length - room} tokens)")
    hay = hay[:room]
    at = int(round(depth * room))
    ctx = prefix + hay[:at] + needle + hay[at:] + query
    assert len(ctx) == length
    answer_at = len(prefix) + at + answer_offset
    return ctx, (length - 1) - answer_at


def needle_probe(tok: Any, haystack: Haystack, alphabet: str, length: int, depth: float, trial: int,
                 seed: int) -> Probe:
    rng = _rng(seed, "needle", length, depth, trial)
    key = encode(tok, "".join(rng.choice(alphabet) for _ in range(KEY_LEN)))
    value = encode(tok, "".join(rng.choice(alphabet) for _ in range(VALUE_LEN)))
    hay = haystack.take(rng, length + 1)
    ctx, dist = _assemble(tok, hay, key + value, key, value, len(key), length, depth, "needle")
    return Probe("needle", length, depth, trial, ctx, value, dist)


def passkey_probe(tok: Any, length: int, depth: float, trial: int, seed: int) -> Probe:
    rng = _rng(seed, "passkey", length, depth, trial)
    filler = encode(tok, PASSKEY_FILLER)
    prefix = encode(tok, PASSKEY_PREFIX)
    digits = encode(tok, f"{rng.randrange(10 ** PASSKEY_DIGITS):0{PASSKEY_DIGITS}d}")
    needle = prefix + digits + encode(tok, ".")
    hay = filler * (length // max(len(filler), 1) + 2)
    ctx, dist = _assemble(tok, hay, needle, prefix, digits, len(prefix), length, depth, "passkey")
    return Probe("passkey", length, depth, trial, ctx, digits, dist)


def build_probes(task: str, tok: Any, lengths: list[int], depths: list[float], trials: int, seed: int,
                 haystack: Haystack | None = None, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> list[Probe]:
    """All probes of one task, in (length, depth, trial) order."""
    if task not in TASKS:
        raise UserError(f"eval.tasks: unknown task '{task}' (choose from {', '.join(TASKS)})")
    if task == "needle" and haystack is None:
        raise ValueError("the needle task needs a haystack")
    out = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                if task == "passkey":
                    out.append(passkey_probe(tok, length, depth, trial, seed))
                else:
                    out.append(needle_probe(tok, haystack, alphabet, length, depth, trial, seed))
    return out
