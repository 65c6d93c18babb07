"""The one resolver: the validated YAML tree -> frozen specs, one per graph node.

Every inherited default is filled in here and nowhere else: a phase's ``data`` and
``doc_len`` (else the top level's; with ``data: inherit`` its parent's, ``variant_phases``),
its ``kd`` overrides over ``train.kd``, its ``lr`` and ``min_lr_ratio``, a variant's
``batch_size`` / ``micro_batch`` / ``seeds``, ``init_from`` (the parent's exported model
becomes ``student.init``), ``eval.data``, ``eval.heldout_seed`` and the students of a config
without ``students:`` (one student trained on ``train.phases``). Where outputs live (the run
directory layout) is decided here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config, PhaseConfig, StudentVariant
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from stages.specs import AnalyzeSpec, BootstrapSpec, CacheSpec, EvalSpec, PackSpec, PhaseSpec, TrainSpec


# train keys that say where a run is reported, not what is trained: changing them keeps the
# run directory, its checkpoints and its completion marker.
NOT_IDENTITY = ("report_to", "tracking")


@dataclass(frozen=True)
class Layout:
    """Where every node's output lives."""

    out_dir: Path
    cache_root: Path

    def pack_dir(self, spec: PackSpec) -> Path:
        return self.out_dir / "pack" / spec.fingerprint()

    def cache_dir(self, spec: CacheSpec) -> Path:
        return self.cache_root / spec.fingerprint()

    def run_dir(self, spec: TrainSpec) -> Path:
        return self.out_dir / "train" / spec_dir_name(spec)

    def model_dir(self, spec: TrainSpec) -> Path:
        return self.run_dir(spec) / "model"


def spec_dir_name(spec: TrainSpec) -> str:
    """A variant's run directory is named by what its numbers depend on, so a changed phase,
    seed or starting point trains a new student instead of resuming a different one; the
    one student of a config without ``students:`` keeps its plain name."""
    return spec.dir_name if spec.variant != spec.label else spec.label


def layout(cfg: Config) -> Layout:
    return Layout(out_dir=cfg.out_dir, cache_root=cfg.cache_root)


def pack_spec(cfg: Config) -> PackSpec:
    """The top-level pack (``pack`` and ``data``)."""
    return PackSpec(data=cfg.data, pack=cfg.pack, seed=cfg.run.seed)


def phase_windows(phase: PhaseConfig, batch_size: int) -> int:
    """The windows a phase consumes: ``windows``, else steps x batch_size / ``epochs``."""
    if phase.windows is not None:
        return phase.windows
    return math.ceil(phase.steps * batch_size / (phase.epochs or 1))


def _unbudgeted(cfg: Config, phase: PhaseConfig) -> PackSpec:
    pack = cfg.pack.model_copy(update={"window_len": phase.window_len, "doc_len": phase.doc_len or cfg.pack.doc_len,
                                       "max_windows": None})
    return PackSpec(data=phase.data or cfg.data, pack=pack, seed=cfg.run.seed)


def variant_phases(cfg: Config, variant: StudentVariant) -> list[PhaseConfig]:
    """The variant's phases with ``data: inherit`` filled in: the ``init_from`` parent's own
    documents - the data and doc_len of its last phase, itself resolved - so that an extension
    reads the base's distribution (the same document lengths and mix, every fact and its
    question inside one document) and changes only the window."""
    out = []
    for j, ph in enumerate(variant.phases):
        if ph.data == "inherit":
            parent = next(v for v in cfg.students if v.name == variant.init_from)
            src = variant_phases(cfg, parent)[-1]
            doc_len = src.doc_len or cfg.pack.doc_len
            if doc_len[1] > ph.window_len:
                raise UserError(f"students.{variant.name}.phases[{j}].data: 'inherit' reads {parent.name}'s "
                                f"documents of up to {doc_len[1]} tokens, longer than window_len {ph.window_len}")
            ph = ph.model_copy(update={"data": src.data or cfg.data, "doc_len": doc_len})
        out.append(ph)
    return out


def _budget_key(spec: PackSpec) -> str:
    """Which phases share a pack, from the config alone (no data file is read or hashed)."""
    return fingerprint(spec.describe())


def _budgets(cfg: Config) -> dict[str, int]:
    """Per distinct phase pack, the most windows any phase reading it consumes: phases that
    differ only in steps share one pack and one cache, sized to the longest."""
    out: dict[str, int] = {}
    for v in cfg.students or [None]:
        phases = variant_phases(cfg, v) if v is not None else cfg.train.phases
        batch = (v.batch_size if v is not None and v.batch_size else None) or cfg.train.batch_size
        for ph in phases:
            key = _budget_key(_unbudgeted(cfg, ph))
            out[key] = max(out.get(key, 0), phase_windows(ph, batch))
    return out


def phase_pack_spec(cfg: Config, phase: PhaseConfig) -> PackSpec:
    """A phase's windows: its window, its ``doc_len`` (else ``pack.doc_len``), its ``data``,
    and no more of them than the phases reading this pack consume (``_budgets``)."""
    spec = _unbudgeted(cfg, phase)
    budget = _budgets(cfg).get(_budget_key(spec))
    return replace(spec, pack=spec.pack.model_copy(update={"max_windows": budget}))


def cache_spec(cfg: Config, pack: PackSpec) -> CacheSpec:
    return CacheSpec(teacher=cfg.teacher, cache=cfg.cache, pack=pack, seed=cfg.run.seed)


