"""One YAML file per run, validated into one typed tree before any work starts.

Every model forbids unknown keys, so a misspelt key fails loudly instead of silently
falling back to a default. Errors name the dotted key path (``pack.window_len: ...``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from pipeline.errors import UserError


def _ordered(v: tuple[int, int]) -> tuple[int, int]:
    if v[0] < 1 or v[0] > v[1]:
        raise ValueError("must be [min, max] with 1 <= min <= max")
    return v


def _listed(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v  # YAML has no tuples


Pair = Annotated[tuple[int, int], BeforeValidator(_listed)]
FloatPair = Annotated[tuple[float, float], BeforeValidator(_listed)]
Range = Annotated[Pair, AfterValidator(_ordered)]  # [min, max], 1 <= min <= max


def _betas(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0.0 <= b < 1.0 for b in v):
        raise ValueError("each must be in [0, 1)")
    return v
AttnBackend = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]  # stages/attention.py
# Names become path parts (<out_dir>/train/<name>-<fp>, analyze/perturb-<label>): a letter or
# digit first, then letters, digits, '_', '.', '-' — no '/', no '..', nothing absolute.
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
# numpy's generators take seeds in [0, 2**32); torch's up to 2**64: the narrower range for both.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class Strict(BaseModel):
    """Unknown keys and coerced values are errors: YAML's `true` is not a seed, `"8"` is not k,
    and `.inf`/`.nan` are not numbers in a range."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- run / data / pack


class RunConfig(Strict):
    name: Name = "posdistill"
    out_dir: str = "runs/posdistill"
    seed: Seed = 0


class SyntheticConfig(Strict):
    """Deterministic documents whose continuation needs retrieval inside the document."""

    num_docs: int = Field(2000, gt=0)
    alphabet: str = Field("abcdefghijklmnopqrstuvwxyz", min_length=2)
    # Share of documents of each kind; the rest are key->value fact documents.
    copy_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # Length of the repeated segment in copy documents, as a fraction range of the doc length.
    segment_len: Range = (4, 64)
    # Share of documents in the eval's retrieval formats (a needle or a pass key amid a
    # haystack, asked for again at the document's end): a pretraining that teaches retrieval
    # at every distance inside the window, as a pretrained LM has seen. stages/corpus.py.
    retrieval_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @model_serializer(mode="wrap")
    def _identity(self, handler: Any) -> dict[str, Any]:
        # Left out at its default, so every identity made before the field existed still holds.
        out = handler(self)
        if out.get("retrieval_fraction") == 0.0:
            out.pop("retrieval_fraction")
        return out



class PeriodicConfig(Strict):
    """Token-id documents: a random segment repeated to fill the document.

    The rows under which an induction mechanism emerges in a tiny model (docs/teacher.md):
    the demo's short pretraining uses them so the student can copy within its short window,
    as a pretrained language model can, before any extension. Training ignores the loss of
    each document's first period (random, so pure noise)."""

    num_docs: int = Field(20000, gt=0)
    period: Range = (4, 128)  # segment lengths, drawn uniformly
    # Segments draw token ids 0..alphabet_size-1 (the byte tokenizer's bytes by default).
    # With 256 ids induction emerged in ~700 steps; with 94 printable characters not in 1000.
    alphabet_size: int = Field(256, ge=2)



class DataConfig(Strict):
    # "synthetic" (text documents), "periodic" (token-id documents), a path, glob or directory of
    # .jsonl/.jsonl.gz/.json/.parquet/.txt files, a datasets.save_to_disk dir, or a Hugging Face dataset id
    # "org/name[@revision]" (its .jsonl/.parquet/.txt files; pipeline/locate.py).
    source: str = "synthetic"
    text_field: str = "text"
    # "byte" (built in, no downloads), a local Hugging Face tokenizer directory or a Hub id
    # "org/name[@revision]".
    tokenizer: str = "byte"
    synthetic: SyntheticConfig = SyntheticConfig()
    periodic: PeriodicConfig = PeriodicConfig()


