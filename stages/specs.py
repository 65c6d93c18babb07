"""What each stage is given: frozen, fully resolved specs (the stage contracts' inputs).

``pipeline.resolve`` turns the validated YAML tree into these, filling every inherited
default exactly once; a stage function takes its spec, its input paths and its output
directory, and never sees the whole config. Each spec's ``identity()`` is what its output
directory's fingerprint hashes: two specs with the same identity produce the same numbers.
Specs carry section models of the config (``TeacherConfig``, ``TrainConfig``...), which are
plain validated values, never the tree they came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import (AnalyzeConfig, BootstrapConfig, CacheConfig, DataConfig, EvalConfig, KDConfig,
                             PackConfig, RopeConfig, StudentConfig, SyntheticConfig, TeacherConfig, TrainConfig)
from pipeline.fingerprint import FORMAT_VERSION, file_identity, fingerprint


@dataclass(frozen=True)
class PackSpec:
    """Everything that determines a set of packed windows."""

    data: DataConfig
    pack: PackConfig
    seed: int

    def identity(self) -> dict[str, Any]:
        from stages.corpus import source_identity
        from stages.tokenizer import tokenizer_identity

        return {
            "data": source_identity(self.data),
            "tokenizer": tokenizer_identity(self.data.tokenizer),
            "pack": self.pack.model_dump(mode="json"),
            "seed": self.seed,
            "format": FORMAT_VERSION["pack"],
        }

    def fingerprint(self) -> str:
        return fingerprint(self.identity())

    def describe(self) -> dict[str, Any]:
        return {"data": self.data.model_dump(mode="json"), "pack": self.pack.model_dump(mode="json"),
                "seed": self.seed}


@dataclass(frozen=True)
class CacheSpec:
    """The teacher's sparse targets over one pack."""

    teacher: TeacherConfig
    cache: CacheConfig
    pack: PackSpec
    seed: int  # the sampled kind's draws

    def identity(self) -> dict[str, Any]:
        from stages.teacher import teacher_identity
        from stages.tokenizer import tokenizer_identity

        c = self.cache
        return {
            "teacher": teacher_identity(self.teacher),
            "tokenizer": tokenizer_identity(self.pack.data.tokenizer),
            "pack": self.pack.fingerprint(),
            "window_len": self.pack.pack.window_len,
            "attention": self.pack.pack.mode,
            "kind": c.kind,
            "k": c.k if c.kind == "topk" else None,
            "samples": c.samples if c.kind == "sampled" else None,
            "sample_seed": self.seed if c.kind == "sampled" else None,
            "temperature": c.temperature,
            "codec": c.codec,
            "format": FORMAT_VERSION["cache"],
        }

    def fingerprint(self) -> str:
        return fingerprint(self.identity())


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase with every default inherited from ``train`` filled in."""

    index: int
    name: str
    window_len: int
    steps: int
    start: int  # global optimizer steps done before this phase
    lr: float
    min_lr_ratio: float
    kd: KDConfig  # train.kd with the phase's overrides applied
    rope: RopeConfig
    data: DataConfig
    pack: PackSpec  # the windows this phase reads (directly, or through its cache)
    cache: CacheSpec | None  # None: next-token CE on the packed windows (kd.alpha 0)

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def source(self) -> Literal["cache", "pack"]:
        return "cache" if self.cache is not None else "pack"


@dataclass(frozen=True)
class TrainSpec:
    """One student at one seed: its architecture or starting point, its phases, its optimiser."""

    label: str  # "<variant>-s<seed>": how reports and logs name it
    variant: str
    seed: int
    student: StudentConfig  # ``init`` already points at the parent's exported model, if any
    train: TrainConfig  # batch sizes and phases of the variant applied
    phases: tuple[PhaseSpec, ...]
    tokenizer: str
    mode: Literal["cross_doc", "doc_masked"]
    teacher_model: str | None  # whose vocabulary the student must share
    init_from: str | None = None  # the parent student's label
    identity_parts: dict[str, Any] = field(default_factory=dict, compare=False)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the spec that resumes it."""
        return self.identity_parts

    def fingerprint(self) -> str:
        return fingerprint(self.identity(), length=8)

    def with_inputs(self, inputs: list[str]) -> "TrainSpec":
        """This spec with the identities of the outputs it reads (packs, caches, its parent):
        recorded in every checkpoint, so a checkpoint of other inputs is never continued."""
        from dataclasses import replace

        return replace(self, identity_parts={**self.identity_parts, "inputs": sorted(inputs)})

    @property
    def dir_name(self) -> str:
        return f"{self.label}-{self.fingerprint()}"

    def to_json(self) -> str:
        return json.dumps(spec_to_dict(self), indent=2)


