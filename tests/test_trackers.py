"""Experiment trackers (train.report_to): one real tiny run (2 x gloo ranks, two CE phases, no
teacher) reports to TensorBoard, W&B (offline, under an environment-set WANDB_DIR) and MLflow
(an environment-set MLFLOW_TRACKING_URI file store outside the run), and each holds the losses
of metrics.jsonl; the config's tracking settings win over the environment, the environment over
the run directory (one unit test per variable); tracker settings leave the run's identity alone; a
missing tracker package fails before anything runs; a resumed run continues the same tracker
runs without sending a step twice; the progress line names student, phase, loss, rate, ETA.
"""

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_config
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _raw(out: Path, **train) -> dict:
    return {
        "run": {"name": "trk", "out_dir": str(out)},
        "data": {"synthetic": {"num_docs": 40}},
        "pack": {"window_len": 64, "doc_len": [16, 64]},
        "student": {"name": "tiny", "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
        "train": {"batch_size": 2, "workers": 2, "warmup_steps": 0, "save_every": 100,
                  "report_to": ["tensorboard", "wandb", "mlflow"],
                  "tracking": {"project": "trk-test", "tags": ["smoke", "ce"]},
                  "phases": [{"window_len": 64, "steps": 3, "kd": {"alpha": 0.0}},
                             {"name": "long", "window_len": 64, "steps": 2, "kd": {"alpha": 0.0},
                              "rope": {"theta": 100000}}],
                  **train},
    }


TRACKER_VARS = ("WANDB_PROJECT", "WANDB_DIR", "WANDB_TAGS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_EXPERIMENT_ID")


def _env(tmp: Path, **extra: str) -> dict:
    """W&B offline, its caches and settings under the test's directory; none of the caller's
    tracker variables (they would decide where the run goes)."""
    base = {k: v for k, v in os.environ.items() if k not in TRACKER_VARS}
    return {**base, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp / "wandb-cache"), "WANDB_DATA_DIR": str(tmp / "wandb-data"), **extra}


def _cli(cfg: dict, path: Path, *prefix: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, *prefix] if prefix else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*cmd, "train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env or _env(path.parent))


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: LevelDB-log framing (a 7-byte file header, 32 KiB
    blocks, 7-byte chunk headers: crc32, length, type) around wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


