"""Extension data changes only the window (issue 23 item 2).

An extension phase with ``data: inherit`` reads its base's own documents - the same lengths,
the same retrieval-format share - packed into the long window. The claim the study rests on:
no training window of any phase shows a retrieval pair (a fact and the question that asks for
it again) farther apart than the base's window, so whatever the students retrieve beyond it
was never trained. Checked on the real packs of configs/demo.yaml and configs/study.yaml
(built small): every repeated 16-token run in a window (a needle's key + value, a
``pass key: NNNNN.``, a copied segment), every document span, and, parsed by format, the
passkey and needle pairs themselves.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.findings import root_of
from pipeline.resolve import train_specs
from stages.corpus import KEY_LEN, PASSKEY_DIGITS, PASSKEY_PREFIX, VALUE_LEN
from stages.pack import run_pack
from stages.tokenizer import BYTE_SPECIALS
from test_bad_inputs import Case, _cfg

REPO = Path(__file__).resolve().parents[1]
BOS = 256 + BYTE_SPECIALS.index("<s>")
# A question is a needle's key + value, or `pass key: NNNNN`, again: runs this long. (One token
# short of key + value: a document of exactly doc_len[1] characters loses its last token to
# the BOS in front of it, so the last question of a document can be cut by one token.)
RUN = KEY_LEN + VALUE_LEN - 1
PASSKEY = re.compile(re.escape(PASSKEY_PREFIX).encode() + rb"\d{%d}" % PASSKEY_DIGITS)
WINDOWS = 24  # per pack: enough windows for every format to appear, small enough to be quick


def base_window(specs: dict, label: str) -> int:
    """The window of the student a chain of init_from starts at."""
    return max(p.window_len for p in root_of(specs[label], specs).phases)


def repeat_distances(ids: list[int], n: int = RUN) -> list[int]:
    """For every run of ``n`` tokens (no BOS) seen before in the window: the distance from its
    previous occurrence's last token to its own last token. A needle's question (key + value
    again) and its fact, a pass key and its restatement and a copied segment all are such runs."""
    last: dict[tuple[int, ...], int] = {}
    out = []
    for i in range(len(ids) - n + 1):
        run = tuple(ids[i:i + n])
        if BOS in run:
            continue
        if run in last:
            out.append(i - last[run])
        last[run] = i
    return out


def format_pairs(ids: list[int], starts: list[int]) -> tuple[list[int], list[int]]:
    """(passkey distances, needle distances), parsed by format: each ``pass key: NNNNN`` seen
    earlier in the window; each document ending in letters that occur exactly once before in
    the window (a key + value; a copied segment repeats many times)."""
    text = bytes(i if i < 256 else 0 for i in ids)
    seen: dict[bytes, int] = {}
    passkeys = []
    for m in PASSKEY.finditer(text):
        if m.group() in seen:
            passkeys.append(m.end() - seen[m.group()])
        seen[m.group()] = m.end()
    needles = []
    for end in starts[1:] + [len(ids)]:
        tail = text[end - RUN:end]
        if end >= RUN and tail.isalpha() and text.count(tail) == 2:
            needles.append(end - (text.index(tail) + RUN))
    return passkeys, needles


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/study.yaml"])
def test_no_training_window_holds_a_pair_beyond_the_base_window(config: str, tmp_path: Path):
    cfg = load_config(REPO / config)
    specs = {s.label: s for s in train_specs(cfg)}
    packs: dict[str, tuple[object, int]] = {}  # pack fingerprint -> (spec, smallest base window)
    for label, spec in specs.items():
        for phase in spec.phases:
            key = phase.pack.fingerprint()
            bw = base_window(specs, label)
            packs[key] = (phase.pack, min(bw, packs.get(key, (None, bw))[1]))
    extended = [s for s in specs.values() if s.init_from is not None and
                max(p.window_len for p in s.phases) > base_window(specs, s.label)]
    assert extended, f"{config}: no student extends its base's window"
    found = {"repeats": 0, "passkey": 0, "needle": 0}
    for key, (spec, bw) in packs.items():
        small = replace(spec, pack=spec.pack.model_copy(update={"max_windows": WINDOWS}))
        assert spec.pack.doc_len[1] <= bw, (key, spec.pack.doc_len, bw)
        out = run_pack(small, tmp_path / key, verbose=False)
        table = pq.read_table(sorted(out.glob("windows-*.parquet")))
        assert table.num_rows == WINDOWS
        for ids, starts in zip(table.column("input_ids").to_pylist(), table.column("doc_starts").to_pylist()):
            spans = [b - a for a, b in zip(starts, starts[1:] + [len(ids)])]
            assert max(spans) <= bw, (key, spans)
            far = [d for d in repeat_distances(ids) if d >= bw]
            assert not far, (key, far)
            passkeys, needles = format_pairs(ids, starts)
            assert all(d < bw for d in passkeys + needles), (key, passkeys, needles)
            found["repeats"] += len(repeat_distances(ids))
            found["passkey"] += len(passkeys)
            found["needle"] += len(needles)
    # The checks saw what they look for: both formats, in the packs the extensions read.
    assert min(found.values()) > 0, found


def test_extensions_read_their_base_documents():
    """``data: inherit`` is the base's last phase's data and doc_len; only the window differs."""
    cfg = load_config(REPO / "configs/study.yaml")
    specs = {s.label: s for s in train_specs(cfg)}
    for s in specs.values():
        if s.init_from is None:
            continue
        parent = specs[s.init_from].phases[-1]
        for phase in s.phases:
            assert phase.data == parent.data
            assert phase.pack.pack.doc_len == parent.pack.pack.doc_len
            assert phase.pack.pack.model_copy(update={"window_len": 0, "max_windows": None}) == \
                parent.pack.pack.model_copy(update={"window_len": 0, "max_windows": None})


def test_a_long_document_base_is_caught(tmp_path: Path):
    """The pair check can fail: documents as long as the extension's window put pairs beyond
    a 256 base window."""
    from pipeline.config import DataConfig, PackConfig, SyntheticConfig
    from stages.specs import PackSpec

    spec = PackSpec(data=DataConfig(synthetic=SyntheticConfig(num_docs=200, retrieval_fraction=1.0)),
                    pack=PackConfig(window_len=1024, doc_len=(1024, 1024), max_windows=8), seed=0)
    table = pq.read_table(sorted(run_pack(spec, tmp_path / "p", verbose=False).glob("windows-*.parquet")))
    far = [d for ids, starts in zip(table.column("input_ids").to_pylist(), table.column("doc_starts").to_pylist())
           for d in sum(format_pairs(ids, starts), []) if d >= 256]
    assert far


def _inherit_case(id: str, students: list, names: list[str]) -> Case:
    return Case(id, lambda root: ["config", "show", str(_cfg(root, student={"config": {"hidden_size": 16}},
                                                              students=students))], names)


_BASE = {"name": "base", "phases": [{"window_len": 128, "steps": 2, "doc_len": [64, 64]}]}
CASES = [
    _inherit_case("inherit-without-init-from",
                  [{"name": "x", "phases": [{"window_len": 128, "steps": 2, "data": "inherit"}]}],
                  ["students[0].phases[0].data", "init_from"]),
    _inherit_case("inherit-with-doc-len",
                  [_BASE, {"name": "x", "init_from": "base",
                           "phases": [{"window_len": 128, "steps": 2, "data": "inherit", "doc_len": [16, 32]}]}],
                  ["doc_len", "inherit"]),
    _inherit_case("inherit-documents-longer-than-window",
                  [{"name": "base", "phases": [{"window_len": 256, "steps": 2, "doc_len": [200, 200]}]},
                   {"name": "x", "init_from": "base", "phases": [{"window_len": 128, "steps": 2, "data": "inherit"}]}],
                  ["students.x.phases[0].data", "window_len 128"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_inherit(case: Case, tmp_path: Path):
    argv = case.build(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr
    for name in case.names:
        assert name in errors[0], (name, errors[0])
    assert {p for p in tmp_path.rglob("*")} == before
