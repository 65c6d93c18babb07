"""Training under faults, with real DeepSpeed ranks (2 x gloo): non-finite targets and losses
stop every rank at the step they occur, signals to the parent alone stop every rank, a
corrupt newest checkpoint falls back to the previous complete one, and loading a
checkpoint never runs code hidden in a pickle.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import build_cache, make_tiny_llama

from pipeline.config import parse_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _raw(root: Path, teacher: Path, name: str, steps: int = 4) -> dict:
    return {
        "run": {"name": "t", "out_dir": str(root / "run"), "seed": 0},
        "data": {"source": "synthetic", "synthetic": {"num_docs": 300}},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "teacher": {"model": str(teacher)},
        "cache": {"k": 8, "windows_per_shard": 8, "windows_per_row_group": 2},
        "student": {"name": name, "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}},
        "train": {"batch_size": 2, "workers": 2, "save_every": 2, "warmup_steps": 1, "lr": 3e-3, "loss_tile": 32,
                  "phases": [{"name": "kd128", "window_len": 128, "steps": steps}]},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cluster.executor import LocalExecutor

    root = tmp_path_factory.mktemp("faults")
    teacher = make_tiny_llama(root / "teacher", seed=1, initializer_range=0.2)
    build_cache(parse_config(_raw(root, teacher, "x")), 0, executor=LocalExecutor())
    return root, teacher


def _config(setup, name: str, **kw) -> tuple[Path, Path]:
    root, teacher = setup
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_raw(root, teacher, name, **kw)))
    run = root / "run" / "train" / name
    run.mkdir(parents=True, exist_ok=True)
    return path, run


def _train(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error")]


def _ranks_of(run: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "stages.train" in cmd and str(run) in cmd:
            out.append(p)
    return out


@pytest.mark.parametrize("fault,says", [("nan_target", "non-finite teacher log-probs"),
                                        ("nan_loss", "non-finite loss")])
def test_non_finite_stops_every_rank_at_that_step(setup, fault: str, says: str):
    cfg, run = _config(setup, fault)
    (run / ".test-fault").write_text(f"{fault}:3")  # tests/hooks/sitecustomize.py, rank 0 only
    proc = _train(cfg)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _errors(proc)
    assert says in line and "kd128 step 3" in line, line
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    tags = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert tags == ["step-00000002"]  # the poisoned step is never saved
    assert not (run / "model").exists()
    assert not _ranks_of(run)


def _training(cfg: Path, run: Path) -> subprocess.Popen:
    """A slowed `train` (0.5 s per step) whose ranks are up and stepping."""
    (run / ".test-step-delay").write_text("0.5")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if not ((run / "metrics.jsonl").is_file() and len(_ranks_of(run)) >= 2):
        _stop(proc, run)
        raise AssertionError("the ranks never started")
    return proc


def _stop(proc: subprocess.Popen, run: Path) -> None:
    for p in _ranks_of(run):
        p.kill()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_the_parent_alone_stops_every_rank(setup, sig: int, code: int):
    cfg, run = _config(setup, f"sig{int(sig)}", steps=40)
    proc = _training(cfg, run)
    try:
        os.kill(proc.pid, sig)  # the parent only, not its process group
        _, err = proc.communicate(timeout=30)
        gone = time.monotonic() + 10
        while _ranks_of(run) and time.monotonic() < gone:
            time.sleep(0.2)
        assert proc.returncode == code, err[-3000:]
        assert not _ranks_of(run), "ranks still running 10 s after the parent stopped"
    finally:
        _stop(proc, run)


def test_second_train_on_the_same_run_dir_is_refused_naming_the_holder(setup):
    """While one `train` writes a run directory, a second one of the same config exits 2
    with one line naming the first (its pid) before any rank starts; once the first is
    stopped the directory is free."""
    from pipeline.locks import exclusive

    cfg, run = _config(setup, "locked", steps=40)
    first = _training(cfg, run)
    try:
        ranks = {p.pid for p in _ranks_of(run)}
        second = _train(cfg)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert len(_errors(second)) == 1 and f"{run}: another train job is writing here (pid {first.pid} on " \
            in _errors(second)[0], second.stderr[-3000:]
        assert {p.pid for p in _ranks_of(run)} == ranks  # the second started no rank
        os.kill(first.pid, signal.SIGTERM)
        first.communicate(timeout=30)
    finally:
        _stop(first, run)
    with exclusive(run, "train job"):  # free once its holder is gone
        pass


# ----------------------------------------------------------------------------- checkpoints


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(setup):
    cfg, run = _config(setup, "fallback", steps=4)
    first = _train(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    newest = run / "checkpoints" / "step-00000004"
    victim = sorted(newest.rglob("*model_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated, marker still there
    shutil.rmtree(run / "model")
    (run / "_done.json").unlink()
    again = _train(cfg, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000004" in again.stderr and "step-00000002" in again.stderr, again.stderr[-3000:]
    assert "resuming from step-00000002 (step 2)" in again.stderr
    assert (run / "model" / "config.json").is_file()


def test_checkpoint_with_a_malicious_pickle_does_not_run_it(setup, tmp_path: Path):
    """A checkpoint from someone else: its model states carry a pickle that would create a
    file when unpickled. Resume (and export) refuse it; the file is never created."""
    import pickle

    cfg, run = _config(setup, "evil", steps=2)
    first = _train(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    import torch

    tag = run / "checkpoints" / "step-00000002"
    for f in tag.glob("*.pt"):
        torch.save({"payload": Evil()}, f)
    # ... and rewrites the marker to match, so only the refusal to unpickle stands in the way
    files = {str(f.relative_to(tag)): f.stat().st_size for f in sorted(tag.rglob("*")) if f.is_file() and f.name != "complete"}
    (tag / "complete").write_text(json.dumps({"files": files}))
    assert pickle.loads(pickle.dumps(0)) == 0
    export = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(run / "checkpoints"),
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and not canary.exists(), export.stderr[-3000:]
    assert len(_errors(export)) == 1 and "refused to load" in _errors(export)[0], export.stderr[-2000:]
    (run / "model").rename(tmp_path / "old-model")
    (run / "_done.json").unlink()
    resumed = _train(cfg, "--resume")
    assert not canary.exists(), resumed.stderr[-3000:]
    assert resumed.returncode == 2 and len(_errors(resumed)) == 1, resumed.stderr[-3000:]
    assert "refused to load" in _errors(resumed)[0] and "Traceback" not in resumed.stderr
