"""What a submitted job receives, and who can read the Ray token: no Ray needed here (the
real head's upload and token mode are checked end to end in tests/test_cluster.py)."""

import os
import stat
import sys
from pathlib import Path

import pytest
from helpers import PLANTED_MARKER, PLANTED_SECRETS, planted_tree

from cluster import auth
from cluster.head import HeadInfo
from cluster.jobs import default_python, entrypoint, is_loopback
from cluster.upload import UPLOAD_ALLOW, stage, staged_files


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return planted_tree(tmp_path_factory.mktemp("tree"))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_staged_dir_holds_only_the_allow_list(tree, tmp_path):
    copied = stage(tree, tmp_path)
    got = _files(tmp_path)
    assert got == {str(p) for p in copied}
    for secret in (*PLANTED_SECRETS, "configs/link.yaml"):
        assert secret not in got, secret
    assert not any(part.startswith(".") for f in got for part in Path(f).parts)
    assert not any(f.endswith((".parquet", ".pyc")) or "__pycache__" in f for f in got)
    assert all(Path(f).parts[0] in UPLOAD_ALLOW for f in got)
    for needed in ("pipeline/cli.py", "stages/__init__.py", "cluster/jobs.py", "cluster/upload.py",
                   "configs/demo.yaml", "configs/teacher-tiny/model.safetensors",
                   "configs/teacher-tiny/tokenizer.json", "pyproject.toml", "README.md", PLANTED_MARKER):
        assert needed in got, needed
    for home_only in ("tests/conftest.py", "bench/pack_memory.py", "Dockerfile", ".gitignore",
                      "configs/teacher-tiny/heatmap.png"):
        assert home_only not in got, home_only
    assert not any(os.path.islink(tmp_path / f) for f in got)


def test_every_python_file_of_the_packages_is_staged(tree):
    staged = {str(p) for p in staged_files(tree)}
    for pkg in ("pipeline", "stages", "cluster"):
        for py in (tree / pkg).rglob("*.py"):
            rel = str(py.relative_to(tree))
            assert "__pycache__" in rel or rel.split("/")[-1].startswith(".") or rel in staged, rel


def test_job_python_is_ours_only_for_the_head_we_started():
    head = HeadInfo(gcs_address="127.0.0.1:6379", dashboard="http://127.0.0.1:8265", temp_dir="/tmp/x",
                    token_path=str(auth.DEFAULT_TOKEN_PATH), started_at=0.0)
    assert default_python("http://127.0.0.1:8265", head) == sys.executable
    assert default_python("localhost:8265", head) == sys.executable
    # Loopback but not our head (`ray dashboard` forwarding a remote cluster): the cluster's python.
    assert default_python("http://127.0.0.1:9999", head) == "python"
    assert default_python("http://10.0.0.5:8265", head) == "python"
    assert default_python("http://127.0.0.1:8265", None) == "python"
    assert is_loopback("http://[::1]:8265") and not is_loopback("http://ray-head:8265")


def test_entrypoint_quotes_the_interpreter_and_arguments():
    cmd = entrypoint("eval", ["--model", "/a dir/m"], "/opt/my env/bin/python")
    assert cmd == "'/opt/my env/bin/python' -m pipeline.cli eval env:POSDISTILL_CONFIG_YAML --model '/a dir/m'"


def test_token_file_is_tightened_and_a_foreign_one_warned_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(auth, "_warned", set())
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    ours = tmp_path / "home" / ".ray" / "auth_token"
    assert auth.private_dir(ours.parent) and stat.S_IMODE(ours.parent.stat().st_mode) == 0o700
    assert not auth.private_dir(ours.parent)
    ours.write_text("tok-ours\n")
    ours.chmod(0o644)
    monkeypatch.setattr(auth, "DEFAULT_TOKEN_PATH", ours)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth.find_token() == ("tok-ours", str(ours))
    assert stat.S_IMODE(ours.stat().st_mode) == 0o600 and capsys.readouterr().err == ""

    foreign = tmp_path / "shared-token"
    foreign.write_text("tok-foreign\n")
    foreign.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(foreign))
    assert auth.find_token()[0] == "tok-foreign" and auth.find_token()[0] == "tok-foreign"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(foreign) in err and "0640" in err and "tok-foreign" not in err
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o640  # the user's file: warned, not changed
