"""Student training end to end: real DeepSpeed ranks (2 x gloo on CPU) on a tiny teacher cache.

One module-scoped teacher + cache; every run is a `posdistill train` subprocess.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import build_cache, build_pack, cache_dir_of, make_tiny_llama

from pipeline.config import parse_config
from pipeline.errors import UserError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _base(root: Path, teacher: Path) -> dict:
    return {
        "run": {"name": "t", "out_dir": str(root / "run"), "seed": 0},
        "data": {"source": "synthetic", "synthetic": {"num_docs": 300}},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "teacher": {"model": str(teacher)},
        "cache": {"k": 8, "windows_per_shard": 8, "windows_per_row_group": 2},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}},
        "train": {
            "batch_size": 2, "workers": 2, "save_every": 2, "warmup_steps": 1, "lr": 3e-3, "loss_tile": 32,
            "deepspeed": {"zero_stage": 2},
            "phases": [
                {"window_len": 64, "steps": 2, "rope": {"theta": 10000}, "kd": {"alpha": 0.0}},  # CE, short
                {"window_len": 128, "steps": 4},  # KD from the cache, theta auto
            ],
        },
    }


def _variant(base: dict, name: str, **train) -> dict:
    cfg = copy.deepcopy(base)
    cfg["student"]["name"] = name
    for k, v in train.items():
        cfg["train"][k] = v
    return cfg


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cfg_path: Path, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _metrics(root: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (root / "run" / "train" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cluster.executor import LocalExecutor

    root = tmp_path_factory.mktemp("train")
    teacher = make_tiny_llama(root / "teacher", seed=1, initializer_range=0.2)
    base = _base(root, teacher)
    build_cache(parse_config(base), 1, executor=LocalExecutor())  # `train` reuses it (no embedded Ray needed)
    return root, base


@pytest.fixture(scope="module")
def zero2(setup):
    """The reference run: ZeRO-2, CE phase then KD phase, exported at the end."""
    root, base = setup
    proc = _train(_write(_variant(base, "zero2"), root / "zero2.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_zero2_run_metrics_checkpoints_and_rope(setup, zero2):
    root, _ = setup
    rows = _metrics(root, "zero2")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"phase", "step", "loss", "kd", "ce", "lr", "tokens", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
    assert [r["phase"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[0]["kd"] is None and rows[0]["loss"] == pytest.approx(rows[0]["ce"])  # alpha 0: plain CE
    assert all(r["kd"] is not None and r["loss"] == pytest.approx(r["kd"]) for r in rows[2:])  # alpha 1
    assert rows[0]["tokens"] == 2 * 64 and rows[2]["tokens"] == 2 * 128
    run = root / "run" / "train" / "zero2"
    tags = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert tags == ["step-00000004", "step-00000006"]  # keep_checkpoints: 2
    assert all((run / "checkpoints" / t / "complete").is_file() for t in tags)
    state = json.loads((run / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert len(state["data_states"]) == 2  # every rank's data position
    assert list((run / "tensorboard").glob("events.*"))
    assert "frequency pairs complete a full rotation" in zero2.stderr


def test_exported_model_loads_and_moved_toward_the_teacher(setup, zero2):
    from transformers import AutoModelForCausalLM

    from pipeline.resolve import train_specs
    from stages.cache.reader import ShardReader
    from stages.rope import apply_rope, plan_phases
    from stages.student import build_student
    from stages.teacher import model_inputs

    root, base = setup
    cfg = parse_config(_variant(base, "zero2"))
    out = root / "run" / "train" / "zero2" / "model"
    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    init, fresh = build_student(train_specs(cfg)[0])
    plan = plan_phases(list(train_specs(cfg)[0].phases), init.config, fresh)
    assert trained.config.rope_parameters == plan[-1]  # the last phase's RoPE travels with the export
    apply_rope(init, plan[-1], 128)
    init.eval()
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher").eval()

    def kl(model) -> float:  # full-vocabulary KL(teacher || model) on cached windows
        total = 0.0
        for i, row in zip(range(8), ShardReader(cache_dir_of(cfg, 1), dp_rank=0, dp_size=1, seed=0)):
            kw = model_inputs(row["input_ids"].long()[None], [row["doc_starts"].tolist()], "cross_doc")
            with torch.no_grad():
                lt = torch.log_softmax(teacher(**kw).logits, -1)
                ls = torch.log_softmax(model(**kw).logits, -1)
            total += (lt.exp() * (lt - ls)).sum(-1).mean().item()
        return total / 8

    assert kl(trained) < kl(init)

    # `posdistill export` on the run directory rebuilds the same model from the newest checkpoint.
    from stages.train.export import export_checkpoint

    again = AutoModelForCausalLM.from_pretrained(export_checkpoint(out.parent, root / "exported")).eval()
    for (n, a), b in zip(trained.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_zero3_gives_the_zero2_losses(setup, zero2):
    root, base = setup
    proc = _train(_write(_variant(base, "zero3", deepspeed={"zero_stage": 3}), root / "zero3.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(root, "zero2"), _metrics(root, "zero3")
    assert len(b) == 6
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    assert (root / "run" / "train" / "zero3" / "model" / "config.json").is_file()


def test_kill_then_resume_continues_exactly(setup, zero2):
    root, base = setup
    name = "killed"
    path = _write(_variant(base, name), root / "killed.yaml")
    marker = root / "run" / "train" / name / "checkpoints" / "step-00000004" / "complete"
    marker.parents[2].mkdir(parents=True)
    (marker.parents[2] / ".test-step-delay").write_text("0.5")  # tests/hooks/sitecustomize.py
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.is_file(), "no checkpoint at step 4 before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
    before = _metrics(root, name)
    assert 4 <= len(before) < 6  # killed mid-phase, after the checkpoint
    resumed = _train(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    rows, ref = _metrics(root, name), _metrics(root, "zero2")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one record per step, none duplicated
    for x, y in zip(rows[4:], ref[4:]):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"])


def test_sequence_parallel_matches_a_single_rank(setup):
    """Ulysses SP 2 on 2 ranks vs one rank: same loss and same gradient norm (within 1e-5)."""
    root, base = setup
    kd_only = [{"window_len": 128, "steps": 3}]
    runs = {"sp2": dict(workers=2, sequence_parallel=2), "sp1": dict(workers=1, sequence_parallel=1)}
    for name, t in runs.items():
        cfg = _variant(base, name, batch_size=1, phases=kd_only, **t)
        proc = _train(_write(cfg, root / f"{name}.yaml"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(root, "sp2"), _metrics(root, "sp1")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * abs(y["grad_norm"])


# ----------------------------------------------------------------------------- bad input


def _preflight(raw: dict, world: int) -> None:
    """The training preflight on the inputs the graph would hand it (caches not built)."""
    from pipeline.resolve import layout, train_specs
    from stages.train.plan import preflight

    cfg = parse_config(raw)
    spec, lay = train_specs(cfg)[0], layout(cfg)
    inputs = {ph.index: lay.cache_dir(ph.cache) if ph.cache else build_pack(cfg, ph.index) for ph in spec.phases}
    preflight(spec, inputs, world)


def test_missing_or_stale_cache_names_the_fields(setup):
    root, base = setup
    cfg = copy.deepcopy(base)
    cfg["cache"]["k"] = 4  # the cache on disk was computed with k=8
    with pytest.raises(UserError, match=r"posdistill cache.*stale.*\bk \(cache: 8, run: 4\)"):
        _preflight(cfg, 2)
    cfg = copy.deepcopy(base)
    cfg["train"]["phases"][1]["window_len"] = 96  # no cache was computed for this window
    with pytest.raises(UserError, match=r"phases\[1\].*window_len \(cache: 128, run: 96\)"):
        _preflight(cfg, 2)


def test_kd_temperature_must_match_the_cache_unless_allowed(setup):
    _, base = setup
    cfg = copy.deepcopy(base)
    cfg["train"]["phases"][1]["kd"] = {"temperature": 2.0}  # the cache holds values at 1.0
    with pytest.raises(UserError, match=r"phases\[1\] \(phase1\)\.kd: train\.kd\.temperature 2\.0 differs .* 1\.0"):
        _preflight(cfg, 2)
    cfg["train"]["phases"][1]["kd"]["allow_temperature_mismatch"] = True
    _preflight(cfg, 2)


def test_kd_loss_choice_reaches_the_ranks(setup, zero2):
    """kd.loss: tvd trains through DeepSpeed and its logged kd is a TVD. The first KD step of
    both runs sees the same weights (the same CE phase before it) and the same windows, so
    Pinsker's inequality, TVD <= sqrt(KL / 2) (per position over the same buckets, and so for
    the means by Jensen), must hold between them -- and fails if the choice never arrived."""
    root, base = setup
    cfg = _variant(base, "tvd")
    cfg["train"]["kd"] = {"loss": "tvd"}
    proc = _train(_write(cfg, root / "tvd.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tvd = [m["kd"] for m in _metrics(root, "tvd") if m["phase"] == 1]
    kl = [m["kd"] for m in _metrics(root, "zero2") if m["phase"] == 1]
    assert len(tvd) == len(kl) == 4
    assert all(0.0 <= x <= 1.0 for x in tvd)
    assert tvd[0] <= (kl[0] / 2) ** 0.5 < kl[0], (tvd, kl)


def test_vocab_mismatch_names_both_sizes(setup, tmp_path):
    _, base = setup
    cfg = copy.deepcopy(base)
    cfg["student"] = {"init": str(make_tiny_llama(tmp_path / "big", vocab_size=300))}
    with pytest.raises(UserError, match=r"300 tokens.*260"):
        _preflight(cfg, 2)


def test_batch_geometry_steps_and_zero_stage_are_checked(setup):
    _, base = setup
    with pytest.raises(UserError, match=r"train.batch_size 2 is not divisible .* 1 x 3"):
        _preflight(base, 3)
    bad = copy.deepcopy(base)
    bad["train"]["phases"][0]["steps"] = 0
    with pytest.raises(UserError, match=r"train.phases\[0\].steps: .*greater than 0"):
        parse_config(bad)
    bad = copy.deepcopy(base)
    bad["train"]["deepspeed"]["zero_stage"] = 4
    with pytest.raises(UserError, match=r"train.deepspeed.zero_stage: Input should be 1, 2 or 3"):
        parse_config(bad)


def test_cli_bad_input_exits_2_before_starting_ranks(setup, tmp_path):
    root, base = setup
    cfg = _variant(base, "never")
    cfg["student"] = {"init": str(make_tiny_llama(tmp_path / "big", vocab_size=300)), "name": "never"}
    proc = _train(_write(cfg, root / "bad.yaml"))
    assert proc.returncode == 2 and "300 tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "run" / "train" / "never" / "checkpoints").exists()  # no rank started
    proc = _train(_write(_variant(base, "fresh"), root / "fresh.yaml"), "--resume")
    assert proc.returncode == 2 and "--resume: train fresh: no complete, intact checkpoint" in proc.stderr


def test_ray_train_launcher(setup):
    """launcher: ray runs the same loop in Ray Train workers (deepspeed.initialize inside)."""
    root, base = setup
    cfg = _variant(base, "ray", launcher="ray", phases=[{"window_len": 64, "steps": 2, "kd": {"alpha": 0.0}}])
    proc = _train(_write(cfg, root / "ray.yaml"), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(root, "ray")] == [1, 2]
    assert (root / "run" / "train" / "ray" / "model" / "config.json").is_file()
