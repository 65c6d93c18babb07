"""The pipeline with everything on a bucket of a real S3-compatible server on 127.0.0.1: corpus,
tokenizer and teacher read from it, packs, caches, checkpoints and the exported model written
to it; a second machine (an empty scratch) reuses what the bucket holds; a killed cache job
resumes from the bucket; `cache verify s3://...` catches a flipped byte there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
import yaml
from helpers import make_tiny_llama
from s3server import bucket, put_tree, s3_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def _keys(uri: str) -> dict[str, int]:
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _inputs(bucket: str, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "teacher", seed=1)
    put_tree(tmp_path / "teacher", f"{bucket}/models/teacher")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import random
    rng = random.Random(0)
    for part in range(2):
        with open(corpus / f"part-{part}.jsonl", "w") as f:
            for _ in range(60):
                seg = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(4, 12)))
                f.write(json.dumps({"text": (seg * 20)[: rng.randint(16, 64)]}) + "\n")
    put_tree(corpus, f"{bucket}/corpus")


def _config(bucket: str, tmp_path: Path, **cache: object) -> Path:
    cfg = {
        "run": {"name": "s3", "out_dir": f"{bucket}/out", "seed": 0},
        "data": {"source": f"{bucket}/corpus/*.jsonl", "tokenizer": f"{bucket}/models/teacher"},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "teacher": {"model": f"{bucket}/models/teacher", "num_actors": 1},
        "cache": {"root": f"{bucket}/cache", "k": 4, "windows_per_shard": 2, "windows_per_row_group": 1, **cache},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
        "train": {"batch_size": 2, "workers": 2, "save_every": 2, "warmup_steps": 0,
                  "phases": [{"window_len": 128, "steps": 4, "kd": {"alpha": 1.0}}]},
    }
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pipeline_on_a_bucket(bucket, tmp_path, monkeypatch):
    _inputs(bucket, tmp_path)
    cfg = _config(bucket, tmp_path)
    first = _cli("train", str(cfg))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    keys = _keys(bucket)
    caches = {k.split("/")[1] for k in keys if k.startswith("cache/")}
    assert len(caches) == 1
    (fp,) = caches
    cache_keys = {k for k in keys if k.startswith(f"cache/{fp}/")}
    assert {f"cache/{fp}/manifest.json", f"cache/{fp}/_done.json", f"cache/{fp}/plan.json"} <= cache_keys
    shards = sorted(k for k in cache_keys if k.endswith(".parquet"))
    manifest = json.loads(pafs.FileSystem.from_uri(f"{bucket}/cache/{fp}/manifest.json")[0]
                          .open_input_file(f"{bucket[5:]}/cache/{fp}/manifest.json").read())
    assert len(shards) == len(manifest["shards"]) > 1
    assert not [k for k in keys if "/." in k or k.startswith(".")], "temp files, locks and memos stay local"
    run = "out/train/student"
    assert f"{run}/_done.json" in keys and f"{run}/model/config.json" in keys
    assert any(k.startswith(f"{run}/model/") and k.endswith(".safetensors") for k in keys)
    assert any(k.startswith(f"{run}/checkpoints/step-") for k in keys)
    assert any(k.startswith("out/pack/") and k.endswith("_done.json") for k in keys)

    verify = _cli("cache", "verify", f"{bucket}/cache/{fp}")
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    info = _cli("cache", "info", f"{bucket}/cache/{fp}", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["windows"] == manifest["windows"]

    # Another machine: an empty scratch. Everything is reused from the bucket, nothing computed.
    monkeypatch.setenv("POSDISTILL_SCRATCH", str(tmp_path / "machine-2"))
    again = _cli("train", str(cfg))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "computing" not in again.stdout, again.stdout
    assert again.stdout.count("reusing") >= 3, again.stdout

    export = _cli("export", f"{bucket}/{run}/checkpoints", f"{bucket}/exported")
    assert export.returncode == 0, export.stdout + export.stderr
    assert "exported/config.json" in _keys(bucket) and "exported/_done.json" not in _keys(bucket)
    from transformers import AutoModelForCausalLM
    from pipeline.storage import Remote
    model = AutoModelForCausalLM.from_pretrained(Remote(f"{bucket}/exported").pull())
    assert model.config.hidden_size == 32

    # A flipped byte in a shard on the bucket: verify (from a third, empty scratch) names it.
    fs, _ = pafs.FileSystem.from_uri(bucket)
    key = f"{bucket[5:]}/{shards[0]}"
    data = bytearray(fs.open_input_file(key).read())
    data[len(data) // 3] ^= 0x40
    with fs.open_output_stream(key) as f:
        f.write(bytes(data))
    monkeypatch.setenv("POSDISTILL_SCRATCH", str(tmp_path / "machine-3"))
    bad = _cli("cache", "verify", f"{bucket}/cache/{fp}")
    assert bad.returncode == 1 and Path(shards[0]).name in bad.stderr, bad.stdout + bad.stderr


def test_killed_cache_job_resumes_from_the_bucket(bucket, tmp_path, monkeypatch):
    from helpers import cache_dir_of
    from pipeline.config import parse_config
    from pipeline.storage import remote_for

    _inputs(bucket, tmp_path)
    cfg = _config(bucket, tmp_path)
    cache_dir = cache_dir_of(parse_config(yaml.safe_load(cfg.read_text())), phase=0)
    remote = remote_for(cache_dir)
    assert remote is not None
    cache_dir.mkdir(parents=True)
    (cache_dir / ".test-fault").write_text("sleep:0.4")  # tests/hooks: slow row groups, so the kill lands mid-job
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache", str(cfg)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while not [k for k in remote.listing() if k.endswith(".parquet")]:
        assert driver.poll() is None, "the cache job ended before any shard reached the bucket"
        assert time.monotonic() < deadline, "no shard reached the bucket"
        time.sleep(0.2)
    spawned = psutil.Process(driver.pid).children(recursive=True)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    for p in spawned:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(1)
    listing = remote.listing()
    assert "manifest.json" not in listing and "_done.json" not in listing
    on_bucket = sorted(k for k in listing if k.endswith(".parquet"))
    plan = json.loads((cache_dir / "plan.json").read_text())
    assert 0 < len(on_bucket) < len(plan["shards"]), "the kill should land mid-job"

    # Resume on another machine: only the bucket's shards are known there.
    monkeypatch.setenv("POSDISTILL_SCRATCH", str(tmp_path / "machine-2"))
    rerun = _cli("cache", str(cfg))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"({len(on_bucket)} valid, skipped)" in rerun.stdout, rerun.stdout
    listing = remote.listing()
    assert {"manifest.json", "_done.json"} <= set(listing)
    assert len([k for k in listing if k.endswith(".parquet")]) == len(plan["shards"])
    verify = _cli("cache", "verify", remote.uri)
    assert verify.returncode == 0, verify.stdout + verify.stderr
