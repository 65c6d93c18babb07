"""Nothing bad passes a cache silently: non-finite targets, flipped bytes, stray shards, a
damaged manifest, and a finished cache on read-only storage.

Each test damages a real cache (built once per module on an embedded Ray) the way a bad
teacher, a disk or a person would, then asserts what ``cache verify``, the re-run and the
training reader do about it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import build_cache, make_tiny_llama

from pipeline.config import parse_config
from pipeline.errors import UserError
from stages.cache.reader import ShardReader
from stages.cache.verify import verify_cache
from stages.teacher import NonFiniteTargets, TeacherScorer, load_teacher

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _raw(root: Path, teacher: Path, **cache) -> dict:
    return {"run": {"out_dir": str(root / "run"), "seed": 0}, "data": {"synthetic": {"num_docs": 60}},
            "pack": {"window_len": 128, "doc_len": [16, 64]}, "teacher": {"model": str(teacher)},
            "cache": {"k": 8, "windows_per_shard": 4, "windows_per_row_group": 2, "codec": "plain", **cache}}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), initializer_range=0.2)


@pytest.fixture
def built(tmp_path: Path, teacher: Path, ray_local):
    cfg = parse_config(_raw(tmp_path, teacher))
    return cfg, build_cache(cfg)


def _snapshot(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.parquet"))}


def _flip_inside_data(path: Path) -> None:
    """Flip 4 bytes in the middle of row group 0's log-prob column chunk (page data, not a
    header), then put the mtime back: a careful edit that only ctime still reveals."""
    st = path.stat()
    col = pq.read_metadata(path).row_group(0).column(4)
    assert col.path_in_schema.startswith("topk_logp")
    at = col.data_page_offset + col.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_flipped_bytes_are_reported_regenerated_and_refused(built):
    cfg, out = built
    clean = _snapshot(out)
    victim = out / "shard-000001.parquet"
    _flip_inside_data(victim)
    # the training reader refuses the altered values
    reader = ShardReader(out, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(UserError, match="shard-000001.parquet: row group 0 is corrupt"):
        list(reader)
    # plain `cache verify` (no --deep) reports exactly that shard
    proc = _cli("cache", "verify", str(out))
    assert proc.returncode == 1 and "shard-000001.parquet" in proc.stderr and "shard-000000" not in proc.stderr, \
        proc.stderr
    # the re-run regenerates it, byte-identical to the original
    build_cache(cfg)
    assert _snapshot(out) == clean
    assert verify_cache(out) == []


def test_stray_shard_is_removed_by_the_rerun(built):
    cfg, out = built
    shutil.copy(out / "shard-000000.parquet", out / "shard-000099.parquet")
    assert ("shard-000099.parquet", "not in the shard plan") in verify_cache(out, trust_verified=True)
    build_cache(cfg)
    assert not (out / "shard-000099.parquet").exists()
    assert verify_cache(out) == []


@pytest.mark.parametrize("manifest", ["{}", "[1, 2]", '{"fingerprint": 7}', "not json"])
def test_damaged_manifest_is_named_and_rewritten(built, manifest: str):
    cfg, out = built
    good = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(manifest)
    info = _cli("cache", "info", str(out))
    assert info.returncode == 2 and "Traceback" not in info.stderr, info.stderr
    assert len(_errors(info)) == 1 and "manifest.json" in _errors(info)[0]
    problems = verify_cache(out)
    assert [name for name, _ in problems] == ["manifest.json"]
    build_cache(cfg)
    fixed = json.loads((out / "manifest.json").read_text())
    assert fixed["fingerprint"] == good["fingerprint"] and fixed["shards"] == good["shards"]


def test_read_only_finished_cache_is_reused(tmp_path: Path, teacher: Path):
    """The whole run directory on a real read-only mount: `cache` reuses pack and cache."""
    vol = tmp_path / "vol"
    vol.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(vol)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(_raw(vol, teacher)))
        first = _cli("cache", str(cfg))
        assert first.returncode == 0, first.stderr[-2000:]
        subprocess.run(["mount", "-o", "remount,ro", str(vol)], check=True)
        again = _cli("cache", str(cfg))
        assert again.returncode == 0, again.stderr[-2000:]
        assert "pack: reusing" in again.stdout and "cache: reusing" in again.stdout, again.stdout
        cache_dir = Path(again.stdout.strip().splitlines()[-1])
        assert _cli("cache", "verify", str(cache_dir)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=True)


# ----------------------------------------------------------------------------- finite targets


def test_nan_teacher_weights_stop_before_any_shard(tmp_path: Path, teacher: Path):
    """One embedding row NaN: one line naming the tensor, exit 2, no shard, no manifest."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-teacher"
    shutil.copytree(teacher, bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.embed_tokens.weight"][65] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, bad)))
    proc = _cli("cache", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _errors(proc)
    assert "model.embed_tokens.weight" in line and "non-finite" in line, line
    assert not list((tmp_path / "run").rglob("shard-*.parquet")) and not list((tmp_path / "run").rglob("manifest.json"))


def test_all_nan_weights_are_called_what_they_are(tmp_path: Path, teacher: Path):
    from safetensors.torch import load_file, save_file

    from pipeline.config import TeacherConfig

    bad = tmp_path / "nan-teacher"
    shutil.copytree(teacher, bad)
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(bad / "model.safetensors").items()},
              bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="non-finite weights") as err:
        load_teacher(TeacherConfig(model=str(bad)))
    assert "not supported" not in str(err.value)


