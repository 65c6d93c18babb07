"""Data sources: every known format under a directory (recursively, any case), the rest named in
one warning; .json arrays and JSON lines; .jsonl.gz; null/empty texts counted in the pack's stats."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages.corpus as corpus
from helpers import build_pack
from pipeline.config import parse_config
from pipeline.errors import UserError
from stages.pack import read_meta


def _data(source) -> object:
    return parse_config({"data": {"source": str(source)}}).data


def _texts(source) -> list[str]:
    return list(corpus.iter_documents(_data(source), (1, 10), 0))


def _lines(*texts) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def test_a_directory_reads_every_known_format_recursively_and_names_the_rest(tmp_path, capsys):
    d = tmp_path / "corpus"
    (d / "b" / "deeper").mkdir(parents=True)
    (d / "a.JSONL").write_text(_lines("upper jsonl"))
    (d / "b" / "c.Txt").write_text("txt line\n\n  \n")
    (d / "b" / "deeper" / "d.jsonl.gz").write_bytes(gzip.compress(_lines("gz one", "gz two").encode()))
    (d / "b" / "e.json").write_text(json.dumps([{"text": "array one"}, {"text": "array two"}], indent=2))
    (d / "f.json").write_text(_lines("json lines"))
    pq.write_table(pa.table({"text": ["parquet"]}), d / "g.PARQUET")
    for junk in ("README.md", ".DS_Store", "b/notes.csv"):
        (d / junk).write_text("not data")
    assert [p.relative_to(d).as_posix() for p in corpus.resolve_files(str(d))] == [
        "a.JSONL", "b/c.Txt", "b/deeper/d.jsonl.gz", "b/e.json", "f.json", "g.PARQUET"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: data.source: skipped 3 file(s)"), err
    assert all(name in err[0] for name in (".DS_Store", "README.md", "b/notes.csv"))
    assert _texts(d) == ["upper jsonl", "txt line", "gz one", "gz two", "array one", "array two", "json lines",
                         "parquet"]
    corpus.resolve_files(str(d))
    assert capsys.readouterr().err == ""  # one warning per source and process


def test_saved_datasets_stay_datasets_at_the_top_or_nested(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["saved one", "", None, "saved two"]}).save_to_disk(str(tmp_path / "ds"))
    assert corpus.resolve_files(str(tmp_path / "ds")) == [tmp_path / "ds"]
    assert _texts(tmp_path / "ds") == ["saved one", "saved two"]
    outer = tmp_path / "outer"
    outer.mkdir()
    (tmp_path / "ds").rename(outer / "ds")
    (outer / "z.txt").write_text("after\n")
    # The dataset's own dataset_info.json / state.json are not read as .json data.
    assert corpus.resolve_files(str(outer)) == [outer / "ds", outer / "z.txt"]
    assert _texts(outer) == ["saved one", "saved two", "after"]


@pytest.mark.parametrize("content, where", [
    ('[{"text": "a"}, {"text": }]', "line 1 column 26"),
    ('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]', "line 4 column 3"),
    ('[{"text": "a"}] x', "line 1 column 17"),
    ('[{"text": "a"}, {"text": "b}]', "element 1"),
])
def test_malformed_json_arrays_name_the_file_and_position(tmp_path, content, where):
    (tmp_path / "docs.json").write_text(content)
    with pytest.raises(UserError, match="docs.json") as err:
        _texts(tmp_path / "docs.json")
    assert where in str(err.value) and "not valid JSON" in str(err.value), str(err.value)


def test_json_arrays_and_lines_read_like_json_loads(tmp_path):
    records = [{"text": "é\n\"q\" \U0001F600", "n": [1, {"x": None}]}, {"meta": "m", "text": "two"},
               {"text": None}, {"text": ""}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("a.json", "l.json"):
        assert _texts(tmp_path / name) == [records[0]["text"], "two"]


def test_null_and_empty_texts_are_counted_in_the_packs_stats(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_text(_lines("x" * 300, None, "", None) + json.dumps({"id": 1, "text": None}) + "\n")
    (d / "b.json").write_text(json.dumps([{"text": ""}, {"text": "y" * 300}]))
    pq.write_table(pa.table({"text": ["z" * 300, None, ""]}), d / "c.parquet")
    cfg = parse_config({"run": {"out_dir": str(tmp_path / "run")}, "data": {"source": str(d)},
                        "pack": {"window_len": 128, "doc_len": [16, 64]}})
    stats = read_meta(build_pack(cfg))["stats"]
    assert (stats["rows_null_text"], stats["rows_empty_text"]) == (4, 3)
    assert stats["docs_read"] == 3


def test_jsonl_gz_streams_and_a_damaged_one_is_named(tmp_path):
    texts = [f"document {i} " * 50 for i in range(2000)]
    good = gzip.compress(_lines(*texts).encode())
    (tmp_path / "docs.jsonl.gz").write_bytes(good)
    assert _texts(tmp_path / "docs.jsonl.gz") == texts
    for damaged in (good[:len(good) // 2], good[:200] + bytes(b ^ 0x55 for b in good[200:260]) + good[260:],
                    good[:-4] + b"\0\0\0\0", b"not gzip at all\n"):
        (tmp_path / "docs.jsonl.gz").write_bytes(damaged)
        with pytest.raises(UserError, match=r"docs\.jsonl\.gz"):
            _texts(tmp_path / "docs.jsonl.gz")


@pytest.mark.parametrize("name, content, match", [
    ("docs.jsonl", b'{"text": "ok"}\n{"text": "a\\ud800b"}\n', r"docs\.jsonl line 2 .*lone surrogate"),
    ("docs.json", b'[{"text": "ok"}, {"text": "\\udfff"}]', r"docs\.json element 1 .*lone surrogate"),
    ("docs.jsonl", b'{"text": "\\ud83d\\ude00 pair"}\n{"text": "x", "text": "y"}\n', r"twice in .*docs\.jsonl line 2$"),
    ("docs.json", b'[{"text": "ok"}]\n\xff', r"docs\.json line 2 is not valid UTF-8"),
])
def test_text_that_is_not_unicode_is_refused_with_its_place(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match):
        _texts(tmp_path / name)


def test_long_records_are_refused_like_short_ones(tmp_path, monkeypatch):
    """The streaming parser (records longer than a read block) gives the same refusals."""
    monkeypatch.setattr(corpus, "_LINE_BLOCK", 64)
    monkeypatch.setattr("stages.jsonstream._READ_AHEAD", 5)
    pad = "p" * 200
    cases = [
        (f'{{"pad": "{pad}", "text": "a\\ud800"}}\n', r"line 1 holds a lone surrogate \\ud800"),
        (f'{{"pad": "{pad}", "text": "a", "text": "b"}}\n', r"twice in .*line 1$"),
        (f'{{"pad": "{pad}"}}\n', r"'text' not found in .*line 1 \(keys: pad\)"),
        (f'{{"pad": "{pad}", "text": 5}}\n', r"line 1 is not a string"),
        (f'{{"pad": "{pad}", "text": "a"}} x\n', r"line 1 is not valid JSON \(Extra data\)"),
        (f'{{"pad": "{pad}", "text": "a" "b"}}\n', r"line 1 is not valid JSON \(Expecting ',' delimiter\)"),
        (f'{{"pad": [1, 2,], "text": "{pad}"}}\n', r"line 1 is not valid JSON \(Expecting value\)"),
        (f'[{{"text": "{pad}"}}]\n', r"'text' not found .*line 1 \(it holds an array"),
    ]
    for content, match in cases:
        (tmp_path / "docs.jsonl").write_text(content)
        with pytest.raises(UserError, match=match):
            _texts(tmp_path / "docs.jsonl")


def test_text_columns_that_are_not_utf8_are_named(tmp_path):
    import datasets

    raw = pa.array([b"ok", b"fine", b"bad \xff\xfe"], type=pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # Arrow does not check it here
    pq.write_table(pa.table({"text": column}), tmp_path / "docs.parquet")
    with pytest.raises(UserError, match=r"docs\.parquet row 2 of column 'text' is not valid UTF-8"):
        _texts(tmp_path / "docs.parquet")
    datasets.Dataset(pa.table({"text": column})).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"column 'text' of the saved dataset .*ds is not valid UTF-8"):
        _texts(tmp_path / "ds")


def test_a_text_field_twice_is_refused_only_at_the_top_level(tmp_path):
    nested = {"meta": {"text": 1}, "text": "kept"}
    raw = '{"meta": {"text": 1, "text": 2}, "text": "kept"}'
    (tmp_path / "a.jsonl").write_text(raw + "\n")
    (tmp_path / "a.json").write_text(f"[{raw}, {json.dumps(nested)}]")
    assert _texts(tmp_path / "a.jsonl") == ["kept"]
    assert _texts(tmp_path / "a.json") == ["kept", "kept"]
    (tmp_path / "b.json").write_text('[{"text": "a"}, {"text": "b", "x": 1, "text": "c"}]')
    with pytest.raises(UserError, match=r"twice in .*b\.json element 1"):
        _texts(tmp_path / "b.json")
