"""File fingerprints hash whole files (no sampled blocks), memoised in process and on disk.

The 70 MB file is bigger than the old 64 MiB sampling limit: a 4 KiB edit in its middle lay
between the sampled blocks and kept the old fingerprint, so a stale pack or cache was reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import pipeline.fingerprint as fp

ROOT = Path(__file__).resolve().parents[1]
SIZE = 70_000_000
CHUNK = 1 << 20


@pytest.fixture
def memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private memo file and a fresh in-process memo; the racy-timestamp guard is off so a
    file written a moment ago is memoised (tests that want the guard set it back)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(fp, "_memo", {})
    monkeypatch.setattr(fp, "_memo_file", None)
    monkeypatch.setattr(fp, "_dirty", {})
    monkeypatch.setattr(fp, "_RACY_NS", 0)
    return tmp_path / "xdg" / "posdistill" / "hash-memo.json"


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """A 70 MB random file in its own directory (weights/model.bin)."""
    path = tmp_path / "weights" / "model.bin"
    path.parent.mkdir()
    with open(path, "wb") as f:
        for start in range(0, SIZE, CHUNK):
            f.write(os.urandom(min(CHUNK, SIZE - start)))
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file actually read and hashed (memo misses), by name."""
    calls: list[Path] = []
    real = fp._hash_stream

    def counting(f):
        calls.append(Path(f.name))
        return real(f)

    monkeypatch.setattr(fp, "_hash_stream", counting)
    return calls


def edit_middle(path: Path, keep_mtime: bool = False) -> None:
    """Flip 4 KiB in the middle of the file in place (same size, same inode)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        block = f.read(4096)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_whole_file_is_hashed(memo: Path, big: Path) -> None:
    ident = fp.file_identity(big)
    assert ident == {"name": "model.bin", "size": SIZE,
                     "sha256": hashlib.sha256(big.read_bytes()).hexdigest()[:32]}


def test_middle_edit_changes_file_and_dir_identity(memo: Path, big: Path) -> None:
    before_file, before_dir = fp.file_identity(big), fp.dir_identity(big.parent)
    edit_middle(big)
    after_file, after_dir = fp.file_identity(big), fp.dir_identity(big.parent)
    assert after_file["size"] == before_file["size"]
    assert after_file["sha256"] != before_file["sha256"]
    assert after_dir != before_dir and after_dir[0]["sha256"] == after_file["sha256"]


def test_edit_with_restored_mtime_is_detected_through_ctime(memo: Path, big: Path, reads: list[Path]) -> None:
    first = fp.file_identity(big)
    assert fp.file_identity(big) == first and len(reads) == 1  # memo hit
    mtime = big.stat().st_mtime_ns
    edit_middle(big, keep_mtime=True)
    assert big.stat().st_mtime_ns == mtime and big.stat().st_size == SIZE
    assert fp.file_identity(big)["sha256"] != first["sha256"]
    assert len(reads) == 2


def test_second_call_is_memoised(memo: Path, big: Path, reads: list[Path]) -> None:
    calls = fp.hash_calls
    first = fp.file_identity(big)
    assert fp.file_identity(big) == first
    assert fp.dir_identity(big.parent) == [first]
    assert reads == [big.resolve()]
    assert fp.hash_calls == calls + 1


def test_freshly_written_file_is_not_memoised(memo: Path, big: Path, reads: list[Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Timestamps tick coarsely: a write right after the hash could keep the key, so a file
    younger than the racy window is rehashed every time."""
    monkeypatch.setattr(fp, "_RACY_NS", 3_600 * 10**9)
    fp.file_identity(big)
    fp.file_identity(big)
    assert len(reads) == 2
    assert not memo.exists()


def test_small_files_are_not_memoised(memo: Path, tmp_path: Path, reads: list[Path]) -> None:
    small = tmp_path / "config.json"
    small.write_text("{}")
    fp.file_identity(small)
    fp.file_identity(small)
    assert len(reads) == 2


SNIPPET = """
import json, sys
import pipeline.fingerprint as fp
fp._RACY_NS = 0
ident = fp.file_identity(sys.argv[1])
print(json.dumps({"hash_calls": fp.hash_calls, "ident": ident}))
"""


def run_in_subprocess(path: Path, xdg: Path) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SNIPPET, str(path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memo_survives_across_processes(memo: Path, big: Path) -> None:
    xdg = memo.parents[1]
    first = run_in_subprocess(big, xdg)
    assert first["hash_calls"] == 1
    assert memo.exists()
    second = run_in_subprocess(big, xdg)
    assert second == {"hash_calls": 0, "ident": first["ident"]}
    edit_middle(big, keep_mtime=True)
    third = run_in_subprocess(big, xdg)
    assert third["hash_calls"] == 1 and third["ident"]["sha256"] != first["ident"]["sha256"]


@pytest.mark.parametrize("content", [b"\x00not json{", b"[]", b'{"version": 1, "algo": "sha256", "entries": [1]}',
                                     b'{"version": 1, "algo": "sha256", "entries": {"k": 5}}'])
def test_corrupt_memo_file_is_ignored_and_rewritten(memo: Path, big: Path, content: bytes) -> None:
    memo.parent.mkdir(parents=True)
    memo.write_bytes(content)
    ident = fp.file_identity(big)
    assert ident["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()[:32]
    data = json.loads(memo.read_text())
    assert list(data["entries"].values()) == [ident["sha256"]]
    assert [p.name for p in memo.parent.iterdir()] == ["hash-memo.json"]  # no temp file left


def test_memo_of_another_hash_is_ignored(memo: Path, big: Path, reads: list[Path]) -> None:
    fp.file_identity(big)
    data = json.loads(memo.read_text())
    memo.write_text(json.dumps({**data, "algo": "md5"}))
    fp._memo_file = None  # as a new process would: read the memo file again
    fp.file_identity(big)
    assert len(reads) == 2


def test_unwritable_memo_location_does_not_fail(memo: Path, big: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, reads: list[Path]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # mkdir under a file fails, even as root
    first = fp.file_identity(big)
    assert fp.file_identity(big) == first and len(reads) == 1  # the in-process memo still works
    assert fp.dir_identity(big.parent) == [first]


@pytest.fixture
def read_only_home(tmp_path: Path) -> Iterator[Path]:
    """An XDG cache home whose posdistill/ directory cannot be written. As root (how CI runs)
    permissions do not stop writes, so it is a real read-only tmpfs there, as in
    test_cache_integrity; otherwise a directory without write permission."""
    home = tmp_path / "ro"
    home.mkdir()
    if os.geteuid() != 0:
        (home / "posdistill").mkdir()
        os.chmod(home / "posdistill", 0o500)
        try:
            yield home
        finally:
            os.chmod(home / "posdistill", 0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"root, but cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (home / "posdistill").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], check=True)


def test_read_only_cache_dir_does_not_fail(memo: Path, big: Path, read_only_home: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError):  # the directory really is read-only, whoever runs this
        (read_only_home / "posdistill" / "probe").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(read_only_home))
    assert fp.file_identity(big)["size"] == SIZE
    assert list((read_only_home / "posdistill").iterdir()) == []
