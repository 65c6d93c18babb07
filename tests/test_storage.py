"""Object storage against a real S3-compatible server on loopback (tests/s3server.py): the
mirror's push/pull rules, inputs named by URI, and the CLI on ``s3://`` caches."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from s3server import bucket, put_tree, s3_server  # noqa: F401  (fixtures)

from pipeline.errors import UserError
from pipeline.storage import LAST_FILES, Remote, local_copy, mirror_path, remote_for


def _objects(uri: str) -> dict[str, bytes]:
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: fs.open_input_file(i.path).read() for i in infos if i.type == pafs.FileType.File}


def test_push_pull_round_trip(bucket, tmp_path, monkeypatch):
    r = Remote(f"{bucket}/node")
    assert remote_for(r.local).uri == r.uri and mirror_path(r.uri) == r.local
    (r.local / "sub").mkdir(parents=True)
    (r.local / "a.bin").write_bytes(b"a" * 1000)
    (r.local / "sub" / "b.txt").write_text("bee")
    (r.local / "_done.json").write_text("{}")
    (r.local / ".lock").write_text("")  # hidden: never leaves the machine
    (r.local / "sub" / ".shard-1.tmp-9").write_text("partial")
    assert r.push(final=False) == 2  # a sync while computing: no completion file
    assert set(_objects(r.uri)) == {"a.bin", "sub/b.txt"}
    assert r.push(final=True) == 1 and set(_objects(r.uri)) == {"a.bin", "sub/b.txt", "_done.json"}
    assert r.push(final=True) == 0  # nothing changed: nothing sent (the completion file stays)

    (r.local / "sub" / "b.txt").write_text("BEE")  # same size, new content
    assert r.push(final=True) == 2  # the edit, and the completion file again (last)
    assert _objects(r.uri)["sub/b.txt"] == b"BEE"

    monkeypatch.setenv("POSDISTILL_SCRATCH", str(tmp_path / "other-machine"))
    r2 = Remote(r.uri)
    assert r2.local != r.local
    r2.pull()
    assert (r2.local / "sub" / "b.txt").read_text() == "BEE" and not (r2.local / ".lock").exists()
    stray = r2.local / "stray.bin"
    stray.write_bytes(b"x")
    (r2.local / "a.bin").write_bytes(b"b" * 1000)  # a damaged local copy
    r2.pull()
    assert not stray.exists(), "the bucket is the truth: a local file with no object goes"
    assert (r2.local / "a.bin").read_bytes() == b"a" * 1000, "a changed local copy is fetched again"


def test_final_push_deletes_completion_first(bucket, monkeypatch):
    """A push cut short must never leave a stale completion file beside new data."""
    r = Remote(f"{bucket}/node")
    r.local.mkdir(parents=True)
    (r.local / "x").write_text("1")
    (r.local / "manifest.json").write_text("{}")
    (r.local / "_done.json").write_text("{}")
    r.push(final=True)
    (r.local / "x").write_text("22")
    upload = Remote._upload

    def failing(self, fs, base, name, src=None):  # the server refuses the data file's upload
        if name == "x":
            raise UserError("upload refused")
        return upload(self, fs, base, name, src)

    monkeypatch.setattr(Remote, "_upload", failing)
    with pytest.raises(UserError):
        r.push(final=True)
    assert not set(LAST_FILES) & set(_objects(r.uri)), "completion files were deleted before the data upload"


def test_inputs_by_uri(bucket, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello"}\n')
    (corpus / "b.txt").write_text("world\n")
    put_tree(corpus, f"{bucket}/data")
    assert sorted(p.name for p in local_copy(f"{bucket}/data").iterdir() if not p.name.startswith(".")) == ["a.jsonl", "b.txt"]
    one = local_copy(f"{bucket}/data/b.txt")
    assert one.read_text() == "world\n"
    glob = local_copy(f"{bucket}/data/*.jsonl")
    assert glob.name == "*.jsonl" and (glob.parent / "a.jsonl").is_file()
    with pytest.raises(UserError, match="no such object or prefix"):
        local_copy(f"{bucket}/nothing-here")
