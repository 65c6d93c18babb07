"""Bad data files: one `error:` line naming the file (and where in it), exit 2, nothing left.

The table of tests/test_bad_inputs.py for what the corpus readers meet: JSON arrays, JSON lines
under .json, lone surrogates, damaged gzip streams, invalid UTF-8 in Parquet and in lines too
long to be read whole, directories without data.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pytest

from test_bad_inputs import Case, _data_case, _file, _parquet
from test_bad_inputs import test_bad_input as _check

_LONG = "word " * 400_000  # 2 MB: longer than a read block, so the streaming readers meet it
_GZ = gzip.compress("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(3000)).encode())


def _invalid_utf8_strings() -> pa.Array:
    raw = pa.array([b"fine", b"bad \xff\xfe", b"fine"], type=pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())


def _tree_of(files: dict[str, str]) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        for name, text in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
        return d
    return write


CASES = [
    _data_case("json-array-malformed", ["docs.json", "line 1 column 26", "not valid JSON"],
               _file("docs.json", '[{"text": "a"}, {"text": }]')),
    _data_case("json-array-missing-comma", ["docs.json", "line 3 column 3"],
               _file("docs.json", '[\n  {"text": "a"}\n  {"text": "b"}\n]')),
    _data_case("json-array-element-not-object", ["data.text_field", "docs.json", "element 1"],
               _file("docs.json", '[{"text": "a"}, 3]')),
    _data_case("json-lines-malformed", ["docs.json", "line 2"], _file("docs.json", '{"text": "a"}\n{"text": \n')),
    _data_case("json-not-utf8", ["docs.json", "UTF-8"], _file("docs.json", b'[{"text": "\xff"}]')),
    _data_case("jsonl-lone-surrogate", ["docs.jsonl", "line 2", "surrogate"],
               _file("docs.jsonl", '{"text": "ok"}\n{"text": "a\\ud800b"}\n')),
    _data_case("json-lone-surrogate", ["docs.json", "element 0", "surrogate"],
               _file("docs.json", '[{"text": "\\udc00"}]')),
    _data_case("jsonl-long-lone-surrogate", ["docs.jsonl", "line 1", "surrogate"],
               _file("docs.jsonl", json.dumps({"text": _LONG})[:-2] + '\\ud800"}\n')),
    _data_case("jsonl-long-unterminated", ["docs.jsonl", "line 1", "not valid JSON"],
               _file("docs.jsonl", json.dumps({"text": _LONG})[:-2] + "\n")),
    _data_case("jsonl-text-twice", ["data.text_field", "docs.jsonl", "twice"],
               _file("docs.jsonl", '{"text": "a", "text": "b"}\n')),
    _data_case("txt-long-not-utf8", ["docs.txt", "line 2", "UTF-8"],
               _file("docs.txt", b"ok\n" + _LONG.encode() + b"\xff" + _LONG.encode() + b"\n")),
    _data_case("jsonl-gz-truncated", ["docs.jsonl.gz", "gzip"], _file("docs.jsonl.gz", _GZ[:len(_GZ) // 2])),
    _data_case("jsonl-gz-flipped", ["docs.jsonl.gz", "gzip"],
               _file("docs.jsonl.gz", _GZ[:100] + bytes(b ^ 0x5A for b in _GZ[100:140]) + _GZ[140:])),
    _data_case("jsonl-gz-not-gzip", ["docs.jsonl.gz", "gzip"], _file("docs.jsonl.gz", b'{"text": "plain"}\n')),
    _data_case("parquet-not-utf8", ["docs.parquet", "row 1", "UTF-8"], _parquet(_invalid_utf8_strings())),
    _data_case("dir-without-data", ["data.source", "no .jsonl/.parquet/.txt files", ".json"],
               _tree_of({"README.md": "x", "a/b.csv": "y"})),
    _data_case("file-unknown-suffix", ["docs.csv", "unsupported suffix"], _file("docs.csv", "text\nabc\n")),
    _data_case("dir-nested-json-number", ["data.text_field", "x.json"],
               _tree_of({"a.txt": "fine\n", "sub/x.json": '[{"text": 1}]'})),
    _data_case("only-null-texts", ["data.source", "yielded no documents"],
               _file("docs.jsonl", '{"text": null}\n{"text": ""}\n')),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data(case: Case, tmp_path: Path):
    _check(case, tmp_path)


def test_the_table_is_large_enough():
    assert len(CASES) >= 19 and len({c.id for c in CASES}) == len(CASES)