def test_nan_logprob_fails_the_job_naming_window_and_position(tmp_path: Path, teacher: Path):
    """Finite weights, a NaN hidden state at window 5 position 17 (an overflow): the job stops
    with one line naming both, is not retried, and publishes nothing."""
    raw = _raw(tmp_path, teacher)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    from helpers import cache_dir_of

    cache_dir = cache_dir_of(parse_config(raw))
    cache_dir.mkdir(parents=True)
    (cache_dir / ".test-fault").write_text("nan:5:17")  # tests/hooks/sitecustomize.py
    proc = _cli("cache", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _errors(proc)
    assert "window 5, position 17" in line, line
    assert "retrying" not in proc.stdout + proc.stderr
    assert not (cache_dir / "manifest.json").exists() and not (cache_dir / "shard-000001.parquet").exists()


def test_scorer_refuses_non_finite_targets(teacher: Path):
    from pipeline.config import TeacherConfig

    scorer = TeacherScorer(load_teacher(TeacherConfig(model=str(teacher))), kind="topk", k=4, samples=0,
                           temperature=1.0, chunk_len=16)
    hidden = torch.randn(2, 40, 64)
    assert torch.isfinite(scorer.select(hidden, [10, 11])["logp"]).all()
    hidden[1, 33] = float("inf")
    with pytest.raises(NonFiniteTargets, match="window 11, position 33"):
        scorer.select(hidden, [10, 11])


def test_deep_verify_finds_non_finite_targets(tmp_path: Path, teacher: Path, monkeypatch):
    """A cache written before the worker checked finiteness: page CRCs are fine (plain verify
    passes), --deep names the window and position."""
    import stages.teacher as teacher_mod
    from cluster.executor import LocalExecutor

    monkeypatch.setattr(teacher_mod, "_check_finite", lambda *a: None)
    select = TeacherScorer.select

    def poisoned(self, hidden, window_ids=None):
        if window_ids and 2 in window_ids:
            hidden = hidden.clone()
            hidden[window_ids.index(2), 9] = float("nan")
        return select(self, hidden, window_ids)

    monkeypatch.setattr(TeacherScorer, "select", poisoned)
    out = build_cache(parse_config(_raw(tmp_path, teacher)), executor=LocalExecutor())
    assert verify_cache(out) == []
    assert verify_cache(out, deep=True) == [("shard-000000.parquet", "non-finite teacher log-probs at window 2, "
                                                                    "position 9")]
    proc = _cli("cache", "verify", "--deep", str(out))
    assert proc.returncode == 1 and "window 2, position 9" in proc.stderr


def test_kd_loss_propagates_nan_targets():
    from stages.kd_loss import KDTargets, tiled_kd_loss

    N, H, V, m = 6, 8, 32, 4
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    top = torch.log_softmax(torch.randn(N, V), -1).topk(m)
    logp = top.values.clone()
    out = tiled_kd_loss(hidden, weight, torch.zeros(N, dtype=torch.long), KDTargets(top.indices, logp))
    assert torch.isfinite(out.loss)
    logp[3, 0] = float("nan")
    for tail in ("bucket", "renormalize"):
        out = tiled_kd_loss(hidden, weight, torch.zeros(N, dtype=torch.long), KDTargets(top.indices, logp), tail=tail)
        assert torch.isnan(out.loss) and torch.isnan(out.kd_sum)