class PackConfig(Strict):
    window_len: int = Field(2048, gt=0)
    mode: Literal["cross_doc", "doc_masked"] = "cross_doc"
    doc_len: Range = (64, 256)
    # Chunks held for the seeded shuffle; bounds memory independently of corpus size.
    shuffle_buffer: int = Field(4096, gt=0)
    # Stop after this many windows, reading no more of the corpus than they need (a training
    # phase's pack is sized to what its steps consume; None: the whole corpus).
    max_windows: int | None = Field(None, gt=0)


    @model_validator(mode="after")
    def _fits(self) -> "PackConfig":
        if self.window_len < self.doc_len[1]:
            raise ValueError(
                f"window_len {self.window_len} is smaller than doc_len max {self.doc_len[1]}"
            )
        return self


# ----------------------------------------------------------------------------- model sizes


class StudentArch(Strict):
    """Llama-family sizes; anything not given follows transformers' LlamaConfig defaults."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    # Per-head width; default hidden_size // heads. Wider heads have more RoPE pairs, and
    # long-range content matching lives in the slowly rotating ones.
    head_dim: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    tie_word_embeddings: bool = False


# ----------------------------------------------------------------------------- teacher / cache


class BootstrapTaskMix(Strict):
    """Share of training rows of each kind (normalised; zero switches a kind off).

    periodic:  a random segment (length in [min_period, max_period]) repeated to fill the
               window; loss after the first period. Content-based copying emerges from it.
    documents: synthetic documents (data.synthetic), BOS-separated and packed cross_doc,
               loss everywhere: the teacher's distributions on the demo's own data.
    spans:     random text whose later part is spans copied from a fresh distance each;
               loss on every copied token after a span's first. Dense, arbitrary distances,
               no periodic shortcut.
    needle:    a key+value record inside a haystack (synthetic documents or a repeated
               random sentence), the key repeated at the end; loss on the value only.
    formats:   the eval's two formats with fresh instances: 8 + 8 data-alphabet letters
               amid synthetic documents, or ``pass key: NNNNN.`` amid a repeated sentence
               of random words (never the eval's filler); the question at the end, loss on
               the answer, the fact at any distance in the window.
    """

    periodic: float = Field(1.0, ge=0)
    documents: float = Field(0.0, ge=0)
    spans: float = Field(0.0, ge=0)
    needle: float = Field(0.0, ge=0)
    formats: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _some(self) -> "BootstrapTaskMix":
        if self.periodic + self.documents + self.spans + self.needle + self.formats <= 0:
            raise ValueError("at least one task weight must be > 0")
        return self


def _check_alphabets(v: list[str] | None) -> list[str] | None:
    for a in v or []:
        if a not in ("bytes", "printable", "data") and len(set(a)) < 2:
            raise ValueError(f"alphabet {a!r} needs at least 2 distinct characters "
                             "(or use 'bytes', 'printable', 'data')")
    return v


class BootstrapPhase(Strict):
    window_len: int = Field(gt=1)
    rope_theta: float = Field(gt=1)
    steps: int = Field(gt=0)
    batch_size: int | None = Field(None, gt=0)  # default: teacher.bootstrap.batch_size
    lr: float | None = Field(None, gt=0)  # default: teacher.bootstrap.lr
    min_period: int | None = Field(None, gt=0)  # default: teacher.bootstrap.min_period
    # Longest copy distance of spans and needle rows (default: window_len); retrieval beyond
    # it is never trained, so the probe there shows generalisation.
    max_distance: int | None = Field(None, gt=0)
    max_period: int | None = Field(None, gt=0)  # default: min(window_len // 2, max_distance)
    mix: BootstrapTaskMix | None = None  # default: teacher.bootstrap.mix
    alphabets: list[str] | None = Field(None, min_length=1)  # default: teacher.bootstrap.alphabets
    decay: bool = False  # cosine-decay the learning rate to 10% over the phase
    # Keep training past `steps` until the loss (EMA) is at most this, up to max_steps: the
    # step at which induction emerges varies with the seed and model (650-1700 measured).
    until_loss: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)  # default: 3 * steps

    @field_validator("alphabets")
    @classmethod
    def _alphabets(cls, v: list[str] | None) -> list[str] | None:
        return _check_alphabets(v)

    @model_validator(mode="after")
    def _periods(self) -> "BootstrapPhase":
        if self.max_period is not None and self.max_period >= self.window_len:
            raise ValueError(f"max_period {self.max_period} must be < window_len {self.window_len}")
        if self.min_period is not None and self.max_period is not None and self.min_period > self.max_period:
            raise ValueError(f"min_period {self.min_period} is larger than max_period {self.max_period}")
        return self


class BootstrapProbe(Strict):
    """The needle probe run after training; its numbers go into bootstrap.json."""

    lengths: list[int] = Field(default_factory=lambda: [256, 512, 768, 1024])
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    trials: int = Field(32, gt=0)
    seed: Seed = 1_000_003  # haystack documents: never the training seed

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("must be a non-empty list of fractions in [0, 1]")
        return v


class BootstrapConfig(StudentArch):
    """Train a tiny long-context teacher locally (no model can be downloaded in the demo).
    Its sizes are a student's (``StudentArch``): it is built like a fresh student."""

    # Trained phase-wise like the students: each phase sets its window and RoPE theta.
    phases: list[BootstrapPhase] = Field(min_length=1)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    min_period: int = Field(4, gt=0)
    span_len: Pair = (8, 32)  # copied span lengths of spans rows
    # Copy distances [lo, hi] (inclusive) that no task ever trains: retrieval there shows
    # content-based copying, not a learned positional offset.
    holdout_distances: list[Pair] = Field(default_factory=list)
    # Token alphabets of the random rows, one drawn per row (list one twice to draw it twice
    # as often): "bytes" (ids 0..255), "printable" (ASCII 32..126), "data"
    # (data.synthetic.alphabet) or literal characters.
    alphabets: list[str] = Field(default_factory=lambda: ["bytes"], min_length=1)
    mix: BootstrapTaskMix = BootstrapTaskMix()
    # A bootstrapped teacher directory to continue from instead of a fresh model (its own
    # recipe is in its bootstrap.json): the sizes must be its sizes, but num_hidden_layers may
    # be larger - the layers added on top start as identity blocks (stages.bootstrap).
    init: str | None = None
    seed: Seed = 0
    threads: int | None = Field(None, gt=0)  # torch threads; default: torch's choice
    probe: BootstrapProbe = BootstrapProbe()

    @field_validator("holdout_distances")
    @classmethod
    def _bands(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for lo, hi in v:
            if lo < 1 or lo > hi:
                raise ValueError(f"band [{lo}, {hi}] must be [lo, hi] with 1 <= lo <= hi")
        return v

    @field_validator("alphabets")
    @classmethod
    def _alphabets(cls, v: list[str]) -> list[str]:
        return _check_alphabets(v)


class TeacherConfig(Strict):
    model: str | None = None  # a Hugging Face model directory, or a Hub id "org/name[@revision]"
    # The tokenizer the teacher reads ('byte' or a directory / Hub id); default: the tokenizer
    # files beside its weights. data.tokenizer must be the same tokenizer (checked by encoding).
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # GPUs per teacher actor. Unset: 1 on a cluster with GPUs, else CPU actors; 0: CPU actors;
    # a number asks for GPU actors (an error naming the largest node when none holds one).
    gpus_per_actor: float | None = Field(None, ge=0)
    num_actors: int | None = Field(None, gt=0)  # default: as many as fit (CPU: one per node)
    trust_remote_code: bool = False
    # Positions per top-k chunk: the [chunk, vocab] logits are the largest tensor built.
    chunk_len: int = Field(1024, gt=0)
    batch_size: int = Field(1, gt=0)  # windows per teacher forward
    # sdpa (default), eager, flash_attention_2, flex_attention; doc_masked never builds [L, L].
    attn_implementation: AttnBackend | None = None
    bootstrap: BootstrapConfig | None = None


class CacheConfig(Strict):
    root: str | None = None  # default: <run.out_dir>/cache
    kind: Literal["topk", "sampled"] = "topk"
    k: int = Field(32, gt=0)
    samples: int = Field(16, gt=0)  # draws per position when kind == sampled
    temperature: float = Field(1.0, gt=0)
    windows_per_shard: int = Field(64, gt=0)
    # Windows per Parquet row group: the reader's unit of shuffling and sharding across ranks.
    windows_per_row_group: int = Field(4, gt=0)
    # compact: ~2x smaller than plain at KL(decoded || exact) < 1e-3 nats/position, lossless ids
    # (bench/results/cache_bytes.json); plain: exact float16 values, the fixed schema.
    codec: Literal["plain", "compact"] = "compact"
    max_retries: int = Field(3, ge=0)  # retries of one shard whose actor died

    @model_validator(mode="after")
    def _sizes(self) -> "CacheConfig":
        if self.kind == "sampled" and self.samples > 32767:
            raise ValueError("samples must be <= 32767 (counts are stored as int16)")
        return self


# ----------------------------------------------------------------------------- student / train


class StudentConfig(Strict):
    init: str | None = None  # a Hugging Face model directory, or a Hub id "org/name[@revision]"
    config: StudentArch | None = None
    name: Name | None = None  # run directory <run.out_dir>/train/<name>; default "student"
    attn_implementation: AttnBackend = "sdpa"  # see docs/train.md "Attention backends"
    trust_remote_code: bool = False  # only for student.init

    @model_validator(mode="after")
    def _one(self) -> "StudentConfig":
        if (self.init is None) == (self.config is None):
            raise ValueError("give exactly one of student.init or student.config")
        return self


class RopeConfig(Strict):
    # auto: continuous critical-dimension scaling; auto_discrete: whole pairs (stages/rope.py)
    theta: float | Literal["auto", "auto_discrete"] = "auto"
    type: Literal["default", "linear", "dynamic", "yarn", "longrope", "llama3"] = "default"
    factor: float | None = Field(None, gt=0)
    original_max_position_embeddings: int | None = Field(None, gt=0)
    # Further rope_parameters passed through verbatim (e.g. low_freq_factor for llama3).
    extra: dict[str, float] = Field(default_factory=dict)

    @field_validator("theta")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v <= 1:
            raise ValueError("must be > 1, 'auto' or 'auto_discrete'")
        return v


KDLoss = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl"]


class KDConfig(Strict):
    alpha: float = Field(1.0, ge=0.0, le=1.0)  # 1: pure KD, 0: plain next-token CE
    temperature: float = Field(1.0, gt=0)
    tail: Literal["bucket", "renormalize"] = "bucket"
    # The divergence (definitions in stages/kd_loss.py); sampled caches take forward_kl only.
    loss: KDLoss = "forward_kl"
    beta: float = Field(0.5, gt=0.0, lt=1.0)  # the mixture weight of jsd and skew_kl
    # temperature may differ from the cache's temperature only when this says so
    allow_temperature_mismatch: bool = False


class KDOverride(Strict):
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    temperature: float | None = Field(None, gt=0)
    tail: Literal["bucket", "renormalize"] | None = None
    loss: KDLoss | None = None
    beta: float | None = Field(None, gt=0.0, lt=1.0)
    allow_temperature_mismatch: bool | None = None


class PhaseConfig(Strict):
    """One training phase: its window, RoPE, steps, and optional KD/data overrides.
    ``kd.alpha: 0`` trains on packed windows with plain next-token CE and needs no cache."""

    name: Name | None = None
    window_len: int = Field(gt=1)
    steps: int = Field(gt=0)
    rope: RopeConfig = RopeConfig()
    lr: float | None = Field(None, gt=0)
    # Cosine floor as a fraction of lr (default: train.min_lr_ratio); 1.0 holds lr constant,
    # e.g. while waiting for an induction mechanism to emerge.
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    kd: KDOverride | None = None
    # Default: the top-level data section. ``inherit`` (a student with init_from): the
    # parent's own documents - its last phase's data and doc_len - packed into this phase's
    # window, so that an extension changes only the window (pipeline.resolve).
    data: DataConfig | Literal["inherit"] | None = None
    # Document lengths packed into this phase's windows (default: pack.doc_len); e.g. one
    # window-long document per window for a short pretraining phase.
    doc_len: Range | None = None
    # The windows packed (and cached) for this phase: steps x batch_size by default (each seen
    # once); ``epochs: E`` packs 1/E of that and reads it E times; ``windows`` sets it outright.
    epochs: int | None = Field(None, gt=0)
    windows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _budget(self) -> "PhaseConfig":
        if self.epochs is not None and self.windows is not None:
            raise ValueError("give epochs or windows, not both")
        return self

    @model_validator(mode="after")
    def _doc_len_fits(self) -> "PhaseConfig":
        if self.doc_len is not None and self.doc_len[1] > self.window_len:
            raise ValueError(f"doc_len max {self.doc_len[1]} exceeds window_len {self.window_len}")
        if self.data == "inherit" and self.doc_len is not None:
            raise ValueError("doc_len: data 'inherit' takes the parent's doc_len too; drop doc_len")
        return self


class StudentVariant(Strict):
    """One student of a comparison (`posdistill run` trains every variant, each seed)."""

    name: Name
    # Another variant's name: start from its exported model (same seed when it has one).
    init_from: str | None = None
    phases: list[PhaseConfig] = Field(min_length=1)
    seeds: list[Seed] | None = None  # default: [train.seed or run.seed]
    # Windows per optimizer step and per rank forward for this student (default: train's).
    batch_size: int | None = Field(None, gt=0)
    micro_batch: int | None = Field(None, gt=0)


class DeepSpeedConfig(Strict):
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"  # ZeRO-3 only
    nvme_path: str | None = None
    # A DeepSpeed JSON config (a path, read when the config loads, or a mapping), merged with
    # what posdistill derives; a key set differently in both is an error naming both values.
    config: dict[str, Any] | str = Field(default_factory=dict)

    @field_validator("config", mode="after")
    @classmethod
    def _read_config(cls, v: dict[str, Any] | str) -> dict[str, Any]:
        if isinstance(v, dict):
            return v
        import json

        try:
            data = json.loads(Path(v).read_text())
        except OSError as err:
            raise ValueError(f"cannot read DeepSpeed config {v}: {err.strerror}") from None
        except ValueError as err:
            raise ValueError(f"{v} is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{v} is not a JSON object")
        return data

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedConfig":
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param needs zero_stage 3, got {self.zero_stage}")
        if "nvme" in (self.offload_optimizer, self.offload_param) and not self.nvme_path:
            raise ValueError("nvme offload needs nvme_path")
        return self


Tracker = Literal["tensorboard", "wandb", "mlflow"]


class TrackingConfig(Strict):
    """Where experiment trackers file a run (train.report_to); none of it changes what is trained."""

    # Each unset field falls back to the tracker's own environment variable, then to its default
    # (stages.train.metrics.tracker_settings): W&B project / MLflow experiment (default posdistill).
    project: str | None = None
    run_name: str | None = None  # default: the student's label (student.name, or <variant>-s<seed>)
    tags: list[str] = Field(default_factory=list)
    # Default: MLFLOW_TRACKING_URI, else a file store under the run directory (<run>/mlruns).
    mlflow_tracking_uri: str | None = None


class TrainConfig(Strict):
    launcher: Literal["local", "ray"] = "local"
    # Seed of the student's init and data order (default: run.seed). Vary it to repeat a
    # student without re-packing or re-caching: run.seed also seeds the packing.
    seed: Seed | None = None
    local_runner: Literal["torchrun", "deepspeed"] = "torchrun"  # how launcher "local" starts ranks
    workers: int | None = Field(None, gt=0)  # default: one per local GPU, 2 without one
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    batch_size: int = Field(8, gt=0)  # windows per optimizer step, all ranks together
    micro_batch: int = Field(1, gt=0)  # windows per rank per forward
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: Annotated[FloatPair, AfterValidator(_betas)] = (0.9, 0.95)  # AdamW
    eps: float = Field(1e-8, gt=0)
    # bf16 on GPU and fp32 on CPU by default ("auto"); bf16 also trains on CPU; fp16 uses
    # dynamic loss scaling (GPU only).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_clip: float = Field(1.0, ge=0)
    save_every: int = Field(100, gt=0)
    sequence_parallel: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    tiled_mlp: bool = False  # DeepSpeed TiledMLP: MLP activations bounded by one tile
    loss_tile: int = Field(1024, gt=0)  # positions per KD-loss tile
    keep_checkpoints: int = Field(2, gt=0)  # newest complete checkpoints kept
    # Consecutive optimizer steps DeepSpeed may skip (loss-scale overflow) before the run stops.
    max_skipped_steps: int = Field(10, gt=0)
    prefetch: int = Field(4, gt=0)  # micro-batches read ahead by the loader thread
    log_every_s: float = Field(10.0, gt=0)  # progress line interval (rank 0)
    # Experiment trackers fed by rank 0, besides metrics.jsonl (always written). Like the
    # progress settings they are not part of the run's identity (stages.train.metrics).
    report_to: list[Tracker] = Field(default_factory=lambda: ["tensorboard"])
    tracking: TrackingConfig = TrackingConfig()
    kd: KDConfig = KDConfig()
    phases: list[PhaseConfig] = Field(default_factory=list)

    @field_validator("report_to")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _windows_split(self) -> "TrainConfig":
        for i, phase in enumerate(self.phases):
            if phase.window_len % self.sequence_parallel:
                raise ValueError(f"phases[{i}].window_len {phase.window_len} is not divisible by "
                                 f"sequence_parallel {self.sequence_parallel}")
        return self


# ----------------------------------------------------------------------------- eval / cluster


class EvalConfig(Strict):
    """Retrieval probes (passkey, needle) over lengths x depths, and loss by position."""

    lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = Field(8, gt=0)
    tasks: list[Literal["passkey", "needle"]] = Field(default_factory=lambda: ["passkey", "needle"])
    threshold: float = Field(0.856, gt=0, le=1)  # RULER's effective-length bar
    loss_windows: int = Field(16, ge=0)  # held-out packed windows for loss by position; 0: skip
    loss_buckets: int = Field(16, gt=0)
    loss_window_len: int | None = Field(None, gt=1)  # default: max(eval.lengths)
    tile: int = Field(1024, gt=0)  # positions per lm_head tile: [tile, vocab] is the largest logits tensor
    batch_tokens: int = Field(32768, gt=0)  # probes per forward = max(1, batch_tokens // length)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:N
    # Haystack documents and held-out windows; default: the top-level data section.
    data: DataConfig | None = None
    heldout_seed: Seed | None = None  # default: run.seed + 1 (never the training seed)

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive lengths")
        return sorted(set(v))

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("must be a non-empty list of fractions in [0, 1]")
        return sorted(set(v))

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


class PerturbConfig(Strict):
    """The seed paper's positional probe on packed repeated token sequences.

    target query: every query is rotated as if it sat delta positions later (RoPE is
    relative, so each query-key distance grows by delta); key: keys as if delta later
    (distances shrink by delta); gap: the position ids of the window's second half jump by
    delta (distances across the middle grow by delta, within each half unchanged).
    """

    # Offsets in positions; fractions rotate by part of a position (query/key only). Default
    # for query/key: small, since at delta >= 1 a small model's output is already saturated and
    # a saturated profile cannot tell a student that follows the teacher from one that does not;
    # for gap: doublings 1..256.
    deltas: list[float]
    target: Literal["query", "key", "gap"] = "query"
    # Layers whose queries/keys are perturbed (together); default for query/key the first, so
    # the change is traced through every later layer; `null` perturbs every layer at once.
    layers: list[int] | None = None
    window_len: int | None = Field(None, gt=1)  # default: pack.window_len
    windows: int = Field(4, gt=0)
    segment_len: Range = (16, 128)  # length of each repeated random sequence
    repeats: int = Field(2, ge=2)  # copies of each sequence
    logit_lens: bool = True  # KL of every layer's read-out, not only the output's


    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        gap = data.get("target") == "gap"
        if "deltas" not in data:
            data["deltas"] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256] if gap else [0, 0.125, 0.25, 0.5, 1, 2, 4]
        if "layers" not in data and not gap:
            data["layers"] = [0]
        return data

    @model_validator(mode="after")
    def _gap(self) -> "PerturbConfig":
        if not self.deltas:
            raise ValueError("deltas: must list at least one offset")
        if self.target == "gap" and any(d < 0 for d in self.deltas):
            raise ValueError("deltas: target 'gap' needs offsets >= 0 (positions must increase)")
        if self.target == "gap" and any(d != int(d) for d in self.deltas):
            raise ValueError("deltas: target 'gap' needs whole offsets (position ids are integers)")
        if self.target == "gap" and self.layers is not None:
            raise ValueError("layers: only for target 'query' or 'key' (a gap moves positions in every layer)")
        return self


class QuerySpansConfig(Strict):
    windows: list[int] | None = None  # phase windows to mark; default: train.phases' window_len
    top: int = Field(5, gt=0)  # how many most-moved spans to name
    # Held-out windows (of pack.window_len tokens) the query *states* are compared on, before
    # and after extension (stages/analyze/query_states.py; finding 3's units).
    samples: int = Field(4, gt=0)


class AnalyzeConfig(Strict):
    perturb: PerturbConfig = PerturbConfig()
    query_spans: QuerySpansConfig = QuerySpansConfig()


class PlanConfig(Strict):
    """Hardware assumptions for `posdistill plan` (defaults: an 8x H100 80GB node, bf16 dense)."""

    num_gpus: int = Field(8, gt=0)
    gpu_memory_gb: float = Field(80, gt=0)
    gpu_tflops: float = Field(989, gt=0)
    mfu: float = Field(0.4, gt=0, le=1)


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
    analyze: AnalyzeConfig = AnalyzeConfig()
    cluster: ClusterConfig = ClusterConfig()
    plan: PlanConfig = PlanConfig()
    # Students compared in one run; empty: one student trained on train.phases.
    students: list[StudentVariant] = Field(default_factory=list)

    @model_validator(mode="after")
    def _students(self) -> "Config":
        names = [v.name for v in self.students]
        for i, v in enumerate(self.students):
            if names.count(v.name) > 1:
                raise ValueError(f"students[{i}].name: '{v.name}' is used twice")
            if v.init_from is not None and v.init_from not in names[:i]:
                raise ValueError(f"students[{i}].init_from: '{v.init_from}' is not an earlier student "
                                 f"(earlier: {', '.join(names[:i]) or 'none'})")
            for j, phase in enumerate(v.phases):
                if phase.data == "inherit" and v.init_from is None:
                    raise ValueError(f"students[{i}].phases[{j}].data: 'inherit' needs init_from "
                                     "(the student whose documents it reads)")
                if phase.window_len < self.pack.doc_len[1]:
                    raise ValueError(f"students[{i}].phases[{j}].window_len {phase.window_len} is smaller "
                                     f"than pack.doc_len max {self.pack.doc_len[1]}")
        if self.students and self.student is None:
            raise ValueError("students: needs a student section (student.config or student.init)")
        return self

    @model_validator(mode="after")
    def _phases_fit_docs(self) -> "Config":
        for i, phase in enumerate(self.train.phases):
            if phase.data == "inherit":
                raise ValueError(f"train.phases[{i}].data: 'inherit' is for a student with init_from")
            if phase.window_len < self.pack.doc_len[1]:
                raise ValueError(
                    f"train.phases[{i}].window_len {phase.window_len} is smaller than "
                    f"pack.doc_len max {self.pack.doc_len[1]}"
                )
        return self

    @property
    def out_dir(self) -> Path:
        """Local: the directory; ``s3://``/``gs://``: its scratch mirror (``pipeline.storage``),
        which the run graph pulls and pushes around every node."""
        return _local_root(self.run.out_dir, "run.out_dir")

    @property
    def train_seed(self) -> int:
        return self.run.seed if self.train.seed is None else self.train.seed

    @property
    def cache_root(self) -> Path:
        return _local_root(self.cache.root, "cache.root") if self.cache.root else self.out_dir / "cache"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.resolved(), indent=2, sort_keys=False)