def wandb_history(path: Path) -> dict[int, dict]:
    rows = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A team's tracker environment: an MLflow store and a W&B directory outside the run (both
    honoured), a W&B project and MLflow experiment the config's tracking.project overrides."""
    tmp = tmp_path_factory.mktemp("trackers")
    env = _env(tmp, MLFLOW_TRACKING_URI=(tmp / "team-mlruns").as_uri(), WANDB_DIR=str(tmp / "team-wandb"),
               WANDB_PROJECT="env-project", MLFLOW_EXPERIMENT_NAME="env-experiment")
    proc = _cli(_raw(tmp / "out"), tmp / "c.yaml", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, tmp / "out" / "train" / "tiny", proc


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_losses(trained):
    tmp, run, _ = trained
    assert not (run / "wandb").exists()  # WANDB_DIR said where
    offline = list((tmp / "team-wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1  # rank 0 only
    files = list(offline[0].glob("run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    rows = _metrics(run)
    assert sorted(history) == [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert history[r["step"]]["train/phase"] == r["phase"]
    start = next(r.run for r in wandb_records(files[0]) if r.WhichOneof("record_type") == "run")
    # tracking.project / tags win over WANDB_PROJECT=env-project
    assert (start.project, start.display_name, list(start.tags)) == ("trk-test", "tiny", ["smoke", "ce"])
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert config["label"] == "tiny" and config["train"]["batch_size"] == 2
    assert [p["window_len"] for p in config["resolved_phases"]] == [64, 64]
    ids = json.loads((run / "trackers.json").read_text())
    assert files[0].name == f"run-{ids['wandb']['id']}.wandb"


@pytest.mark.slow
def test_mlflow_file_store_holds_the_same_per_step_losses(trained):
    from mlflow.tracking import MlflowClient

    tmp, run, _ = trained
    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert ids["uri"] == (tmp / "team-mlruns").as_uri() and not (run / "mlruns").exists()  # MLFLOW_TRACKING_URI
    assert (tmp / "team-mlruns").is_dir()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(ids["uri"])
    got = client.get_run(ids["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "tiny"
    assert client.get_experiment(got.info.experiment_id).name == "trk-test"  # not MLFLOW_EXPERIMENT_NAME
    assert {"smoke", "ce"} <= set(got.data.tags)
    history = sorted((m.step, m.value) for m in client.get_metric_history(ids["run_id"], "train/loss"))
    assert history == [(r["step"], r["loss"]) for r in _metrics(run)]
    params = got.data.params
    assert params["train.batch_size"] == "2" and params["label"] == "tiny" and params["resolved_phases.1.name"] == "long"
    assert "train.report_to" not in params and "train.tracking.project" not in params  # not the run's identity


@pytest.mark.slow
def test_tensorboard_events_and_progress_lines(trained):
    _, run, proc = trained
    assert list((run / "tensorboard").glob("events.*"))
    line = r" \d+/{n} steps \| loss \d[\d.e+-]* \| [\d.]+k? tokens/s \| ETA \d+:\d\d"
    assert re.search(r"train tiny phase 1/2:" + line.format(n=3), proc.stderr), proc.stderr
    assert re.search(r"train tiny phase 2/2 \(long\):" + line.format(n=2), proc.stderr), proc.stderr
    assert "wandb:" not in proc.stderr + proc.stdout and "mlflow" not in proc.stderr.lower()  # quiet


@pytest.mark.slow
def test_changing_tracker_settings_reuses_the_done_run(trained):
    tmp, run, _ = trained
    again = _raw(tmp / "out", report_to=["tensorboard"], tracking={"project": "other", "run_name": "x"})
    proc = _cli(again, tmp / "again.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"train: reusing train tiny ({run})" in proc.stdout


# variable, its value, the TrackerSettings field it sets, the train.tracking that overrides it,
# what that field is then, and its default (RUN: under the run directory)
PRECEDENCE = [
    ("MLFLOW_TRACKING_URI", "http://mlflow.team:5000", "mlflow_uri", {"mlflow_tracking_uri": "file:///cfg"},
     "file:///cfg", "RUN/mlruns"),
    ("MLFLOW_EXPERIMENT_NAME", "team-exp", "mlflow_experiment", {"project": "cfg"}, "cfg", "posdistill"),
    ("MLFLOW_EXPERIMENT_ID", "17", "mlflow_experiment_id", {"project": "cfg"}, None, None),
    ("WANDB_PROJECT", "team-proj", "wandb_project", {"project": "cfg"}, "cfg", "posdistill"),
    ("WANDB_DIR", "/team/wandb", "wandb_dir", None, None, "RUN"),
    ("WANDB_TAGS", "a, b,,c", "wandb_tags", {"tags": ["cfg"]}, ("cfg",), ()),
]


@pytest.mark.parametrize("var,value,field,config,overridden,default", PRECEDENCE, ids=[p[0] for p in PRECEDENCE])
def test_each_tracker_variable_sits_between_the_config_and_the_run_directory(tmp_path, var, value, field, config,
                                                                            overridden, default):
    from pipeline.config import TrackingConfig
    from stages.train.metrics import tracker_settings

    def get(opts: dict, env: dict):
        return getattr(tracker_settings(TrackingConfig(**opts), tmp_path, "lbl", env), field)

    def norm(v):
        return v if not isinstance(v, str) or not v.startswith("RUN") else (
            (tmp_path / "mlruns").resolve().as_uri() if v == "RUN/mlruns" else tmp_path)

    noise = {"WANDB_MODE": "offline", "MLFLOW_TRACKING_TOKEN": "x"}  # other variables change nothing here
    assert get({}, noise) == norm(default)
    assert get({}, {var: "  "}) == norm(default)  # blank is unset
    got = get({}, {**noise, var: value})
    want = {"WANDB_DIR": Path(value), "WANDB_TAGS": ("a", "b", "c")}.get(var, value)
    assert got == want and got != norm(default)
    if config is not None:
        assert get(config, {var: value}) == overridden


def test_tracker_settings_keep_names_and_experiment_precedence(tmp_path):
    from pipeline.config import TrackingConfig
    from stages.train.metrics import tracker_settings

    env = {"WANDB_NAME": "same-for-all", "MLFLOW_EXPERIMENT_NAME": "by-name", "MLFLOW_EXPERIMENT_ID": "3"}
    s = tracker_settings(TrackingConfig(), tmp_path, "kd-s0", env)
    assert s.run_name == "kd-s0"  # WANDB_NAME would name every student of a sweep alike
    assert (s.mlflow_experiment, s.mlflow_experiment_id) == ("by-name", None)  # the name first, as MLflow does
    assert tracker_settings(TrackingConfig(run_name="r"), tmp_path, "kd-s0", env).run_name == "r"
    assert tracker_settings(TrackingConfig(), tmp_path, "x", {"WANDB_DIR": "~/w"}).wandb_dir == Path.home() / "w"


def test_tracker_settings_are_not_part_of_the_identity(tmp_path):
    from pipeline.resolve import layout, train_specs

    def spec(**train):
        raw = _raw(tmp_path, **train)
        raw["students"] = [{"name": "v", "phases": raw["train"]["phases"]}]  # run dir named by fingerprint
        cfg = parse_config(raw)
        return train_specs(cfg)[0], layout(cfg)

    (a, lay), (b, _) = spec(), spec(report_to=[], tracking={"project": "p", "run_name": "r", "tags": ["t"],
                                                             "mlflow_tracking_uri": "http://127.0.0.1:1"})
    assert a.identity() == b.identity() and lay.run_dir(a) == lay.run_dir(b)
    assert a.train.report_to != b.train.report_to  # the ranks still get them
    (c, _) = spec(batch_size=4)
    assert c.fingerprint() != a.fingerprint()


def test_missing_package_names_report_to_and_the_extra(monkeypatch):
    from stages.train.metrics import check_trackers

    check_trackers(["tensorboard", "wandb", "mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"train\.report_to: wandb needs the 'wandb' package: "
                                        r"pip install 'posdistill\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["tensorboard", "mlflow"])


def test_cli_without_the_package_exits_2_before_anything_is_written(tmp_path):
    blocked = ("import sys; sys.modules['mlflow'] = None; sys.argv[0] = 'posdistill'; "
               "from pipeline.cli import main; main()")
    proc = _cli(_raw(tmp_path / "out"), tmp_path / "c.yaml", "-c", blocked)
    assert proc.returncode == 2, proc.stderr
    assert "train.report_to: mlflow needs the 'mlflow' package: pip install 'posdistill[mlflow]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # checked before the pack node, let alone a rank


def test_resume_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    """A run killed after step 4 with its last checkpoint at step 2: metrics.jsonl drops steps
    3-4 (trained again), W&B and MLflow continue their runs and get steps 5.. only; a tracker
    added on resume gets the kept steps first."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig
    from stages.train.metrics import MetricsLog

    for k in TRACKER_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in _env(tmp_path).items():
        if k.startswith("WANDB_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    rec = lambda step: {"phase": 0, "step": step, "loss": 10.0 - step, "kd": None, "tokens": 8}  # noqa: E731
    opts = TrackingConfig(project="resume")
    with MetricsLog(tmp_path, 0, True, ["wandb", "mlflow"], opts, "s", {"a": 1}) as m:
        for step in (1, 2, 3, 4):
            m.log(rec(step))
    first = json.loads((tmp_path / "trackers.json").read_text())
    assert first["mlflow"]["uri"] == (tmp_path / "mlruns").resolve().as_uri()  # no variable set: the run dir
    time.sleep(1.0)  # W&B names offline run directories by the second they start
    with MetricsLog(tmp_path, 2, True, ["wandb", "mlflow"], opts, "s", {"a": 1}) as m:
        for step in (3, 4, 5, 6):
            m.log(rec(step))
    assert json.loads((tmp_path / "trackers.json").read_text()) == first  # the same runs
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    client = MlflowClient(first["mlflow"]["uri"])
    steps = sorted(x.step for x in client.get_metric_history(first["mlflow"]["run_id"], "train/loss"))
    assert steps == [1, 2, 3, 4, 5, 6]  # none twice
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "FINISHED"
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first['wandb']['id']}/run-*.wandb"))
    assert len(runs) == 2  # offline: one file per attempt, one run id (`wandb sync` joins them)
    assert sorted(wandb_history(runs[0])) == [1, 2, 3, 4] and sorted(wandb_history(runs[1])) == [5, 6]

    with pytest.raises(RuntimeError):  # a failing run marks its tracker run failed
        with MetricsLog(tmp_path / "new", 0, True, ["mlflow"], opts, "s", {}) as m:
            m.log(rec(1))
            raise RuntimeError("boom")
    ids = json.loads((tmp_path / "new" / "trackers.json").read_text())["mlflow"]
    assert MlflowClient(ids["uri"]).get_run(ids["run_id"]).info.status == "FAILED"


def test_progress_line_and_eta_after_a_resume(monkeypatch):
    import pipeline.progress as progress

    clock = iter([100.0, 110.0, 110.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    p = progress.Progress("train kd-theta-s0 phase 2/3", 200, unit="steps", done=40)
    p.note = "loss 2.31"
    p.done, p.amount = 47, 190_000  # 7 steps and 190k tokens in 10 s since the resume
    line = p.line()
    assert line.startswith("train kd-theta-s0 phase 2/3: 47/200 steps | loss 2.31 | 19k tokens/s | ETA 3:38")
    assert progress.is_progress_line(line) and not progress.is_progress_line("train: phase0 window 64, steps 0..3")


def test_local_launcher_redraws_rank_progress_in_place_on_a_terminal(tmp_path, monkeypatch):
    import io

    from cluster.launch import run_ranks

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    lines = ["train: phase0 window 64", "train s phase 1/1: 1/2 steps | loss 3 | ETA 0:01",
             "train s phase 1/1: 2/2 steps | loss 2 | ETA 0:00", "train: exported"]
    script = "import sys\nfor x in %r: print(x, file=sys.stderr, flush=True)" % lines
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert run_ranks([sys.executable, "-c", script], dict(os.environ), tmp_path / "err") == 0
    assert term.getvalue() == (f"{lines[0]}\n\r{lines[1]}\x1b[K\r{lines[2]}\x1b[K\n{lines[3]}\n")
