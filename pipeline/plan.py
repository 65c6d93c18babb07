"""`posdistill plan`: what a real-scale config will cost before any GPU is spent.

Estimates (stated assumptions, printed with the numbers):
- cache bytes: tokens x k x bytes-per-entry of each codec (measured in bench/results/cache_bytes.json
  when present, else the fallbacks below);
- teacher forward FLOPs: 2 x params per token plus causal attention 2 x layers x hidden x window
  per token (mean context window/2, QK^T and AV), at ``plan.mfu`` of ``plan.gpu_tflops``;
- student memory per GPU for ZeRO 1/2/3 with bf16 weights/grads and fp32 Adam (16 B/param in all):
  ZeRO-1 shards the 12 B optimizer state, ZeRO-2 also the 2 B gradients, ZeRO-3 everything;
  activations with gradient checkpointing = layer inputs (2 B x s x h per layer) + one layer's
  recompute (34 B x s x h, flash attention, Korthikanti et al.) + one loss tile (4 B x tile x vocab),
  where s is the window divided by the sequence-parallel degree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import UserError
from stages.student import check_arch, check_hf_arch, check_student_seed

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "cache_bytes.json"
FALLBACK_BYTES_PER_ENTRY = {"plain": 3.3, "compact": 1.5}  # NOTES.md: 6 B raw / ~1.84 zstd; issue floor


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # default hidden // heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "Arch":
        h = cfg["hidden_size"]
        return cls(hidden=h, layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                   kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   ffn=cfg.get("intermediate_size") or 4 * h, vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)), head_dim=cfg.get("head_dim"))

    @property
    def params(self) -> int:
        head_dim = self.head_dim or self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.ffn
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


def _read_hf_config(path: str, field: str) -> dict[str, Any]:
    from pipeline.locate import local_path

    p = local_path(path, field, "config")  # a Hub id: its config.json alone is fetched
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{field}: no config.json at '{path}'")
    return json.loads(p.read_text())


def _bytes_per_entry() -> dict[str, float]:
    out = dict(FALLBACK_BYTES_PER_ENTRY)
    if RESULTS.is_file():
        res = json.loads(RESULTS.read_text())
        for codec, val in (res.get("bytes_per_entry_128k_vocab") or {}).items():
            out[codec] = float(val)
    return out


def zero_memory(params: int, stage: int, world: int) -> dict[str, float]:
    """Bytes per GPU for weights, gradients and optimizer state under a ZeRO stage."""
    w, g, o = 2.0 * params, 2.0 * params, 12.0 * params
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        w /= world
    return {"params": w, "grads": g, "optimizer": o}


def activation_bytes(arch: Arch, window: int, sp: int, micro_batch: int, tile: int, checkpointing: bool) -> float:
    s = window / sp * micro_batch
    if checkpointing:
        layer = 2.0 * s * arch.hidden * arch.layers + 34.0 * s * arch.hidden
    else:
        layer = 34.0 * s * arch.hidden * arch.layers
    return layer + 4.0 * min(tile, s) * arch.vocab


def _check_tokenizer_fits(tokenizer: str, teacher_vocab: int, student_vocab: int, init: str | None) -> None:
    """Both vocabularies hold every id of the data's tokenizer -- when the tokenizer is here to
    count (plan also runs where only config.json files are)."""
    from stages.student import check_vocab_covers
    from stages.tokenizer import load_tokenizer

    try:
        tokens = len(load_tokenizer(tokenizer))
    except UserError:
        return
    check_vocab_covers(teacher_vocab, tokens, "teacher.model")
    if init is not None:
        check_vocab_covers(student_vocab, tokens, f"student.init ({init})")


def make_plan(cfg: Config, teacher_config: str | None = None, student_config: str | None = None) -> dict[str, Any]:
    """Per student and phase: tokens, cache size, teacher and student GPU-hours, memory per GPU.
    A cache shared by several students (same pack) is counted once, at its largest use."""
    from pipeline.resolve import train_specs

    p = cfg.plan
    teacher_src = teacher_config or cfg.teacher.model
    if teacher_src is None:
        raise UserError("teacher.model: plan needs the teacher's config.json (or --teacher-config)")
    teacher_conf = _read_hf_config(teacher_src, "teacher.model")
    teacher = Arch.from_hf(teacher_conf)
    if cfg.student is None:
        raise UserError("student: plan needs student.config or student.init")
    if student_config or cfg.student.init:
        src = student_config or cfg.student.init
        hf = _read_hf_config(src, "student.init")
        check_hf_arch(hf, src)
        student = Arch.from_hf(hf)
    else:
        sc = cfg.student.config
        check_arch(sc.model_dump(), "student.config.")
        student = Arch(hidden=sc.hidden_size, layers=sc.num_hidden_layers, heads=sc.num_attention_heads,
                       kv_heads=sc.num_key_value_heads or sc.num_attention_heads,
                       ffn=sc.intermediate_size or 4 * sc.hidden_size, vocab=teacher.vocab,
                       tied=sc.tie_word_embeddings, head_dim=sc.head_dim)
    specs = train_specs(cfg)
    if not specs:
        raise UserError("train.phases: plan needs at least one phase (or students:)")
    from stages.model_config import context_note, text_part

    for spec in specs:
        check_student_seed(spec)
        for ph in spec.phases:
            if ph.cache is not None:  # the teacher reads this phase's windows
                context_note(text_part(teacher_conf), f"teacher.model {teacher_src}", ph.window_len, teacher_src)
    _check_tokenizer_fits(cfg.data.tokenizer, teacher.vocab, student.vocab, student_config or cfg.student.init)
    bpe = _bytes_per_entry()
    peak = p.gpu_tflops * 1e12 * p.mfu
    gpu_bytes = p.gpu_memory_gb * 2**30
    caches: dict[str, tuple[int, float]] = {}  # pack -> (tokens, teacher FLOPs) at its largest use
    students, all_phases, student_flops_total = [], [], 0.0
    for spec in specs:
        t = spec.train
        phases, cache_tokens, student_flops = [], 0, 0.0
        for ph in spec.phases:
            tokens = ph.steps * t.batch_size * ph.window_len
            attn = lambda a: 2.0 * a.layers * a.hidden * ph.window_len  # per token, causal mean context  # noqa: E731
            cached = 0
            if ph.cache is not None:
                # The cache holds the windows its pack was sized to (pipeline.resolve._budgets).
                cached = (ph.pack.pack.max_windows or ph.steps * t.batch_size) * ph.window_len
                cache_tokens += cached
                key = json.dumps(ph.pack.describe(), sort_keys=True)
                caches[key] = (cached, cached * (2.0 * teacher.params + attn(teacher)))
            student_flops += 3 * tokens * (2.0 * student.params + attn(student))
            mem = {}
            sp = t.sequence_parallel
            act = activation_bytes(student, ph.window_len, sp, t.micro_batch, t.loss_tile, t.gradient_checkpointing)
            for stage in (1, 2, 3):
                parts = zero_memory(student.params, stage, p.num_gpus)
                total = sum(parts.values()) + act
                need = next((n for n in range(1, 4097) if sum(zero_memory(student.params, stage, n).values()) + act
                             <= 0.9 * gpu_bytes), None)
                mem[f"zero{stage}"] = {**{k: v / 2**30 for k, v in parts.items()}, "activations": act / 2**30,
                                       "total_gb": total / 2**30, "fits": total <= 0.9 * gpu_bytes,
                                       "min_gpus": (math.ceil(need / sp) * sp) if need else None}
            phases.append({"student": spec.label, "phase": ph.name, "window_len": ph.window_len, "tokens": tokens,
                           "cache_tokens": cached, "kd": ph.cache is not None, "memory_per_gpu": mem})
        students.append({"student": spec.label, "cache_tokens": cache_tokens,
                         "student_gpu_hours": student_flops / peak / 3600, "phases": phases})
        all_phases += phases
        student_flops_total += student_flops
    cache_tokens = sum(tok for tok, _ in caches.values())
    teacher_flops = sum(fl for _, fl in caches.values())
    entries = cache_tokens * (cfg.cache.k if cfg.cache.kind == "topk" else cfg.cache.samples)
    return {
        "teacher_params_b": teacher.params / 1e9, "student_params_b": student.params / 1e9,
        "cache_tokens": cache_tokens, "caches": len(caches),
        "cache_bytes_gb": {c: entries * b / 1e9 for c, b in bpe.items()},
        "bytes_per_entry": bpe,
        "teacher_pflops": teacher_flops / 1e15, "teacher_gpu_hours": teacher_flops / peak / 3600,
        "student_gpu_hours": student_flops_total / peak / 3600,
        "assumptions": {"gpu_memory_gb": p.gpu_memory_gb, "gpu_tflops": p.gpu_tflops, "mfu": p.mfu,
                        "num_gpus": p.num_gpus, "sequence_parallel": cfg.train.sequence_parallel,
                        "gradient_checkpointing": cfg.train.gradient_checkpointing,
                        "usable_memory_fraction": 0.9},
        "students": students,
        "phases": all_phases,
    }


def format_plan(plan: dict[str, Any]) -> str:
    a = plan["assumptions"]
    lines = [
        f"teacher {plan['teacher_params_b']:.2f}B params, student {plan['student_params_b']:.2f}B params",
        f"assumed: {a['num_gpus']} GPUs x {a['gpu_memory_gb']} GB, {a['gpu_tflops']} TFLOP/s peak at "
        f"{a['mfu']:.0%} utilisation, sequence parallel {a['sequence_parallel']}, "
        f"gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}",
        f"cache: {plan['caches']} caches, {plan['cache_tokens'] / 1e9:.2f}B tokens -> " + ", ".join(
            f"{c} {gb:,.0f} GB ({plan['bytes_per_entry'][c]:.2f} B/entry)" for c, gb in plan["cache_bytes_gb"].items()),
        f"teacher forward: {plan['teacher_pflops']:,.0f} PFLOP = {plan['teacher_gpu_hours']:,.0f} GPU-hours",
        f"student training: {plan['student_gpu_hours']:,.0f} GPU-hours, {len(plan['students'])} students: " + ", ".join(
            f"{s['student']} {s['student_gpu_hours']:,.2f}" for s in plan["students"]),
        "",
        "| student | phase | window | tokens | ZeRO | params GB | grads GB | optim GB | activ. GB | total GB/GPU | fits | min GPUs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ph in plan["phases"]:
        for z, m in ph["memory_per_gpu"].items():
            lines.append(f"| {ph['student']} | {ph['phase']} | {ph['window_len']} | {ph['tokens'] / 1e9:.2f}B | {z[-1]} | "
                         f"{m['params']:.1f} | {m['grads']:.1f} | {m['optimizer']:.1f} | {m['activations']:.1f} | "
                         f"{m['total_gb']:.1f} | {'yes' if m['fits'] else 'no'} | {m['min_gpus']} |")
    return "\n".join(lines)
