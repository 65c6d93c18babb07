"""`posdistill run`: pack -> (teacher bootstrap) -> cache -> train every student -> eval -> analyze -> report.

Each stage's output is named by a fingerprint of what determines it, so a re-run skips every
stage whose output is already valid and says so; only what changed is recomputed. The stages
themselves are the same functions the individual commands call.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.atomic import atomic_write_json
from pipeline.config import Config, StudentVariant, parse_config
from pipeline.errors import UserError
from pipeline.fingerprint import dir_identity, fingerprint
from pipeline.resources import PeakMemory


@dataclass
class Student:
    """One trained student: a variant of the comparison at one seed."""

    variant: str
    seed: int
    cfg: Config
    init_from: str | None  # variant name

    @property
    def label(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass
class RunLog:
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, list[str]] = field(default_factory=dict)
    computed: dict[str, list[str]] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t0, 1)

    def note(self, stage: str, what: str, reused: bool) -> None:
        (self.reused if reused else self.computed).setdefault(stage, []).append(what)
        print(f"{stage}: {'reused' if reused else 'computed'} {what}", flush=True)


# ----------------------------------------------------------------------------- students


def _variant_config(cfg: Config, variant: StudentVariant, seed: int, init_dir: Path | None) -> Config:
    raw = cfg.resolved()
    raw["students"] = []
    raw["train"]["phases"] = [p.model_dump(mode="json") for p in variant.phases]
    raw["train"]["seed"] = seed
    for key in ("batch_size", "micro_batch"):
        if getattr(variant, key) is not None:
            raw["train"][key] = getattr(variant, key)
    if init_dir is not None:
        raw["student"] = {**raw["student"], "init": str(init_dir), "config": None}
    raw["student"]["name"] = None
    # The run directory is named by what the student's numbers depend on, so a changed phase,
    # seed or starting point trains a new student instead of resuming a different one.
    fp = fingerprint({k: raw[k] for k in ("data", "pack", "teacher", "cache", "student", "train")}, length=8)
    raw["student"]["name"] = f"{variant.name}-s{seed}-{fp}"
    return parse_config(raw, f"students.{variant.name}")


def expand_students(cfg: Config) -> list[Student]:
    """Every (variant, seed) in dependency order; without `students`, the one student of `train`."""
    from stages.train.plan import model_dir

    if not cfg.students:
        if cfg.student is None or not cfg.train.phases:
            return []
        return [Student("student", cfg.train_seed, cfg, None)]
    out: list[Student] = []
    by_variant: dict[str, list[Student]] = {}
    for v in cfg.students:
        for seed in v.seeds or [cfg.train_seed]:
            init_dir = None
            if v.init_from:
                parents = by_variant[v.init_from]
                parent = next((p for p in parents if p.seed == seed), parents[0])
                init_dir = model_dir(parent.cfg)
            s = Student(v.name, seed, _variant_config(cfg, v, seed, init_dir), v.init_from)
            by_variant.setdefault(v.name, []).append(s)
            out.append(s)
    return out


def student_done(cfg: Config) -> bool:
    from stages.train.plan import model_dir, run_dir

    saved = run_dir(cfg) / "config.json"
    return (model_dir(cfg) / "config.json").is_file() and saved.is_file() and saved.read_text() == cfg.to_json()


def _kd_phases(cfg: Config) -> list[int]:
    from stages.train.plan import resolve_phases

    return [p.index for p in resolve_phases(cfg) if p.source == "cache"]


# ----------------------------------------------------------------------------- the run


def _teacher(cfg: Config, log: RunLog) -> Config:
    model = cfg.teacher.model
    if model and (Path(model) / "config.json").is_file():
        log.note("teacher", model, reused=True)
        return cfg
    if cfg.teacher.bootstrap is None:
        raise UserError(f"teacher.model: '{model}' is not a model directory and teacher.bootstrap is not set")
    from stages.bootstrap import run_bootstrap

    path = run_bootstrap(cfg)
    log.note("teacher", f"bootstrapped {path}", reused=False)
    raw = cfg.resolved()
    raw["teacher"]["model"] = str(path)
    return parse_config(raw)


def _fingerprinted_out(root: Path, parts: dict[str, Any]) -> tuple[Path, bool]:
    out = root / fingerprint(parts, length=12)
    return out, out.is_dir()


def run_pipeline(cfg: Config, address: str | None = None) -> Path:
    from stages.pack import is_complete, pack_dir, pack_spec, run_pack

    log = RunLog()
    t0 = time.monotonic()
    with PeakMemory() as mem:
        with log.stage("pack"):
            spec = pack_spec(cfg)
            reused = is_complete(pack_dir(cfg, spec))
            log.note("pack", str(run_pack(cfg, spec, verbose=False)), reused=reused)
        with log.stage("teacher"):
            cfg = _teacher(cfg, log)
        students = expand_students(cfg)
        with log.stage("cache"):
            _caches(cfg, students, address, log)
        with log.stage("train"):
            for s in students:
                if student_done(s.cfg):
                    log.note("train", s.label, reused=True)
                    continue
                from stages.train.launch import run_training

                run_training(s.cfg, resume=_has_checkpoint(s.cfg))
                log.note("train", s.label, reused=False)
        models = _models(cfg, students)
        with log.stage("eval"):
            eval_dir = _eval(cfg, models, log)
        with log.stage("analyze"):
            analyses = _analyze(cfg, students, models, log)
    wall = time.monotonic() - t0
    from pipeline.report import write_report

    summary = {"wall_s": round(wall, 1), "peak_memory_gib": round(mem.peak_gib, 2), "timings": log.timings,
               "reused": log.reused, "computed": log.computed}
    summary["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(cfg.out_dir / "runs.jsonl", "a") as f:  # every invocation, so a re-run keeps the cold run's budget
        f.write(json.dumps(summary) + "\n")
    atomic_write_json(cfg.out_dir / "run.json", summary)
    report = write_report(cfg, students, models, eval_dir, analyses, summary)
    print(f"run: wall {wall:.0f} s, peak memory {mem.peak_gib:.2f} GiB (driver + Ray workers + ranks)")
    print(f"run: reused {sum(len(v) for v in log.reused.values())} outputs, "
          f"computed {sum(len(v) for v in log.computed.values())}; report {report}")
    return report


def _has_checkpoint(cfg: Config) -> bool:
    from stages.train.checkpoint import complete_tags
    from stages.train.plan import run_dir

    return bool(complete_tags(run_dir(cfg) / "checkpoints"))


def _caches(cfg: Config, students: list[Student], address: str | None, log: RunLog) -> None:
    from stages.cache.stage import cache_dir_for, run_cache
    from stages.cache.verify import verify_cache

    seen: set[Path] = set()
    for s in students:
        for i in _kd_phases(s.cfg):
            d = cache_dir_for(s.cfg, i)
            if d in seen:
                continue
            seen.add(d)
            if (d / "manifest.json").is_file() and not verify_cache(d):
                log.note("cache", str(d), reused=True)
                continue
            run_cache(s.cfg, i, address=address)
            log.note("cache", str(d), reused=False)


def _models(cfg: Config, students: list[Student]) -> dict[str, str]:
    from stages.train.plan import model_dir

    models = {"teacher": str(cfg.teacher.model)}
    for s in students:
        models[s.label] = str(model_dir(s.cfg))
    return models


def _model_identity(models: dict[str, str]) -> dict[str, Any]:
    return {name: dir_identity(path) for name, path in models.items()}


def _eval(cfg: Config, models: dict[str, str], log: RunLog) -> Path:
    from stages.evaluate.models import load_model
    from stages.evaluate.run import run_eval

    out, done = _fingerprinted_out(cfg.out_dir / "eval", {"eval": cfg.eval.model_dump(mode="json"),
                                                          "data": cfg.data.model_dump(mode="json"),
                                                          "pack": cfg.pack.model_dump(mode="json"),
                                                          "seed": cfg.run.seed, "models": _model_identity(models)})
    if done:
        log.note("eval", str(out), reused=True)
        return out
    ev = cfg.eval
    loaded = [load_model(path, ev.dtype, ev.device, cfg.data.tokenizer, name=name) for name, path in models.items()]
    run_eval(cfg, loaded, out=out, verbose=False)
    log.note("eval", str(out), reused=False)
    return out


def _analyze(cfg: Config, students: list[Student], models: dict[str, str], log: RunLog) -> dict[str, Any]:
    """The perturbation probe on the teacher and one seed of each variant; query spans from
    each extended student's starting point to its result."""
    from stages.analyze.perturb import run_perturb
    from stages.analyze.query_spans import run_query_spans
    from stages.train.plan import model_dir

    root = cfg.out_dir / "analyze"
    first_seed: dict[str, Student] = {}
    for s in students:
        first_seed.setdefault(s.variant, s)
    perturb = {}
    for name in ["teacher", *[s.label for s in first_seed.values()]]:
        out, done = _fingerprinted_out(root / f"perturb-{name}", {"analyze": cfg.analyze.model_dump(mode="json"),
                                                                  "pack": cfg.pack.model_dump(mode="json"),
                                                                  "model": dir_identity(models[name])})
        if not done:
            run_perturb(cfg, models[name], out=out, verbose=False)
        log.note("analyze", f"perturb {name}", reused=done)
        perturb[name] = out
    spans = {}
    for s in first_seed.values():
        if s.init_from is None:
            continue
        before = str(s.cfg.student.init)
        windows = sorted({p.window_len for p in s.cfg.train.phases} | {cfg.pack.window_len})
        out, done = _fingerprinted_out(root / f"query-spans-{s.label}", {
            "before": dir_identity(before), "after": dir_identity(model_dir(s.cfg)), "windows": windows,
            "analyze": cfg.analyze.model_dump(mode="json")})
        if not done:
            run_query_spans(before, str(model_dir(s.cfg)), windows=windows, cfg=cfg, out=out, verbose=False)
        log.note("analyze", f"query spans {s.label}", reused=done)
        spans[s.label] = out
    return {"perturb": perturb, "query_spans": spans}


def load_summary(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "run.json").read_text())
