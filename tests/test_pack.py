"""Pack stage: token conservation, exact windows, positions, determinism, bad input."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.progress import Progress
from helpers import build_pack, pack_spec_of
from stages.pack import PackStats, _chunks, _windows, read_meta, window_files
from stages.windows import PackedWindows, position_ids
from stages.tokenizer import build_byte_tokenizer


def _cfg(tmp_path, **over):
    raw = {"run": {"out_dir": str(tmp_path / "run"), "seed": 3},
           "data": {"source": "synthetic", "synthetic": {"num_docs": 300}},
           "pack": {"window_len": 256, "doc_len": [16, 64], "shuffle_buffer": 50}}
    for key, val in over.items():
        raw.setdefault(key, {}).update(val)
    return parse_config(raw)


def _jsonl(tmp_path, texts, name="docs.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return p


def test_windows_cut_the_chunk_stream_exactly():
    chunks = [np.arange(i * 100, i * 100 + n, dtype=np.int32) for i, n in enumerate([5, 12, 3, 9, 7, 4, 3])]
    stats = PackStats()
    wins = list(_windows(iter(chunks), 8, stats))
    stream = np.concatenate(chunks)
    assert [w.tolist() for w, _ in wins] == [stream[i:i + 8].tolist() for i in range(0, 40, 8)]
    assert [s for _, s in wins] == [[0, 5], [0], [0, 1, 4], [0, 5], [0, 4]]
    assert stats.tokens_discarded_tail == len(stream) - 40 == 3


def test_chunking_keeps_order_and_drops_short(tmp_path):
    texts = ["a" * 10, "b" * 150, "c" * 2]  # +BOS: 11, 151 -> 64+64+23, 3 (dropped)
    cfg = _cfg(tmp_path, data={"source": str(_jsonl(tmp_path, texts))}, pack={"doc_len": [4, 64]})
    stats = PackStats()
    got = [c.tolist() for c in _chunks(pack_spec_of(cfg), stats, Progress("t", None, enabled=False))]
    bos = build_byte_tokenizer().bos_token_id
    b = [bos] + [ord("b")] * 150
    assert got == [[bos] + [ord("a")] * 10, b[:64], b[64:128], b[128:]]
    assert (stats.docs_read, stats.docs_kept, stats.docs_dropped, stats.chunks_dropped) == (3, 2, 1, 1)
    assert stats.tokens_dropped_short == 3


def test_token_conservation_end_to_end(tmp_path):
    # Single-chunk documents with unique content: every kept chunk must appear exactly once,
    # intact and in order, and only the stream's tail may be missing.
    texts = [f"{i:04d}" + "xyz"[i % 3] * (10 + (i * 37) % 50) for i in range(300)]
    cfg = _cfg(tmp_path, data={"source": str(_jsonl(tmp_path, texts))})
    out = build_pack(cfg)
    rows = list(PackedWindows(out).rows())
    stats = read_meta(out)["stats"]
    assert len(rows) == stats["windows"] > 0
    assert [r["window_id"] for r in rows] == list(range(len(rows)))
    assert all(len(r["input_ids"]) == 256 for r in rows)
    bos = build_byte_tokenizer().bos_token_id
    stream = np.concatenate([r["input_ids"] for r in rows]).tolist()
    at = [i for i, t in enumerate(stream) if t == bos] + [len(stream)]
    assert at[0] == 0
    segments = [bytes(stream[a + 1:b]).decode() for a, b in zip(at, at[1:])]
    by_id = {t[:4]: t for t in texts}
    for seg in segments[:-1]:
        assert by_id[seg[:4]] == seg  # intact chunk
    assert by_id[segments[-1][:4]].startswith(segments[-1])  # last one may be cut by the tail
    ids = [s[:4] for s in segments]
    assert len(ids) == len(set(ids))  # exactly once
    kept = [len(t) + 1 for t in texts if len(t) + 1 >= 16]  # shorter than doc_len min: dropped
    assert len(stream) + stats["tokens_discarded_tail"] == sum(kept)
    assert stats["tokens_read"] - stats["tokens_dropped_short"] == sum(kept)
    assert stats["docs_dropped"] == len(texts) - len(kept) == 6


def test_position_ids_both_modes():
    starts = [0, 5, 9]
    assert position_ids(starts, 12, "cross_doc").tolist() == list(range(12))
    assert position_ids(starts, 12, "doc_masked").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]


def test_doc_starts_match_bos(tmp_path):
    cfg = _cfg(tmp_path)
    rows = list(PackedWindows(build_pack(cfg)).rows())
    bos = build_byte_tokenizer().bos_token_id
    for r in rows:
        ids = r["input_ids"]
        bos_at = [i for i, t in enumerate(ids) if t == bos]
        assert set(bos_at) <= set(r["doc_starts"])  # every document start is recorded
        assert r["doc_starts"][0] == 0 and r["doc_starts"] == sorted(set(r["doc_starts"]))
        assert set(r["doc_starts"]) - set(bos_at) <= {0}  # only a continuation at 0 lacks BOS


def test_deterministic_bytes_and_reuse(tmp_path):
    a = _cfg(tmp_path / "a")
    b = _cfg(tmp_path / "b")
    out_a = build_pack(a)
    out_b = build_pack(b)
    assert out_a.name == out_b.name  # same fingerprint
    digest = lambda d: [hashlib.sha256(f.read_bytes()).hexdigest() for f in window_files(d)]
    assert digest(out_a) == digest(out_b)
    mtime = (out_a / "pack.json").stat().st_mtime_ns
    assert build_pack(a) == out_a
    assert (out_a / "pack.json").stat().st_mtime_ns == mtime
    c = _cfg(tmp_path / "a", run={"seed": 4})
    assert build_pack(c) != out_a


def test_doc_masked_has_fingerprint_of_its_own(tmp_path):
    a, b = _cfg(tmp_path), _cfg(tmp_path, pack={"mode": "doc_masked"})
    assert pack_spec_of(a).fingerprint() != pack_spec_of(b).fingerprint()
    out = build_pack(b)
    assert pq.read_metadata(window_files(out)[0]).metadata[b"posdistill.mode"] == b"doc_masked"


def test_sources_jsonl_txt_parquet_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    texts = ["x" * 100 + str(i) for i in range(30)]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    pq.write_table(pa.table({"body": texts}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    results = []
    for source, field in [(str(_jsonl(tmp_path, texts)), "text"), (str(tmp_path / "t.txt"), "text"),
                          (str(tmp_path / "p.parquet"), "body"), (str(tmp_path / "ds"), "text")]:
        cfg = _cfg(tmp_path / field / source.replace("/", "_")[-20:],
                   data={"source": source, "text_field": field}, pack={"doc_len": [16, 128]})
        out = build_pack(cfg)
        results.append(read_meta(out)["stats"]["tokens_read"])
    assert results == [30 * 101 + 10 * 1 + 20 * 2] * 4  # BOS + 'x'*100 + the number's digits


def _fails(tmp_path, match, **over):
    cfg = _cfg(tmp_path, **over)
    with pytest.raises(UserError, match=match):
        build_pack(cfg)
    # nothing half-written where a later stage would look
    assert not (tmp_path / "run" / "pack").exists() or not any(
        p.name[0] != "." for p in (tmp_path / "run" / "pack").iterdir())


def test_bad_inputs(tmp_path):
    _fails(tmp_path, "no .jsonl/.parquet/.txt files", data={"source": str(tmp_path / "missing/*.jsonl")})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(tmp_path, "yielded no documents", data={"source": str(empty)})
    _fails(tmp_path, "'body' not found", data={"source": str(_jsonl(tmp_path, ["a" * 50])), "text_field": "body"})
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken\n")
    _fails(tmp_path, r"bad.txt line 2 is not valid UTF-8", data={"source": str(bad)})
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "readme.md").write_text("hi")
    _fails(tmp_path, "not a Hugging Face tokenizer directory", data={"tokenizer": str(notok)})
    _fails(tmp_path, "fewer than one window", data={"source": str(_jsonl(tmp_path, ["a" * 50]))})


def test_cli_pack_bad_input_exit_code(tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "run")},
                                       "data": {"source": str(tmp_path / "none.jsonl")},
                                       "pack": {"window_len": 128, "doc_len": [8, 64]}}))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "pack", str(cfgfile)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: data.source:") and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "pack").exists() or not list((tmp_path / "run" / "pack").iterdir())


def test_periodic_source_and_phase_doc_len(tmp_path):
    # A short pretraining phase of one window-long periodic document per window.
    cfg = _cfg(tmp_path, data={"source": "synthetic"},
               train={"phases": [{"window_len": 64, "steps": 1, "doc_len": [64, 64], "windows": 100,
                                  "data": {"source": "periodic", "periodic": {"num_docs": 40, "period": [3, 9],
                                                                              "alphabet_size": 16}}}]})
    spec = pack_spec_of(cfg, 0)
    assert spec.pack.doc_len == (64, 64) and spec.pack.window_len == 64 and spec.pack.max_windows == 100
    rows = list(PackedWindows(build_pack(cfg, 0)).rows())
    bos = build_byte_tokenizer().bos_token_id
    assert len(rows) == 40  # the corpus is smaller than the budget: all of it
    for r in rows:
        ids = list(r["input_ids"])
        assert list(r["doc_starts"]) == [0] and ids[0] == bos
        body = ids[1:]
        assert max(body) < 16
        period = min(p for p in range(1, 10) if body[p:] == body[:-p])  # a repetition of the first period
        assert body == (body[:period] * 64)[:63]
    other = _cfg(tmp_path, train={"phases": [{"window_len": 64, "steps": 1, "doc_len": [64, 64],
                                               "data": {"source": "periodic", "periodic": {"num_docs": 40, "period": [3, 10],
                                                                                           "alphabet_size": 16}}}]})
    assert pack_spec_of(other, 0).fingerprint() != spec.fingerprint()
    big = _cfg(tmp_path, train={"phases": [{"window_len": 64, "steps": 1, "doc_len": [64, 64],
                                             "data": {"source": "periodic", "periodic": {"alphabet_size": 4096}}}]})
    with pytest.raises(UserError, match="data.periodic.alphabet_size 4096"):
        build_pack(big, 0)
    with pytest.raises(Exception, match="doc_len max 128 exceeds window_len 64"):
        _cfg(tmp_path, train={"phases": [{"window_len": 64, "steps": 1, "doc_len": [8, 128]}]})


def test_retrieval_documents_are_the_eval_formats_and_off_by_default():
    """retrieval_fraction > 0 mixes in the eval's needle / pass-key formats (the fact restated
    at the end, never the eval's own filler); at its default the document stream and the
    source identity are what they were before the field existed."""
    import random
    import re

    from pipeline.config import DataConfig, SyntheticConfig
    from stages.corpus import PASSKEY_PREFIX, retrieval_document, source_identity, synthetic_documents
    from stages.evaluate.tasks import PASSKEY_FILLER

    plain = SyntheticConfig(num_docs=40)
    mixed = SyntheticConfig(num_docs=40, retrieval_fraction=1.0)
    assert "retrieval_fraction" not in plain.model_dump() and mixed.model_dump()["retrieval_fraction"] == 1.0
    assert source_identity(DataConfig(synthetic=plain)) == {
        "synthetic": {"num_docs": 40, "alphabet": plain.alphabet, "copy_fraction": 0.5,
                      "segment_len": [4, 64]}, "version": 1}
    assert source_identity(DataConfig(synthetic=mixed)) != source_identity(DataConfig(synthetic=plain))
    assert list(synthetic_documents(plain, (32, 128), 3)) == list(
        synthetic_documents(SyntheticConfig(num_docs=40, retrieval_fraction=0.0), (32, 128), 3))
    rng, kinds = random.Random(0), set()
    for _ in range(40):
        doc = retrieval_document(rng, mixed, 200)
        assert PASSKEY_FILLER[:20] not in doc
        m = re.search(r"(pass key: \d{5}\.)$", doc)
        if m:
            kinds.add("passkey")
            assert doc.count(m.group(1)) == 2
        else:
            kinds.add("needle")
            fact = doc[-16:]
            assert re.fullmatch(r"[a-z]{16}", fact) and doc.count(fact) >= 2
        assert 200 - 2 <= len(doc) <= 200 + 32
    assert kinds == {"passkey", "needle"}
    docs = list(synthetic_documents(mixed, (64, 64), 0))
    assert sum(d.count(PASSKEY_PREFIX) == 2 for d in docs) > 5