def phase_specs(cfg: Config, phases: list[PhaseConfig], where: str = "train.phases") -> tuple[PhaseSpec, ...]:
    if not phases:
        raise UserError(f"{where}: no phases given (a list of {{window_len, steps, rope, ...}}) and no students:")
    out, start = [], 0
    for i, ph in enumerate(phases):
        override = ph.kd.model_dump(exclude_none=True) if ph.kd else {}
        kd = cfg.train.kd.model_copy(update=override)
        pack = phase_pack_spec(cfg, ph)
        out.append(PhaseSpec(
            index=i, name=ph.name or f"phase{i}", window_len=ph.window_len, steps=ph.steps, start=start,
            lr=ph.lr or cfg.train.lr,
            min_lr_ratio=cfg.train.min_lr_ratio if ph.min_lr_ratio is None else ph.min_lr_ratio,
            kd=kd, rope=ph.rope, data=pack.data, pack=pack,
            cache=cache_spec(cfg, pack) if kd.alpha > 0 else None))
        start += ph.steps
    return tuple(out)


def _train_spec(cfg: Config, variant: StudentVariant | None, seed: int, parent: TrainSpec | None,
                lay: Layout) -> TrainSpec:
    raw = cfg.resolved()
    raw["students"] = []
    phases = variant_phases(cfg, variant) if variant is not None else cfg.train.phases
    if variant is not None:
        raw["train"]["phases"] = [p.model_dump(mode="json") for p in phases]
        for key in ("batch_size", "micro_batch"):
            if getattr(variant, key) is not None:
                raw["train"][key] = getattr(variant, key)
    raw["train"]["seed"] = seed
    if parent is not None:
        raw["student"] = {**raw["student"], "init": str(lay.model_dir(parent)), "config": None}
    label = f"{variant.name}-s{seed}" if variant is not None else (cfg.student.name or "student")
    raw["student"]["name"] = None
    identity = {k: raw[k] for k in ("data", "pack", "teacher", "cache", "student", "train")}
    identity["train"] = {k: v for k, v in raw["train"].items() if k not in NOT_IDENTITY}
    # The windows its phases read, which other students' steps may enlarge (a shared pack).
    identity["phase_windows"] = [phase_pack_spec(cfg, ph).pack.max_windows for ph in phases]
    resolved = Config.model_validate(raw)  # the variant's sections, validated (cross-field checks too)
    where = f"students.{variant.name}.phases" if variant is not None else "train.phases"
    return TrainSpec(
        label=label, variant=variant.name if variant is not None else label, seed=seed,
        student=resolved.student, train=resolved.train, phases=phase_specs(cfg, resolved.train.phases, where),
        tokenizer=cfg.data.tokenizer, mode=cfg.pack.mode, teacher_model=cfg.teacher.model,
        init_from=parent.label if parent is not None else None, identity_parts=identity)


def train_specs(cfg: Config) -> list[TrainSpec]:
    """Every (variant, seed) in dependency order; without ``students:``, the one student of ``train``."""
    lay = layout(cfg)
    if cfg.student is None:
        return []
    if not cfg.students:
        if not cfg.train.phases:
            return []
        return [_train_spec(cfg, None, cfg.train_seed, None, lay)]
    out: list[TrainSpec] = []
    by_variant: dict[str, list[TrainSpec]] = {}
    for v in cfg.students:
        for k, seed in enumerate(v.seeds or [cfg.train_seed]):
            parent = None
            if v.init_from:
                # The parent of the same seed, else round-robin over the parents' seeds: with
                # two bases, extension seeds split evenly between them.
                parents = by_variant[v.init_from]
                parent = next((p for p in parents if p.seed == seed), parents[k % len(parents)])
            s = _train_spec(cfg, v, seed, parent, lay)
            by_variant.setdefault(v.name, []).append(s)
            out.append(s)
    return out


def eval_spec(cfg: Config) -> EvalSpec:
    data = cfg.eval.data or cfg.data
    seed = cfg.eval.heldout_seed if cfg.eval.heldout_seed is not None else cfg.run.seed + 1
    return EvalSpec(eval=cfg.eval, data=data, pack=cfg.pack, heldout_seed=seed, tokenizer=data.tokenizer)


def analyze_spec(cfg: Config) -> AnalyzeSpec:
    return AnalyzeSpec(analyze=cfg.analyze, eval=eval_spec(cfg), window_len=cfg.pack.window_len)


def query_span_windows(cfg: Config, spec: TrainSpec) -> list[int]:
    """Phase windows marked on a query-spans plot: analyze.query_spans.windows, else the
    student's phases and the top-level pack."""
    if cfg.analyze.query_spans.windows:
        return sorted(set(cfg.analyze.query_spans.windows))
    return sorted({p.window_len for p in spec.phases} | {cfg.pack.window_len})


def bootstrap_spec(cfg: Config) -> BootstrapSpec:
    if cfg.teacher.bootstrap is None:
        raise UserError("teacher.bootstrap: missing (the bootstrap command needs its phases)")
    return BootstrapSpec(boot=cfg.teacher.bootstrap, synthetic=cfg.data.synthetic, doc_len=cfg.pack.doc_len,
                         tokenizer=cfg.data.tokenizer)


def bootstrap_dir(cfg: Config) -> Path:
    """Where a bootstrapped teacher goes: teacher.model, else <run.out_dir>/teacher."""
    return Path(cfg.teacher.model) if cfg.teacher.model else cfg.out_dir / "teacher"


def with_teacher(cfg: Config, model: str) -> Config:
    """The config with ``teacher.model`` set (after a bootstrap made it)."""
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"model": model})})


def identity_of(parts: dict[str, Any]) -> str:
    return fingerprint(parts, length=12)
