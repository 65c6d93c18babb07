"""One record per optimizer step: ``metrics.jsonl`` (always) and the experiment trackers of
``train.report_to`` that mirror it -- TensorBoard, Weights & Biases, MLflow -- all on rank 0.

Each tracker's package is imported only when it is asked for; :func:`check_trackers` names a
missing one (and the pip extra that installs it) before any rank starts.

On resume, records after the checkpoint's step are dropped from ``metrics.jsonl`` (those steps
are trained again), so the file always holds exactly one record per step of the run so far;
TensorBoard purges them too. W&B and MLflow cannot rewrite a run's history: a resumed run
continues the same tracker run (its id is kept in ``<run>/trackers.json``) and does not send
again the steps that run already received (they retrain to the same numbers). A tracker run
started on resume (a tracker newly added to ``report_to``) first gets the records kept so far.

Where W&B and MLflow file the run comes from :func:`tracker_settings`: ``train.tracking`` first,
then the tracker's standard environment variable, then the run directory (or ``posdistill``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes, atomic_write_json
from pipeline.config import TrackingConfig
from pipeline.errors import UserError

FILE = "metrics.jsonl"
TRACKERS_FILE = "trackers.json"  # the W&B / MLflow run a resumed run continues
FIELDS = ("phase", "step", "loss", "kd", "ce", "lr", "tokens", "tokens_per_s")
# report_to name -> (module imported, what installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "posdistill[wandb]"),
            "mlflow": ("mlflow", "posdistill[mlflow]")}
DEFAULT_PROJECT = "posdistill"


@dataclass(frozen=True)
class TrackerSettings:
    """Where W&B and MLflow file one student's run, every value already chosen by precedence."""

    run_name: str
    tags: tuple[str, ...]  # MLflow's: train.tracking.tags only
    wandb_project: str
    wandb_tags: tuple[str, ...]
    wandb_dir: Path  # W&B writes <wandb_dir>/wandb/
    mlflow_uri: str
    mlflow_experiment: str  # a name; unused when mlflow_experiment_id is set
    mlflow_experiment_id: str | None


