"""torchrun across "machines" without Ray: two processes of `posdistill train --nnodes 2
--node-rank 0/1 --rdzv-endpoint 127.0.0.1:PORT` train the same student as one node with two
ranks; bad flag combinations are refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.head import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _config(root: Path, name: str, **run) -> Path:
    cfg = {"run": {"name": name, "out_dir": str(root / name), "seed": 0, **run},
           "data": {"source": "synthetic", "synthetic": {"num_docs": 60}},
           "pack": {"window_len": 64, "doc_len": [16, 48]},
           "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
           "train": {"batch_size": 2, "workers": 1, "save_every": 2, "warmup_steps": 1, "deepspeed": {"zero_stage": 2},
                     "phases": [{"window_len": 64, "steps": 2, "kd": {"alpha": 0.0}}]}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(cfg), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model / "model.safetensors"))


@pytest.mark.parametrize("backend", ["static"])
def test_two_nodes_match_one_node_with_two_ranks(tmp_path: Path, backend: str):
    one = _train(_config(tmp_path, "one"), "--workers", "2")
    out_one = one.communicate(timeout=600)[0]
    assert one.returncode == 0, out_one[-3000:]

    cfg = _config(tmp_path, "two")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [_train(cfg, "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", endpoint,
                    "--rdzv-backend", backend) for r in (1, 0)]  # node 1 first: it waits for node 0's pack
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    assert "waiting for node 0" in outs[0]
    assert "train: student: 2 ranks" in outs[1]

    run_one, run_two = (next((tmp_path / n / "train").glob("student*")) for n in ("one", "two"))
    assert (run_two / "_done.json").is_file() and (run_two / "model" / "config.json").is_file()
    a, b = _weights(run_one / "model"), _weights(run_two / "model")
    assert a.keys() == b.keys()
    import torch

    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("args,bad", [
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"], "--node-rank 2: must be in 0..1"),
    (["--nnodes", "2"], "--rdzv-endpoint HOST:PORT is required with --nnodes 2"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1"], "--rdzv-endpoint 127.0.0.1: not HOST:PORT"),
    (["--nnodes", "0"], "--nnodes 0"),
])
def test_bad_flags_refused(tmp_path: Path, args: list, bad: str):
    proc = _train(_config(tmp_path, "bad"), *args)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and bad in out, out[-2000:]
    assert not (tmp_path / "bad").exists()  # nothing packed, nothing started


@pytest.mark.parametrize("run,train,bad", [
    ({"out_dir": "s3://bucket/runs"}, {}, "run.out_dir s3://bucket/runs is a bucket"),
    ({}, {"launcher": "ray"}, "train.launcher is 'ray'"),
    ({}, {"local_runner": "deepspeed"}, "needs train.local_runner: torchrun"),
])
def test_multi_node_needs_shared_dir_and_torchrun(tmp_path: Path, run: dict, train: dict, bad: str):
    path = _config(tmp_path, "cfg", **run)
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update(train)
    path.write_text(yaml.safe_dump(cfg))
    proc = _train(path, "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and bad in out, out[-2000:]
