"""One YAML file per run, validated into one typed tree before any work starts.

Every model forbids unknown keys, so a misspelt key fails loudly instead of silently
falling back to a default. Errors name the dotted key path (``pack.window_len: ...``).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- run / data / pack


class RunConfig(Strict):
    name: str = "posdistill"
    out_dir: str = "runs/posdistill"
    seed: int = 0


class SyntheticConfig(Strict):
    """Deterministic documents whose continuation needs retrieval inside the document."""

    num_docs: int = Field(2000, gt=0)
    alphabet: str = Field("abcdefghijklmnopqrstuvwxyz", min_length=2)
    # Share of documents of each kind; the rest are key->value fact documents.
    copy_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # Length of the repeated segment in copy documents, as a fraction range of the doc length.
    segment_len: tuple[int, int] = (4, 64)

    @field_validator("segment_len")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[0] > v[1]:
            raise ValueError("must be [min, max] with 1 <= min <= max")
        return v


class DataConfig(Strict):
    # "synthetic", a path or glob of .jsonl/.parquet/.txt files, or a datasets.save_to_disk dir.
    source: str = "synthetic"
    text_field: str = "text"
    # "byte" (built in, no downloads) or a local Hugging Face tokenizer directory.
    tokenizer: str = "byte"
    synthetic: SyntheticConfig = SyntheticConfig()


class PackConfig(Strict):
    window_len: int = Field(2048, gt=0)
    mode: Literal["cross_doc", "doc_masked"] = "cross_doc"
    doc_len: tuple[int, int] = (64, 256)
    # Chunks held for the seeded shuffle; bounds memory independently of corpus size.
    shuffle_buffer: int = Field(4096, gt=0)

    @field_validator("doc_len")
    @classmethod
    def _doc_len(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[0] > v[1]:
            raise ValueError("must be [min, max] with 1 <= min <= max")
        return v

    @model_validator(mode="after")
    def _fits(self) -> "PackConfig":
        if self.window_len < self.doc_len[1]:
            raise ValueError(
                f"window_len {self.window_len} is smaller than doc_len max {self.doc_len[1]}"
            )
        return self


# ----------------------------------------------------------------------------- teacher / cache


class BootstrapConfig(Strict):
    """Train a tiny long-context teacher locally (no model can be downloaded in the demo)."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    # (window_len, rope_theta, steps) per phase, trained phase-wise like the students.
    phases: list[dict[str, Any]] = Field(default_factory=list)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)


class TeacherConfig(Strict):
    model: str | None = None  # local Hugging Face directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gpus_per_actor: float = Field(1.0, ge=0)  # used only when the cluster has GPUs
    num_actors: int | None = Field(None, gt=0)  # default: as many as the cluster fits
    trust_remote_code: bool = False
    # Positions per top-k chunk: the [chunk, vocab] logits are the largest tensor built.
    chunk_len: int = Field(1024, gt=0)
    bootstrap: BootstrapConfig | None = None


class CacheConfig(Strict):
    root: str | None = None  # default: <run.out_dir>/cache
    kind: Literal["topk", "sampled"] = "topk"
    k: int = Field(32, gt=0)
    samples: int = Field(16, gt=0)  # draws per position when kind == sampled
    temperature: float = Field(1.0, gt=0)
    windows_per_shard: int = Field(64, gt=0)
    codec: Literal["plain", "compact"] = "plain"
    max_retries: int = Field(3, ge=0)


# ----------------------------------------------------------------------------- student / train