def tracker_settings(opts: TrackingConfig, run: Path, label: str, env: Mapping[str, str]) -> TrackerSettings:
    """Each setting from the first of: ``train.tracking``, the tracker's standard environment
    variable, the default (under the run directory). So a team's ``MLFLOW_TRACKING_URI`` or
    ``WANDB_DIR`` is heard unless the config names another, and nothing leaves the run directory
    unless one of them says so. ``WANDB_MODE``, ``WANDB_ENTITY``, ``WANDB_API_KEY``, MLflow's
    credentials and the like are read by the trackers themselves (nothing here overrides them).
    Run names are the student's label (or ``tracking.run_name``): ``WANDB_NAME`` would give
    every student of a sweep the same name, so it is not used; nor are ``WANDB_RUN_ID`` /
    ``MLFLOW_RUN_ID``, since a resumed run continues the run kept in ``trackers.json``."""
    def var(name: str) -> str | None:
        value = (env.get(name) or "").strip()
        return value or None

    env_tags = tuple(t.strip() for t in (var("WANDB_TAGS") or "").split(",") if t.strip())
    experiment_id = None if opts.project or var("MLFLOW_EXPERIMENT_NAME") else var("MLFLOW_EXPERIMENT_ID")
    wandb_dir = var("WANDB_DIR")
    return TrackerSettings(
        run_name=opts.run_name or label, tags=tuple(opts.tags),
        wandb_project=opts.project or var("WANDB_PROJECT") or DEFAULT_PROJECT,
        wandb_tags=tuple(opts.tags) or env_tags,
        wandb_dir=Path(os.path.expanduser(wandb_dir)) if wandb_dir else Path(run),
        mlflow_uri=opts.mlflow_tracking_uri or var("MLFLOW_TRACKING_URI") or (Path(run) / "mlruns").resolve().as_uri(),
        mlflow_experiment=opts.project or var("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT,
        mlflow_experiment_id=experiment_id)


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    p = Path(run) / FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import blocked on purpose
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(report_to: list[str]) -> None:
    """Every tracker of ``train.report_to`` can be imported (checked without importing it)."""
    missing = [f"{name} needs the '{PACKAGES[name][0]}' package: pip install '{PACKAGES[name][1]}'"
               for name in report_to if not _importable(PACKAGES[name][0])]
    if missing:
        raise UserError("train.report_to: " + "; ".join(missing) + " (or drop it from train.report_to)")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """What trackers plot: every finite number of the record but the step, as ``train/<key>``."""
    return {f"train/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, {"c": 2}]}}`` -> ``{"a.b.0": 1, "a.b.1.c": 2}``."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and tree:
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class TensorBoardTracker:
    def __init__(self, run: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """``wandb.init`` into ``<settings.wandb_dir>/wandb``, resuming the run id kept in trackers.json."""

    def __init__(self, s: TrackerSettings, config: dict[str, Any], known: dict[str, Any]):
        os.environ.setdefault("WANDB_SILENT", "true")  # no banners, no sync hints
        import wandb

        self.continued = known.get("project") == s.wandb_project and bool(known.get("id"))
        self.id = known["id"] if self.continued else uuid.uuid4().hex[:8]
        self.project = s.wandb_project
        s.wandb_dir.mkdir(parents=True, exist_ok=True)  # else W&B falls back to a temp dir
        self.run = wandb.init(project=s.wandb_project, name=s.run_name, tags=list(s.wandb_tags) or None, config=config,
                              dir=str(s.wandb_dir), id=self.id, resume="allow",
                              settings=wandb.Settings(console="off", quiet=True))

    def state(self) -> dict[str, Any]:
        return {"id": self.id, "project": self.project}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """One MLflow run in the experiment and store of :func:`tracker_settings`."""

    def __init__(self, s: TrackerSettings, config: dict[str, Any], known: dict[str, Any]):
        self.uri = s.mlflow_uri
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store otherwise
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.Metric, self.client = Metric, MlflowClient(self.uri)
        self.continued = known.get("uri") == self.uri and bool(known.get("run_id"))
        if self.continued:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        if s.mlflow_experiment_id is not None:
            exp_id = self.client.get_experiment(s.mlflow_experiment_id).experiment_id  # MLFLOW_EXPERIMENT_ID
        else:
            exp = self.client.get_experiment_by_name(s.mlflow_experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(s.mlflow_experiment)
        self.run_id = self.client.create_run(exp_id, run_name=s.run_name, tags={t: "true" for t in s.tags}).info.run_id
        params = [Param(k[:MAX_ENTITY_KEY_LENGTH], json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in flatten(config).items()]
        params = [Param(p.key, p.value[:MAX_PARAM_VAL_LENGTH]) for p in params]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri}

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class MetricsLog:
    """Written by rank 0 only (other ranks get a disabled instance). A context manager: the
    trackers are closed on the way out, their runs marked failed when training raised."""

    def __init__(self, run: Path, resume_step: int, enabled: bool, report_to: tuple[str, ...] | list[str] = (),
                 tracking: TrackingConfig | None = None, name: str = "student", config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(run) / FILE
        self.trackers: dict[str, Any] = {}
        self.after: dict[str, int] = {}  # per tracker: steps up to here it already holds
        if not enabled:
            return
        run = Path(run)
        before = read_metrics(run)
        keep = [r for r in before if r.get("step", 0) <= resume_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        self.f = open(self.path, "a", encoding="utf-8")
        settings = tracker_settings(tracking or TrackingConfig(), run, name, os.environ)
        ids_path = run / TRACKERS_FILE
        known = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        sent = max((r.get("step", 0) for r in before), default=0)
        for tracker in report_to:
            try:
                if tracker == "tensorboard":
                    self.trackers[tracker], self.after[tracker] = TensorBoardTracker(run, resume_step), resume_step
                    continue
                cls = WandbTracker if tracker == "wandb" else MlflowTracker
                t = cls(settings, config or {}, known.get(tracker, {}))
            except Exception as err:
                self.close(failed=True)
                raise UserError(f"train.report_to: {tracker} could not start ({type(err).__name__}: {err})") from None
            self.trackers[tracker], self.after[tracker] = t, sent if t.continued else 0
            known[tracker] = t.state()
        if set(self.trackers) - {"tensorboard"}:
            atomic_write_json(ids_path, known)
        for r in keep:  # a tracker run started now gets the steps trained before it
            self._send(r)

    def _send(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        for name, t in list(self.trackers.items()):
            if record["step"] <= self.after[name]:
                continue
            try:
                t.log(values, record["step"])
            except Exception as err:  # noqa: BLE001 - a tracker's outage must not stop the training
                print(f"train: {name} stopped receiving metrics at step {record['step']} ({type(err).__name__}: "
                      f"{err}); {FILE} has every step", file=sys.stderr, flush=True)
                del self.trackers[name]
                with contextlib.suppress(Exception):
                    t.close(failed=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self._send(record)

    def close(self, failed: bool = False) -> None:
        if not self.enabled:
            return
        if not self.f.closed:
            self.f.close()
        for t in self.trackers.values():
            try:
                t.close(failed)
            except Exception as err:  # noqa: BLE001 - one tracker's failure must not hide the others' or the run's
                print(f"train: closing {type(t).__name__} failed: {err}", file=sys.stderr, flush=True)
        self.trackers = {}

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)
