"""A long document is packed in pieces: memory does not grow with its length, and the ids are
those of encoding it whole (byte tokenizer, its Hugging Face copy, GPT-2- and SentencePiece-style
BPE tokenizers)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import stages.corpus as corpus
import stages.jsonstream as jsonstream
import stages.tokenizer as T
from pipeline.config import parse_config
from pipeline.progress import Progress
from helpers import pack_spec_of
from stages.pack import PackStats, _chunks

REPO = Path(__file__).resolve().parents[1]


def _words_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 9))) for _ in range(500)]
    seps = [" ", " ", " ", "  ", "\n", ", ", ". ", "\n\n", "é ", "中文 ", "\t"]
    out: list[str] = []
    size = 0
    while size < n:
        out.append(rng.choice(words) + rng.choice(seps))
        size += len(out[-1])
    return "".join(out)[:n]


def _pieces(text: str, rng: random.Random, most: int) -> list[str]:
    out, i = [], 0
    while i < len(text):
        j = i + rng.randint(1, most)
        out.append(text[i:j])
        i = j
    return out


def _bpe(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":  # byte-level BPE on GPT-2's regex split
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        core.train_from_iterator([_words_text(100_000, 1)], trainer)
        return PreTrainedTokenizerFast(tokenizer_object=core)
    # SentencePiece-style: NFKC, a "▁" prepended to every text it is given
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    core.decoder = decoders.Metaspace()
    core.train_from_iterator([_words_text(100_000, 1)], trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_byte_ids_are_the_byte_tokenizers():
    tok = T.build_byte_tokenizer()
    rng = random.Random(0)
    alphabet = "ab <s></s><pad><sep>/é中\n>"
    texts = ["", "<s>", "<s><s>", "<<s>>", "</s<s>", "<sep", "a<pad>b"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    for text in texts:
        assert T.byte_ids(text).tolist() == tok(text, add_special_tokens=False)["input_ids"], text
    encoder = T.TextEncoder.load("byte")  # without transformers
    assert (encoder.bos_token_id, encoder.vocab_size) == (tok.bos_token_id, len(tok))


@pytest.mark.parametrize("kind", ["byte", "byte-dir", "gpt2", "metaspace"])
def test_streamed_ids_equal_whole_document_ids(kind, tmp_path, monkeypatch):
    if kind in ("byte", "byte-dir"):
        T.build_byte_tokenizer().save_pretrained(tmp_path / "tok")
        tok = T.load_tokenizer("byte" if kind == "byte" else str(tmp_path / "tok"))
    else:
        tok = _bpe(kind)
    monkeypatch.setattr(T, "PIECE_CHARS", 4096)  # many seams in a text of a test's size
    rng = random.Random(1)
    text = _words_text(60_000, 2)
    text = text[:30_000] + "x<s>y" * 2000 + text[30_000:]  # specials spelled near seams
    whole = tok(text, add_special_tokens=False)["input_ids"]
    encoder = T.TextEncoder.load("byte") if kind == "byte" else T.TextEncoder(tok, byte=False)
    for pieces in (_pieces(text, rng, 3000), [text], _pieces(text, rng, 20)):
        parts = list(encoder.stream(iter(pieces)))
        assert len(parts) > 5  # it did cut
        assert np.concatenate(parts).tolist() == whole
    assert [a.tolist() for a in encoder.batch([text[:100], ""])] == [
        tok(text[:100], add_special_tokens=False)["input_ids"], []]


def test_a_seam_is_never_where_encoding_differs(monkeypatch):
    """A tokenizer whose split at a character depends on the text 600 characters before it:
    encoded from a seam with only 512 characters of context it would differ there, so the check
    must refuse such seams (the piece grows) and the ids stay exact."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "".join(random.Random(0).choice("abc  ") for _ in range(30_000))
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?<=a.{600})b"), "isolated")
    core.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    monkeypatch.setattr(T, "PIECE_CHARS", 2048)
    got = np.concatenate(list(T.TextEncoder(tok, byte=False).stream(iter([text])))).tolist()
    assert got == tok(text, add_special_tokens=False)["input_ids"]


def _records() -> list[dict]:
    text = _words_text(5000, 4)
    return [
        {"id": 1, "text": text, "meta": {"a": [1, 2.5e3, None, True, {"b": "c\\\"d"}], "e": []}},
        {"text": text + "\n\t\"quoted\" \\ back/slash \u00e9 \U0001F600 \u2028 end"},
        {"text": "\\" * 301 + "\U0001F600" * 50 + "\\\"" * 40 + "\x01\x1f" * 30},
        {"before": "x" * 3000, "n": -0.5, "text": "中" * 2000, "after": [[[]]]},
        {"text": None, "id": 2},
        {"text": "", "id": 3},
        {"text": "short"},
    ]


@pytest.mark.parametrize("read_ahead", [1, 7, 64])
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_long_jsonl_records_stream_as_json_loads_reads_them(tmp_path, monkeypatch, ensure_ascii, read_ahead):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in _records()) + "\n")
    cfg = parse_config({"data": {"source": str(src)}}).data
    drops_whole: dict = {}
    whole = ["".join(d) for d in corpus.iter_texts(cfg, (1, 10), 0, drops_whole)]
    # Blocks of 256 bytes: every record but the short one takes the streaming parser.
    monkeypatch.setattr(corpus, "_LINE_BLOCK", 256)
    monkeypatch.setattr(jsonstream, "PIECE_CHARS", 100)
    monkeypatch.setattr(jsonstream, "_READ_AHEAD", read_ahead)  # cuts between (and inside) escapes
    drops: dict = {}
    docs = [list(d) for d in corpus.iter_texts(cfg, (1, 10), 0, drops)]
    assert ["".join(d) for d in docs] == whole == [r["text"] for r in _records() if r["text"]]
    assert max(len(d) for d in docs) > 10  # the long texts came in pieces
    assert drops == drops_whole == {"null_text": 1, "empty_text": 1}