def _local_root(root: str, field: str) -> Path:
    from pipeline.storage import is_remote, mirror_path

    if not is_remote(root):
        return Path(root)
    try:
        return mirror_path(root)
    except UserError as err:
        raise UserError(f"{field}: {err}") from None


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
            # A cross-field check at the top level already names its keys in the message.
            lines.append(msg if path == "<config>" else f"{path}: {msg}")
    # Unions report one error per branch; keep each distinct message once.
    return "\n".join(dict.fromkeys(lines))


def parse_config(raw: Any, source: str = "<config>") -> Config:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = format_validation_error(err)
        if "\n" not in problems:
            raise UserError(f"{source}: {problems}") from None
        raise UserError(f"{source}: invalid config ({problems.count(chr(10)) + 1} problems)\n{problems}") from None


class DuplicateKey(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string, which strict types then refuse; read
    every number as YAML 1.2 and JSON do. A key given twice in one mapping is an error (PyYAML
    keeps the last silently: a second ``cache:`` section would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges: own keys overriding merged ones is YAML's meaning
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not None:
                raise DuplicateKey(f"duplicate key '{key}' at line {line} (first at line {first})")
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(path: str | Path) -> Config:
    """Load from a YAML file, or from an environment variable as ``env:NAME`` (how submitted
    Ray jobs receive their config without shipping files outside the project)."""
    if str(path).startswith("env:"):
        name = str(path)[4:]
        if name not in os.environ:
            raise UserError(f"config: environment variable {name} is not set")
        try:
            raw = load_yaml(os.environ[name])
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML: {err}") from None
        return parse_config(raw, str(path))
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: not valid YAML: {err}") from None
    return parse_config(raw, str(p))
