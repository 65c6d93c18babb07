"""The cache stage end to end on an embedded Ray: format, exactness, fingerprints, faults."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_cache, cache_dir_of, cache_spec_of, make_tiny_llama

from pipeline.config import parse_config
from pipeline.errors import UserError
from stages.cache.manifest import read_manifest
from stages.cache.reader import ShardReader, check_cache
from cluster.executor import LocalExecutor
from stages.cache.verify import verify_cache
from stages.cache.writer import COMPLETE_KEY, FINGERPRINT_KEY
from stages.teacher import load_teacher, model_inputs

pytestmark = pytest.mark.slow


def make_cfg(root, teacher, **cache):
    raw = {
        "run": {"out_dir": str(root / "run"), "seed": 0},
        "data": {"synthetic": {"num_docs": 120}},
        "pack": {"window_len": 128, "doc_len": [16, 64], "mode": cache.pop("mode", "doc_masked")},
        "teacher": {"model": str(teacher), "chunk_len": 48, "batch_size": 2},
        "cache": {"k": 8, "windows_per_shard": 6, "windows_per_row_group": 2, "codec": "plain", **cache},
    }
    return parse_config(raw)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), initializer_range=0.2)


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher, ray_local):
    root = tmp_path_factory.mktemp("cache")
    cfg = make_cfg(root, teacher)
    return cfg, build_cache(cfg)


def test_layout_schema_and_footers(built):
    cfg, out = built
    assert out == cache_dir_of(cfg) and out.parent == cfg.cache_root
    m = read_manifest(out)
    assert m["fingerprint"] == out.name and m["kind"] == "topk" and m["k"] == 8 and m["codec"] == "plain"
    assert (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["cache"]["k"] == 8
    assert [s["index"] for s in m["shards"]] == list(range(len(m["shards"]))) and len(m["shards"]) > 3
    assert verify_cache(out) == [] and verify_cache(out, deep=True) == []
    shard = out / m["shards"][0]["file"]
    meta = pq.read_metadata(shard)
    assert meta.metadata[FINGERPRINT_KEY].decode() == out.name and meta.metadata[COMPLETE_KEY] == b"1"
    schema = pq.read_schema(shard)
    assert [(f.name, str(f.type)) for f in schema] == [
        ("window_id", "int64"), ("input_ids", "list<element: int32>"), ("doc_starts", "list<element: int32>"),
        ("topk_ids", "list<element: int32>"), ("topk_logp", "list<element: halffloat>")]
    rg = meta.row_group(0)
    enc = {rg.column(i).path_in_schema: rg.column(i).encodings for i in range(rg.num_columns)}
    for leaf in ("topk_ids.list.element", "topk_logp.list.element", "input_ids.list.element"):
        assert "BYTE_STREAM_SPLIT" in enc[leaf], enc
    assert all(rg.column(i).compression == "ZSTD" for i in range(rg.num_columns))
    row = pq.read_table(shard).slice(0, 1).to_pylist()[0]
    assert len(row["topk_ids"]) == len(row["topk_logp"]) == 128 * 8  # flattened position-major


def test_cached_topk_equals_full_logit_topk(built, teacher):
    cfg, out = built
    model = load_teacher(cfg.teacher)
    rows = pq.read_table(out / "shard-000002.parquet").to_pylist()
    for row in rows[:3]:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            full = torch.log_softmax(model(**model_inputs(ids, [row["doc_starts"]], "doc_masked")).logits[0].float(), -1)
        ref = torch.topk(full, 8, -1)
        got_ids = torch.tensor(row["topk_ids"]).view(128, 8)
        got_lp = torch.tensor(row["topk_logp"], dtype=torch.float16).view(128, 8).float()
        assert torch.allclose(got_lp, ref.values, rtol=2**-10, atol=1e-6)  # fp16 rounding
        tie = torch.isclose(torch.gather(full, -1, got_ids.long()), ref.values, atol=1e-6)
        assert bool(((got_ids == ref.indices) | tie).all())


def test_fingerprint_covers_teacher_packing_k_and_refuses_mismatch(built, teacher, tmp_path):
    cfg, out = built
    root = tmp_path
    base = make_cfg(root, teacher)
    assert cache_dir_of(base).name == out.name  # cache.root is not part of the identity
    other_teacher = make_tiny_llama(tmp_path / "t2", initializer_range=0.2, seed=1)
    changed = {
        "k": make_cfg(root, teacher, k=16),
        "teacher": make_cfg(root, other_teacher),
        "packing": make_cfg(root, teacher, mode="cross_doc"),
        "temperature": make_cfg(root, teacher, temperature=2.0),
        "codec": make_cfg(root, teacher, codec="compact"),
    }
    names = {key: cache_dir_of(c).name for key, c in changed.items()}
    assert len(set(names.values()) | {out.name}) == len(names) + 1
    with pytest.raises(UserError, match=r"\bk \(cache: 8, run: 16\)"):
        check_cache(out, cache_spec_of(changed["k"]).identity())
    with pytest.raises(UserError, match="teacher.files"):
        ShardReader(out, dp_rank=0, dp_size=1, seed=0, expected_fingerprint=cache_spec_of(changed["teacher"]).identity())
    with pytest.raises(UserError, match="attention"):
        check_cache(out, cache_spec_of(changed["packing"]).identity())
    assert check_cache(out, cache_spec_of(base).identity())["fingerprint"] == out.name


def test_rerun_skips_valid_shards(built, capsys):
    cfg, out = built
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    assert build_cache(cfg, executor=LocalExecutor(), verbose=True) == out  # would recompute, if asked
    assert "reusing" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")} == before


def test_injected_actor_crash_is_retried(teacher, tmp_path, monkeypatch, ray_local, capsys):
    cfg = make_cfg(tmp_path, teacher, windows_per_shard=12, codec="compact")
    cache_dir_of(cfg).mkdir(parents=True)
    (cache_dir_of(cfg) / ".test-fault").write_text("crash_once:1")  # tests/hooks/sitecustomize.py
    out = build_cache(cfg, verbose=True)
    assert (out / ".fault-crashed-1").exists()  # the actor really died mid-shard 1
    assert "teacher actor died on shard 1; retrying" in capsys.readouterr().out
    assert verify_cache(out) == []
    assert not list(out.glob(".shard-*"))  # the dead attempt's temp file is gone


def test_truncated_shard_is_detected_and_exactly_it_regenerated(built):
    cfg, out = built
    bad = out / "shard-000003.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "verify", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "shard-000003.parquet" in res.stderr and "shard-000002" not in res.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet") if p != bad}
    build_cache(cfg)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    assert {k: after[k] for k in before} == before and after[bad.name] != 0
    assert verify_cache(out) == []


def test_force_rebuilds_everything(built):
    cfg, out = built
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    build_cache(cfg, force=True, executor=LocalExecutor())
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)
    assert verify_cache(out) == []


def test_overlapping_shards_share_the_teacher_one_at_a_time(teacher, tmp_path, monkeypatch):
    """A worker runs two shards at once (the next one's forwards during this one's tail):
    forwards never overlap, tails really do overlap them, and the targets are exactly those
    of one shard at a time."""
    import threading
    import time

    from stages.cache import stage
    from stages.cache.writer import CacheWriter
    from stages.teacher import TeacherScorer

    def targets(out):
        return [(x["window_id"], x["ids"], x["logp"]) for x in ShardReader(out, dp_rank=0, dp_size=1, seed=0)]

    monkeypatch.setattr(stage, "SHARDS_IN_FLIGHT", 1)
    one_at_a_time = targets(build_cache(make_cfg(tmp_path / "seq", teacher), executor=LocalExecutor()))
    monkeypatch.undo()

    lock = threading.Lock()
    seen = {"running": 0, "most": 0, "calls": 0, "during_close": 0}
    hidden, close = TeacherScorer.hidden, CacheWriter.close

    def counted_hidden(self, *a, **k):
        with lock:
            seen["running"] += 1
            seen["calls"] += 1
            seen["most"] = max(seen["most"], seen["running"])
        try:
            return hidden(self, *a, **k)
        finally:
            with lock:
                seen["running"] -= 1

    def slow_close(self):
        before = seen["calls"]
        time.sleep(0.3)  # a slow fsync: the next shard's forwards run meanwhile
        seen["during_close"] += seen["calls"] > before
        return close(self)

    monkeypatch.setattr(TeacherScorer, "hidden", counted_hidden)
    monkeypatch.setattr(CacheWriter, "close", slow_close)
    out = build_cache(make_cfg(tmp_path / "overlap", teacher), executor=LocalExecutor())
    assert seen["most"] == 1  # the teacher lock held
    assert seen["during_close"] >= 2  # forwards ran while other shards were closing
    assert verify_cache(out) == []
    got = targets(out)
    assert [w for w, *_ in got] == [w for w, *_ in one_at_a_time]
    for (_, ids, logp), (_, ref_ids, ref_logp) in zip(got, one_at_a_time):
        assert torch.equal(ids, ref_ids) and torch.equal(logp, ref_logp)


@pytest.mark.parametrize("codec", ["plain", "compact"])
def test_sampled_cache_through_the_reader(teacher, tmp_path, codec):
    cfg = make_cfg(tmp_path, teacher, kind="sampled", samples=6, codec=codec)
    out = build_cache(cfg, executor=LocalExecutor())
    assert verify_cache(out) == []
    model = load_teacher(cfg.teacher)
    item = next(iter(ShardReader(out, dp_rank=0, dp_size=1, seed=0)))
    assert item["counts"].dtype == torch.int16 and item["ids"].dtype == torch.int32
    assert item["logp"].dtype == torch.float16 and item["ids"].shape == (128, 6)
    assert bool((item["counts"].long().sum(-1) == 6).all())
    with torch.no_grad():
        full = torch.log_softmax(model(**model_inputs(item["input_ids"][None].long(), [item["doc_starts"].tolist()],
                                                      "doc_masked")).logits[0].float(), -1)
    want = torch.gather(full, -1, item["ids"].long())
    valid = item["counts"] > 0
    got = item["logp"].float()
    if codec == "plain":  # float16 rounding
        assert bool(((got - want).abs()[valid] <= 2**-10 * want.abs()[valid] + 1e-6).all())
    else:  # the compact bound |sqrt q - sqrt p| <= 1/256, plus float16 rounding
        err = ((0.5 * got).exp() - (0.5 * want).exp()).abs()[valid]
        assert float(err.max()) <= 1 / 256 + 1e-3


def test_cache_info_cli(built):
    cfg, out = built
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "cache", "info", str(out), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["k"] == 8 and info["kind"] == "topk" and info["codec"] == "plain"
    assert info["tokens"] == info["windows"] * 128 and np.isclose(info["bytes_per_entry"], info["bytes_per_token"] / 8)


def test_attach_to_a_running_token_cluster(teacher, tmp_path):
    """`posdistill cache CONFIG --address` drives a separately started loopback head (token auth on)."""
    import os

    import yaml

    env = {**os.environ, "POSDISTILL_STATE_DIR": str(tmp_path / "state")}
    cli = [sys.executable, "-m", "pipeline.cli"]
    up = subprocess.run(cli + ["cluster", "up", "--port", "6433", "--dashboard-port", "8433", "--num-cpus", "1"],
                        env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    try:
        cfg = make_cfg(tmp_path, teacher)
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg.resolved()))
        run = subprocess.run(cli + ["cache", str(path), "--address", "127.0.0.1:6433"],
                             env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        out = cache_dir_of(cfg)
        assert run.stdout.strip().endswith(str(out)) and verify_cache(out) == []
    finally:
        subprocess.run(cli + ["cluster", "down"], env=env, capture_output=True, timeout=120)
