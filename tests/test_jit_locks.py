"""A JIT build killed mid-way leaves torch's bare ``lock`` file; the next run must say which
file to delete instead of waiting on it forever (cluster/jit.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.jit import check_jit_locks, stale_locks
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _lock(root: Path, age_s: float) -> Path:
    build = root / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.touch()
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def test_old_lock_without_a_builder_is_named(tmp_path):
    lock = _lock(tmp_path, age_s=600)
    with pytest.raises(UserError, match=f"^{lock}: a JIT build lock left by a killed build.*rm {lock}$"):
        check_jit_locks(tmp_path)


def test_a_young_lock_or_a_live_build_is_left_alone(tmp_path):
    young = _lock(tmp_path / "a", age_s=1)
    assert stale_locks(tmp_path / "a") == [] and young.exists()
    lock = _lock(tmp_path / "b", age_s=600)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=lock.parent)
    try:
        time.sleep(0.3)
        assert stale_locks(tmp_path / "b") == []  # a process works in the build dir (ninja would)
    finally:
        builder.kill()
        builder.wait()
    assert stale_locks(tmp_path / "b") == [lock]


def test_train_stops_at_once_on_a_stale_lock(tmp_path):
    ext = tmp_path / "ext"
    lock = _lock(ext, age_s=600)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": "jit", "out_dir": str(tmp_path / "out")},
        "data": {"synthetic": {"num_docs": 40}},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
        "train": {"batch_size": 2, "workers": 1, "phases": [{"window_len": 128, "steps": 1, "kd": {"alpha": 0.0}}]},
    }))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"rm {lock}" in out.stderr and time.monotonic() - t0 < 120