def test_long_txt_lines_stream(tmp_path, monkeypatch):
    lines = ["  " + "é" * 700 + "  tail \r", " \t " * 400, "plain", "x" * 1000 + "\r\r", "\r", "中" * 999]
    src = tmp_path / "docs.txt"
    src.write_bytes("\n".join(lines).encode())  # the last line has no newline
    cfg = parse_config({"data": {"source": str(src)}}).data
    whole = list(corpus.iter_documents(cfg, (1, 10), 0))
    monkeypatch.setattr(corpus, "_LINE_BLOCK", 64)  # multi-byte characters split between blocks
    assert list(corpus.iter_documents(cfg, (1, 10), 0)) == whole == [
        lines[0].rstrip("\r"), "plain", "x" * 1000, "中" * 999]


def test_a_long_document_packs_as_if_encoded_whole(tmp_path, monkeypatch):
    text = _words_text(300_000, 5)
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": text}) + "\n")
    cfg = parse_config({"run": {"out_dir": str(tmp_path / "run")}, "data": {"source": str(src)},
                        "pack": {"window_len": 512, "doc_len": [4, 100], "shuffle_buffer": 8}})
    monkeypatch.setattr(T, "PIECE_CHARS", 10_000)
    monkeypatch.setattr("stages.pack.PIECE_CHARS", 10_000)
    monkeypatch.setattr(corpus, "_LINE_BLOCK", 4096)
    stats = PackStats()
    got = [c.tolist() for c in _chunks(pack_spec_of(cfg), stats, Progress("t", None, enabled=False))]
    tok = T.build_byte_tokenizer()
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    short = [tok.bos_token_id] + tok("short one", add_special_tokens=False)["input_ids"]
    assert got == [short] + [ids[i:i + 100] for i in range(0, len(ids), 100)]
    assert stats.tokens_read == len(ids) + len(short) and stats.docs_read == 2


def _peak_mib(tmp_path: Path, source: Path) -> tuple[float, dict]:
    """Peak RSS of one `posdistill pack` (measured by a parent of its own) and its stats."""
    out = tmp_path / f"out-{source.name}"
    cfg = {"run": {"name": "mem", "out_dir": str(out)}, "data": {"source": str(source)},
           "pack": {"window_len": 8192, "doc_len": [16, 8192], "shuffle_buffer": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    probe = ("import resource, subprocess, sys; "
             "p = subprocess.run([sys.executable, '-m', 'pipeline.cli', 'pack', sys.argv[1]]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "c.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(next((out / "pack").iterdir()).joinpath("pack.json").read_text())
    return int(proc.stdout.split()[-1]) / 1024, meta["stats"]


def test_pack_memory_does_not_grow_with_a_documents_length(tmp_path):
    """One 50 MB document (a .txt line, a .jsonl record) peaks no higher than a 1 MB one; a
    whole-document encoding needs several bytes per character (>1 GB at 5 MB)."""
    para = _words_text(200_000, 6).replace("\n", " ")
    big = (para * 250)[:50_000_000]
    (tmp_path / "small.txt").write_text(big[:1_000_000] + "\n")
    (tmp_path / "big.txt").write_text(big + "\n")
    with open(tmp_path / "big.jsonl", "w") as f:
        json.dump({"id": 7, "text": big, "tags": ["a", "b"]}, f, ensure_ascii=False)
        f.write("\n")
    del big, para
    small, _ = _peak_mib(tmp_path, tmp_path / "small.txt")
    for name in ("big.txt", "big.jsonl"):
        peak, stats = _peak_mib(tmp_path, tmp_path / name)
        n = (tmp_path / "big.txt").stat().st_size - 1
        assert stats["tokens_read"] == n + 1 and stats["windows"] == (n + 1) // 8192, stats
        assert peak - small < 100, (name, peak, small)


def test_streamed_strings_decode_as_json_loads_does(monkeypatch):
    """Random strings (backslash runs, quotes, control characters, surrogate pairs) in random
    blocks with random read-ahead: the parts join to what json.loads reads."""
    rng = random.Random(7)
    alphabet = ["\\", "\\\\", "\\u0041", "\\ud83d", '"', "a", "é", "\U0001F600", "\x01", "\n", "u", "d8", " ", "中"]
    for trial in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        raw = json.dumps(text, ensure_ascii=rng.random() < 0.5) + ', "next": 1}'
        monkeypatch.setattr(jsonstream, "_READ_AHEAD", rng.randint(1, 20))
        c = jsonstream.Chars(iter(_pieces(raw[1:], rng, 9)))
        parts = list(jsonstream.string_parts(c, lambda c: "here", strict_unicode=True))
        assert "".join(parts) == text, (trial, raw)
        assert c.buf[c.i:] + "".join(c._blocks) == ', "next": 1}'  # it stopped right after the string