class StudentArch(Strict):
    """Llama-family sizes; anything not given follows transformers' LlamaConfig defaults."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    tie_word_embeddings: bool = False


class StudentConfig(Strict):
    init: str | None = None  # local Hugging Face directory
    config: StudentArch | None = None

    @model_validator(mode="after")
    def _one(self) -> "StudentConfig":
        if (self.init is None) == (self.config is None):
            raise ValueError("give exactly one of student.init or student.config")
        return self


class RopeConfig(Strict):
    theta: float | Literal["auto"] = "auto"
    type: Literal["default", "linear", "dynamic", "yarn", "longrope", "llama3"] = "default"
    factor: float | None = Field(None, gt=0)
    original_max_position_embeddings: int | None = Field(None, gt=0)
    # Further rope_parameters passed through verbatim (e.g. low_freq_factor for llama3).
    extra: dict[str, float] = Field(default_factory=dict)

    @field_validator("theta")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 1:
            raise ValueError("must be > 1 or 'auto'")
        return v


class KDConfig(Strict):
    alpha: float = Field(1.0, ge=0.0, le=1.0)  # 1: pure KD, 0: plain next-token CE
    temperature: float = Field(1.0, gt=0)
    tail: Literal["bucket", "renormalize"] = "bucket"


class KDOverride(Strict):
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    temperature: float | None = Field(None, gt=0)
    tail: Literal["bucket", "renormalize"] | None = None


class PhaseConfig(Strict):
    name: str | None = None
    window_len: int = Field(gt=0)
    steps: int = Field(gt=0)
    rope: RopeConfig = RopeConfig()
    lr: float | None = Field(None, gt=0)
    kd: KDOverride | None = None
    data: DataConfig | None = None  # default: the top-level data section


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None


class TrainConfig(Strict):
    launcher: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, gt=0)  # default: one per local GPU, 2 without one
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    batch_size: int = Field(8, gt=0)  # windows per optimizer step, all ranks together
    micro_batch: int = Field(1, gt=0)  # windows per rank per forward
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    save_every: int = Field(100, gt=0)
    sequence_parallel: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    loss_tile: int = Field(1024, gt=0)  # positions per KD-loss tile
    kd: KDConfig = KDConfig()
    phases: list[PhaseConfig] = Field(default_factory=list)


# ----------------------------------------------------------------------------- eval / cluster


class EvalConfig(Strict):
    lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = Field(8, gt=0)
    tasks: list[Literal["passkey", "needle"]] = Field(default_factory=lambda: ["passkey", "needle"])
    threshold: float = Field(0.856, gt=0, le=1)  # RULER's effective-length bar
    loss_windows: int = Field(16, gt=0)
    loss_buckets: int = Field(16, gt=0)

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive lengths")
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("must be a non-empty list of fractions in [0, 1]")
        return v


class ClusterConfig(Strict):
    address: str = "local"  # "local" starts an embedded Ray on 127.0.0.1


# ----------------------------------------------------------------------------- the tree


class Config(Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    pack: PackConfig = PackConfig()
    teacher: TeacherConfig = TeacherConfig()
    cache: CacheConfig = CacheConfig()
    student: StudentConfig | None = None
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _phases_fit_docs(self) -> "Config":
        for i, phase in enumerate(self.train.phases):
            if phase.window_len < self.pack.doc_len[1]:
                raise ValueError(
                    f"train.phases[{i}].window_len {phase.window_len} is smaller than "
                    f"pack.doc_len max {self.pack.doc_len[1]}"
                )
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache.root) if self.cache.root else self.out_dir / "cache"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.resolved(), indent=2, sort_keys=False)


# ----------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the model tree along ``loc`` to list valid keys at the error's parent."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cur = _unwrap_model(ann)
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}).keys())


def _unwrap_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError, model: type[BaseModel] = Config) -> str:
    lines = []
    for e in err.errors():
        # Drop pydantic's union-branch and validator-name noise from the location.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in (
            "function-after", "literal['auto']", "float", "int", "str", "none"))))
        path = _format_loc(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else (
                f" (valid keys: {', '.join(known)})" if known else "")
            lines.append(f"{path}: unknown key{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            if e["type"] not in ("missing",) and not isinstance(got, (dict, list)):
                msg += f" (got {got!r})"
            lines.append(f"{path}: {msg}")
    # Unions report one error per branch; keep each distinct message once.
    return "\n".join(dict.fromkeys(lines))


def parse_config(raw: Any, source: str = "<config>") -> Config:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: invalid config\n{format_validation_error(err)}") from None


def load_config(path: str | Path) -> Config:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: not valid YAML: {err}") from None
    return parse_config(raw, str(p))