EVAL_FORMAT = 4  # 2: eval.json with per-probe scores; 3: colour-blind-safe figures; 4: distance = q - p


@dataclass(frozen=True)
class EvalSpec:
    eval: EvalConfig
    data: DataConfig  # haystacks and held-out windows (eval.data, else data)
    pack: PackConfig  # how held-out windows are packed (window_len replaced per length)
    heldout_seed: int  # never the training seed
    tokenizer: str  # default tokenizer of models without their own

    def identity(self) -> dict[str, Any]:
        return {"eval": self.eval.model_dump(mode="json"), "data": self.data.model_dump(mode="json"),
                "pack": self.pack.model_dump(mode="json"), "seed": self.heldout_seed,
                "format": EVAL_FORMAT}

    def heldout_pack(self, window_len: int) -> PackSpec:
        """The held-out windows for loss by position at ``window_len``."""
        pack = self.pack.model_copy(update={"window_len": window_len})
        if pack.doc_len[1] > window_len:
            pack = pack.model_copy(update={"doc_len": (min(pack.doc_len[0], window_len), window_len)})
        return PackSpec(data=self.data, pack=pack, seed=self.heldout_seed)


@dataclass(frozen=True)
class AnalyzeSpec:
    analyze: AnalyzeConfig
    eval: EvalSpec  # probes read haystack tokens and the eval device/dtype
    window_len: int  # default perturbation window (pack.window_len)

    def identity(self) -> dict[str, Any]:
        return {"analyze": self.analyze.model_dump(mode="json"), "eval": self.eval.identity(),
                "window_len": self.window_len}


def spec_to_dict(spec: Any) -> Any:
    """JSON-able form of a spec (pydantic sections dumped, dataclasses as dicts)."""
    from dataclasses import fields, is_dataclass

    from pydantic import BaseModel

    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json")
    if is_dataclass(spec):
        return {f.name: spec_to_dict(getattr(spec, f.name)) for f in fields(spec)}
    if isinstance(spec, (list, tuple)):
        return [spec_to_dict(v) for v in spec]
    if isinstance(spec, dict):
        return {k: spec_to_dict(v) for k, v in spec.items()}
    if isinstance(spec, Path):
        return str(spec)
    return spec


def train_spec_from_dict(raw: dict[str, Any]) -> TrainSpec:
    """The inverse of ``spec_to_dict`` for a TrainSpec (how ranks receive their spec)."""

    def pack(d: dict[str, Any]) -> PackSpec:
        return PackSpec(data=DataConfig.model_validate(d["data"]), pack=PackConfig.model_validate(d["pack"]),
                        seed=d["seed"])

    def phase(d: dict[str, Any]) -> PhaseSpec:
        cache = d["cache"]
        return PhaseSpec(
            index=d["index"], name=d["name"], window_len=d["window_len"], steps=d["steps"], start=d["start"],
            lr=d["lr"], min_lr_ratio=d["min_lr_ratio"], kd=KDConfig.model_validate(d["kd"]),
            rope=RopeConfig.model_validate(d["rope"]), data=DataConfig.model_validate(d["data"]),
            pack=pack(d["pack"]),
            cache=None if cache is None else CacheSpec(
                teacher=TeacherConfig.model_validate(cache["teacher"]), cache=CacheConfig.model_validate(cache["cache"]),
                pack=pack(cache["pack"]), seed=cache["seed"]))

    return TrainSpec(
        label=raw["label"], variant=raw["variant"], seed=raw["seed"],
        student=StudentConfig.model_validate(raw["student"]), train=TrainConfig.model_validate(raw["train"]),
        phases=tuple(phase(p) for p in raw["phases"]), tokenizer=raw["tokenizer"], mode=raw["mode"],
        teacher_model=raw["teacher_model"], init_from=raw.get("init_from"),
        identity_parts=raw.get("identity_parts") or {})


@dataclass(frozen=True)
class BootstrapSpec:
    """A tiny long-context teacher trained here (the demo has no model to download)."""

    boot: BootstrapConfig
    synthetic: SyntheticConfig
    doc_len: tuple[int, int]
    tokenizer: str

    def identity(self) -> dict[str, Any]:
        return {
            "bootstrap": self.boot.model_dump(mode="json"),
            "synthetic": self.synthetic.model_dump(mode="json"),
            "doc_len": list(self.doc_len),
            "format": FORMAT_VERSION["bootstrap"],
            # The weights it continues from, by content (a retrained earlier teacher is another one).
            **({"init": file_identity(Path(self.boot.init) / "model.safetensors")} if self.boot.init else {}),
        }
