"""Teacher bootstrap: train a tiny long-context teacher that retrieves by content.

No pretrained model can be downloaded in the demo, so the teacher is trained here, on CPU,
phase-wise like the students (a short window with a small RoPE theta, then a longer window
with a larger theta), and saved as a Hugging Face directory that the rest of the pipeline
treats like any other teacher.

Why this recipe (measured; docs/teacher.md has the numbers and what failed): a fixed copy
distance is learned as a positional offset, and copies at random distances in random text
stay at chance when trained from scratch. Periodic rows - a random segment of random length
repeated to fill the window - make every position after the first period a copy whose
source must be found by content; an induction mechanism emerges from them after a loss
plateau, provided heads are wide enough (head_dim 32: content matching lives in the slowly
rotating RoPE pairs). Only then do spans copied from arbitrary distances, needles in
haystacks and the demo's own documents sharpen it into retrieval across the whole window,
including distances held out of training.

What is bootstrap-specific lives here: the training rows (periodic, spans, needle and
document rows, ``PhaseSampler``) and a plain single-process training loop. Everything else
is the stages' own: the model is built like a ``student.config`` student
(``stages.student``), each phase's RoPE is applied like a student phase's (``stages.rope``),
and the finished teacher is probed, scored and plotted exactly as ``posdistill eval`` probes
any model (``stages.evaluate``: the agreed passkey and needle formats, docs/eval.md).
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.atomic import atomic_dir, atomic_write_json
from pipeline.config import BootstrapConfig, BootstrapPhase, BootstrapTaskMix, DataConfig, EvalConfig, SyntheticConfig
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from pipeline.progress import Progress
from stages.corpus import KEY_LEN, PASSKEY_DIGITS, PASSKEY_PREFIX, VALUE_LEN, synthetic_document
from stages.evaluate.report import effective_length, save_heatmap
from stages.evaluate.retrieval import grid, score_probes
from stages.evaluate.tasks import TASKS, Haystack, build_probes
from stages.rope import apply_rope
from stages.specs import BootstrapSpec
from stages.student import check_arch, check_seed, fresh_model, llama_config
from stages.tokenizer import BYTE_SPECIALS, BYTE_VOCAB_SIZE, build_byte_tokenizer

BOS_ID = 256 + BYTE_SPECIALS.index("<s>")
IGNORE = -100  # label that HF's causal-LM loss skips
META_FILE = "bootstrap.json"
HEATMAP_FILE = "heatmap.png"
EVAL_THRESHOLD = EvalConfig().threshold  # effective length as `posdistill eval` computes it
# Share of needle rows whose needle opens the context: uniform distances almost never put it
# at position 0, and a teacher trained without it failed the probe's depth 0 at every length.
AT_START_SHARE = 0.1


# ----------------------------------------------------------------------------- tasks


def alphabet_ids(spec: str, data_alphabet: str) -> torch.Tensor:
    """Token ids a periodic row draws from ("bytes", "printable", "data" or literal chars)."""
    if spec == "bytes":
        return torch.arange(256)
    if spec == "printable":
        return torch.arange(32, 127)
    chars = data_alphabet if spec == "data" else spec
    return torch.tensor(sorted(set(chars.encode("utf-8"))))


@dataclass(frozen=True)
class DistanceSampler:
    """Copy distances: uniform on [lo, hi], a quarter of them log-uniform (so short distances
    are common too without teaching a strong recency prior), never inside a held-out band. Bands are left out of every
    task so the probe can show retrieval at distances the model was never trained on."""

    holdout: tuple[tuple[int, int], ...] = ()

    def allowed(self, d: int) -> bool:
        return not any(lo <= d <= hi for lo, hi in self.holdout)

    def sample(self, gen: torch.Generator, lo: int, hi: int, log_share: float = 0.25) -> int:
        for _ in range(64):
            u = float(torch.rand((), generator=gen))
            if float(torch.rand((), generator=gen)) >= log_share:
                d = lo + int(u * (hi - lo + 1))
            else:
                d = int(math.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo))))
            d = min(max(d, lo), hi)
            if self.allowed(d):
                return d
        allowed = [d for d in range(lo, hi + 1) if self.allowed(d)]
        if not allowed:
            raise UserError(f"teacher.bootstrap.holdout_distances cover every distance in [{lo}, {hi}]")
        return allowed[int(torch.randint(len(allowed), (1,), generator=gen))]


def periodic_row(gen: torch.Generator, window: int, min_p: int, max_p: int, alphabet: torch.Tensor,
                 dist: DistanceSampler = DistanceSampler()) -> tuple[torch.Tensor, torch.Tensor]:
    """A random segment repeated to fill the window; labels only after the first period."""
    # Uniform periods: with log-uniform ones (many short periods) induction did not emerge in
    # 1200 steps - short periods are solved by a local shortcut that stalls the plateau.
    p = dist.sample(gen, min_p, max_p, log_share=0.0)
    seg = alphabet[torch.randint(len(alphabet), (p,), generator=gen)]  # [p]
    ids = seg.repeat(window // p + 1)[:window]  # [window]
    labels = ids.clone()
    labels[:p] = IGNORE
    return ids, labels


def spans_row(gen: torch.Generator, window: int, span_len: tuple[int, int], max_distance: int,
              alphabet: torch.Tensor, dist: DistanceSampler = DistanceSampler(),
              copy_from: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text; after the first ``copy_from`` of the window, spans copied from a fresh
    distance in [span length, max_distance] each, separated by short random gaps. Every
    copied token after a span's first is predictable only by finding the span's source by
    content. Sources are preferably fresh text, so a span's continuation is unambiguous."""
    ids = alphabet[torch.randint(len(alphabet), (window,), generator=gen)]  # [window]
    labels = torch.full_like(ids, IGNORE)
    fresh = torch.ones(window, dtype=torch.bool)  # not itself a copy
    cur = max(span_len[1], int(window * copy_from))
    while cur < window:
        n = min(int(torch.randint(span_len[0], span_len[1] + 1, (1,), generator=gen)), window - cur)
        far = min(cur, max_distance)
        for _ in range(8):
            src = cur - dist.sample(gen, min(n, far), far)
            if fresh[src:src + n].all():
                break
        for i in range(n):  # element-wise: a source overlapping the copy stays correct
            ids[cur + i] = ids[src + i]
        labels[cur + 1:cur + n] = ids[cur + 1:cur + n]
        fresh[cur:cur + n] = False
        cur += n + int(torch.randint(0, n + 1, (1,), generator=gen))  # a random gap
    return ids, labels


def encode(text: str) -> list[int]:
    """Byte-tokenizer ids without loading the tokenizer (ids 0..255 are the bytes)."""
    return list(text.encode("utf-8"))


class DocumentStream:
    """An endless stream of BOS-prefixed synthetic documents as byte ids."""

    def __init__(self, syn: SyntheticConfig, doc_len: tuple[int, int], seed: int):
        self.syn, self.doc_len = syn, doc_len
        self.rng = random.Random(seed)
        self.buf: list[int] = []

    def take(self, n: int) -> list[int]:
        while len(self.buf) < n:
            length = self.rng.randint(*self.doc_len)
            self.buf += [BOS_ID] + encode(synthetic_document(self.rng, self.syn, length))
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def document_row(docs: DocumentStream, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(docs.take(window))
    labels = ids.clone()
    labels[ids == BOS_ID] = IGNORE  # the next document's start is not predictable
    return ids, labels


def place_needle(haystack: list[int], needle: list[int], query: list[int], length: int, at: int) -> list[int]:
    """haystack[:at] + needle + haystack[at:room] + query, exactly ``length`` ids."""
    room = length - len(needle) - len(query)
    hay = haystack[:room]
    return hay[:at] + needle + hay[at:] + query


def retrieval_row(gen: torch.Generator, haystack: list[int], window: int, max_distance: int,
                  needle: list[int], query: list[int], answer: list[int],
                  dist: DistanceSampler = DistanceSampler()) -> tuple[torch.Tensor, torch.Tensor]:
    """``needle`` (= query + answer + anything after) in a haystack, the query at the end and
    the answer after it; loss on the answer only. The distance from the needle's answer to the
    context's end (the probe's distance) is drawn by ``dist``: at least the needle's length
    (needle right before the query), at most the context minus the query; ``AT_START_SHARE``
    of the rows that can reach it put the needle at position 0."""
    length = window - len(answer)
    longest = min(max_distance, length - len(query))
    if longest == length - len(query) and float(torch.rand((), generator=gen)) < AT_START_SHARE:
        d = longest  # the needle at position 0, where attention sinks live
    else:
        d = dist.sample(gen, len(needle), longest)
    ctx = place_needle(haystack, needle, query, length, length - len(query) - d)
    ids = torch.tensor(ctx + answer)  # [window]
    labels = torch.full_like(ids, IGNORE)
    labels[-len(answer):] = ids[-len(answer):]
    return ids, labels


def needle_row(gen: torch.Generator, haystack: list[int], window: int, max_distance: int,
               alphabet: torch.Tensor, dist: DistanceSampler = DistanceSampler(),
               key_len: int = 8, value_len: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A needle (key + value drawn from ``alphabet``) in a haystack, the key again at the end;
    loss on the value (``retrieval_row``)."""
    kv = alphabet[torch.randint(len(alphabet), (key_len + value_len,), generator=gen)].tolist()
    return retrieval_row(gen, haystack, window, max_distance, kv, kv[:key_len], kv[key_len:], dist)


def formats_row(gen: torch.Generator, docs: DocumentStream, window: int, max_distance: int,
                data_alphabet: torch.Tensor, dist: DistanceSampler = DistanceSampler()) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval's two formats (``stages.evaluate.tasks``) with fresh instances, half each:
    a key + value of data-alphabet letters (``KEY_LEN`` + ``VALUE_LEN``) amid synthetic
    documents, asked by the key; or ``pass key: NNNNN.`` amid a repeated sentence of random
    words (never the eval's filler), asked by ``pass key: ``. What the probes score, trained
    at every distance in the window rather than hoped for from the other tasks."""
    if float(torch.rand((), generator=gen)) < 0.5:
        kv = data_alphabet[torch.randint(len(data_alphabet), (KEY_LEN + VALUE_LEN,), generator=gen)].tolist()
        return retrieval_row(gen, docs.take(window), window, max_distance, kv, kv[:KEY_LEN], kv[KEY_LEN:], dist)
    prefix = encode(PASSKEY_PREFIX)
    digits = encode("".join(str(int(x)) for x in torch.randint(10, (PASSKEY_DIGITS,), generator=gen)))
    return retrieval_row(gen, word_filler(gen, window), window, max_distance, prefix + digits + encode("."),
                         prefix, digits, dist)


def word_filler(gen: torch.Generator, window: int) -> list[int]:
    """A sentence of 3-15 random lowercase words (2-7 letters), spaces, a full stop, repeated
    to ``window`` ids: English-like filler, as the passkey probe's, but never its sentence."""
    seg: list[int] = []
    for _ in range(int(torch.randint(3, 16, (1,), generator=gen))):
        word = torch.randint(97, 123, (int(torch.randint(2, 8, (1,), generator=gen)),), generator=gen)
        seg += word.tolist() + [32]
    seg[-1:] = [46, 32]  # ". "
    return (seg * (window // len(seg) + 1))[:window]


def filler_haystack(gen: torch.Generator, window: int, alphabet: torch.Tensor) -> list[int]:
    """A short random sentence repeated (the passkey probe's kind of haystack): every query
    token has many short matches in it, so only the one long match is right. Half of the
    sentences are random words (``word_filler``), half random characters of ``alphabet``."""
    if float(torch.rand((), generator=gen)) < 0.5:
        n = int(torch.randint(8, 129, (1,), generator=gen))
        seg = alphabet[torch.randint(len(alphabet), (n,), generator=gen)].tolist()
        return (seg * (window // len(seg) + 1))[:window]
    return word_filler(gen, window)


@dataclass
class PhaseSampler:
    """Draws training batches for one phase; each row picks its task from the mix."""

    window: int
    min_p: int
    max_p: int
    max_distance: int
    dist: DistanceSampler
    mix: BootstrapTaskMix
    span_len: tuple[int, int]
    alphabets: list[torch.Tensor]
    data_alphabet: torch.Tensor
    docs: DocumentStream
    gen: torch.Generator

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.tensor([self.mix.periodic, self.mix.documents, self.mix.spans, self.mix.needle,
                                self.mix.formats])
        kinds = torch.multinomial(weights, size, replacement=True, generator=self.gen).tolist()
        rows = []
        for kind in kinds:
            a = self.alphabets[int(torch.randint(len(self.alphabets), (1,), generator=self.gen))]
            if kind == 0:
                rows.append(periodic_row(self.gen, self.window, self.min_p, self.max_p, a, self.dist))
            elif kind == 1:
                rows.append(document_row(self.docs, self.window))
            elif kind == 2:
                rows.append(spans_row(self.gen, self.window, self.span_len, self.max_distance, a,
                                      self.dist))
            elif kind == 4:
                rows.append(formats_row(self.gen, self.docs, self.window, self.max_distance,
                                        self.data_alphabet, self.dist))
            else:
                # Documents or a repeated filler around the needle; keys of 4-12 tokens from
                # the data alphabet or the row's alphabet (passkeys are digits in English).
                if float(torch.rand((), generator=self.gen)) < 0.5:
                    hay = self.docs.take(self.window)
                else:
                    hay = filler_haystack(self.gen, self.window, a)
                kv = self.data_alphabet if float(torch.rand((), generator=self.gen)) < 0.5 else a
                key_len = int(torch.randint(4, 13, (1,), generator=self.gen))
                rows.append(needle_row(self.gen, hay, self.window, self.max_distance, kv,
                                       self.dist, key_len=key_len))
        ids = torch.stack([r[0] for r in rows])  # [B, T]
        labels = torch.stack([r[1] for r in rows])  # [B, T]
        return ids, labels


# ----------------------------------------------------------------------------- probes


@torch.no_grad()
def document_loss(model: Any, syn: SyntheticConfig, doc_len: tuple[int, int], window: int,
                  windows: int = 8, seed: int = 777) -> dict[str, float]:
    """How informative the teacher is on the demo's own data: next-token CE, top-1 accuracy
    and entropy on held-out synthetic documents packed cross_doc into ``window`` tokens."""
    model.eval()
    docs = DocumentStream(syn, doc_len, seed)
    rows = [document_row(docs, window) for _ in range(windows)]
    ids = torch.stack([r[0] for r in rows])  # [N, T]
    target = torch.stack([r[1] for r in rows])[:, 1:]  # [N, T-1]
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)  # [N, T-1, V]
    mask = target != IGNORE
    ce = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return {"window": window, "ce": ce[mask].mean().item(),
            "top1": (logp.argmax(-1) == target)[mask].float().mean().item(),
            "entropy": -(logp.exp() * logp).sum(-1)[mask].mean().item(),
            "uniform_over_alphabet": math.log(len(set(syn.alphabet)))}


def probe_teacher(model: Any, syn: SyntheticConfig, doc_len: tuple[int, int], lengths: list[int],
                  depths: list[float], trials: int, seed: int, tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """``posdistill eval``'s probes (haystack: held-out synthetic documents of ``seed``) scored
    like any model's: {task: eval.json's grid of exact, token_acc, logprob, rank, distance}."""
    model.eval()
    tok = build_byte_tokenizer()
    hay = Haystack(DataConfig(synthetic=syn), tok, doc_len, seed, max(lengths) * max(trials, 4))
    out = {}
    for task in tasks:
        probes = build_probes(task, tok, lengths, depths, trials, seed, haystack=hay, alphabet=syn.alphabet)
        scores = score_probes(model, probes, batch_tokens=16384)
        g = grid(probes, scores, lengths, depths)
        g["probes"] = [{"length": p.length, "depth": p.depth, "trial": p.trial, "distance": int(p.distance),
                        "exact": sc["exact"], "token_acc": sc["token_acc"]} for p, sc in zip(probes, scores)]
        g["effective_length"] = effective_length(g["lengths"], g["exact"], EVAL_THRESHOLD)
        out[task] = g
    return out


def distance_edges(window: int) -> list[int]:
    """Buckets of the by-distance scores below the teacher's window: its first quarter, the
    second, the second half (0-255, 256-511, 512-1023 at 1024). Not the first phase's window:
    a teacher continued with ``init`` may have a single phase."""
    return sorted({0, window // 4, window // 2, window})


def by_distance(probes: dict[str, Any], edges: list[int]) -> dict[str, Any]:
    """Exact match and token accuracy per distance bucket [lo, hi) and task, with the probe
    count: the teacher's retrieval at every distance inside its window, in one table."""
    out: dict[str, Any] = {"edges": edges}
    for task, g in probes.items():
        rows = g["probes"]
        cells = []
        for lo, hi in zip(edges, edges[1:]):
            xs = [r for r in rows if lo <= r["distance"] < hi]
            cells.append({"bucket": f"{lo}-{hi - 1}", "probes": len(xs),
                          "exact": round(float(np.mean([r["exact"] for r in xs])), 4) if xs else None,
                          "token_acc": round(float(np.mean([r["token_acc"] for r in xs])), 4) if xs else None})
        out[task] = cells
    return out


def accuracy_grid(g: dict[str, Any], key: str = "exact") -> dict[str, dict[str, float]]:
    """{length: {depth: value}} of one metric of a probe grid, for tables."""
    return {str(L): {f"{d:g}": round(g[key][i][j], 4) for i, d in enumerate(g["depths"])}
            for j, L in enumerate(g["lengths"])}


def heatmap_title(boot: BootstrapConfig, trained_max: int) -> str:
    bands = ", ".join(f"{lo}-{hi}" for lo, hi in boot.holdout_distances)
    return (f"bootstrapped teacher, {boot.probe.trials} trials/cell; trained copy distances <= {trained_max}"
            + (f" except {bands}" if bands else ""))


# ----------------------------------------------------------------------------- training


def _phase_settings(boot: BootstrapConfig, phase: BootstrapPhase) -> dict[str, Any]:
    max_distance = phase.max_distance or phase.window_len
    return {
        "window_len": phase.window_len,
        "rope_theta": phase.rope_theta,
        "steps": phase.steps,
        "batch_size": phase.batch_size or boot.batch_size,
        "lr": phase.lr or boot.lr,
        "min_period": phase.min_period or boot.min_period,
        "max_period": phase.max_period or min(phase.window_len // 2, max_distance),
        "max_distance": max_distance,
        "mix": (phase.mix or boot.mix).model_dump(),
        "alphabets": phase.alphabets or boot.alphabets,
        "decay": phase.decay,
        "until_loss": phase.until_loss,
        "max_steps": phase.max_steps or 3 * phase.steps,
    }


def continue_from(model: Any, path: str | Path) -> None:
    """Load a bootstrapped teacher's weights into ``model`` (built from this recipe's sizes).

    Every tensor of the earlier teacher must be there with its shape; layers beyond its depth
    keep their fresh weights but with zero output projections (attention ``o_proj``, MLP
    ``down_proj``), so they start as identity blocks: the grown model computes exactly what
    the earlier teacher did, and the new layers add capacity from there."""
    from safetensors.torch import load_file

    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise UserError(f"teacher.bootstrap.init: {f} not found (not a bootstrapped teacher directory)")
    old = load_file(str(f))
    own = model.state_dict()
    for name, tensor in old.items():
        if name not in own or own[name].shape != tensor.shape:
            got = tuple(own[name].shape) if name in own else "missing"
            raise UserError(f"teacher.bootstrap.init: {path}'s {name} {tuple(tensor.shape)} does not fit this "
                            f"recipe's sizes ({got}); only num_hidden_layers may grow")
    model.load_state_dict(old, strict=False)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if f"model.layers.{i}.self_attn.o_proj.weight" not in old:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()


def train_teacher(spec: BootstrapSpec, log: list[dict[str, Any]] | None = None, progress: bool = True,
                  callback: Callable[[Any, int, int], None] | None = None) -> Any:
    """Train the teacher phase by phase; returns the model (config holds the last theta).

    A plain AdamW loop in one process rather than ``stages.train``'s step: that one drives a
    DeepSpeed engine on KD targets from the teacher cache and all-reduces across ranks; the
    teacher learns from labels alone, on the CPU."""
    boot = spec.boot
    assert boot is not None
    if boot.threads:
        torch.set_num_threads(boot.threads)
    max_window = max(p.window_len for p in boot.phases)
    model = fresh_model(llama_config(boot, BYTE_VOCAB_SIZE, max_window, build_byte_tokenizer()), boot.seed, "sdpa")
    if boot.init is not None:
        continue_from(model, boot.init)
    opt = torch.optim.AdamW(model.parameters(), lr=boot.lr, weight_decay=boot.weight_decay,
                            betas=(0.9, 0.98))
    syn = spec.synthetic
    data_alphabet = alphabet_ids("data", syn.alphabet)
    docs = DocumentStream(syn, spec.doc_len, seed=boot.seed)
    gen = torch.Generator().manual_seed(boot.seed)
    log = log if log is not None else []
    step_total = 0
    for index, phase in enumerate(boot.phases):
        s = _phase_settings(boot, phase)
        if s["min_period"] > s["max_period"]:
            raise UserError(f"teacher.bootstrap.phases[{index}]: min_period {s['min_period']} "
                            f"is larger than max_period {s['max_period']}")
        apply_rope(model, {"rope_type": "default", "rope_theta": float(s["rope_theta"])}, s["window_len"])
        sampler = PhaseSampler(
            window=s["window_len"], min_p=s["min_period"], max_p=s["max_period"],
            max_distance=s["max_distance"],
            dist=DistanceSampler(tuple(tuple(b) for b in boot.holdout_distances)),
            mix=phase.mix or boot.mix, span_len=boot.span_len,
            alphabets=[alphabet_ids(a, syn.alphabet) for a in s["alphabets"]],
            data_alphabet=data_alphabet, docs=docs, gen=gen)
        model.train()
        label = f"bootstrap phase {index} (window {s['window_len']}, theta {s['rope_theta']:g})"
        bar = Progress(label, s["steps"], unit="steps", enabled=progress)
        t0, ema = time.monotonic(), float("inf")
        step = 0
        while step < s["steps"] or (s["until_loss"] is not None and ema > s["until_loss"]
                                    and step < s["max_steps"]):
            lr = s["lr"] * min(1.0, (step + 1) / max(1, boot.warmup_steps))
            if phase.decay:
                lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / s["steps"], 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            ids, labels = sampler.batch(s["batch_size"])  # [B, T] each
            loss = model(input_ids=ids, labels=labels).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"bootstrap phase {index} step {step}: loss is {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if boot.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), boot.grad_clip)
            opt.step()
            step_total += 1
            ema = loss.item() if step == 0 else 0.9 * ema + 0.1 * loss.item()
            if step % 25 == 0:
                log.append({"phase": index, "step": step, "global_step": step_total,
                            "loss": round(loss.item(), 4), "loss_ema": round(ema, 4),
                            "elapsed_s": round(time.monotonic() - t0, 1)})
            if step == s["steps"]:
                bar.total = None  # extending towards until_loss: no fixed total any more
            bar.label = f"{label} loss {ema:.3f}"
            bar.update(1, amount=ids.numel())
            if callback is not None:
                callback(model, index, step)
            step += 1
        bar.close()
        done = {"phase": index, "done": True, "steps": step, "loss_ema": round(ema, 4),
                "seconds": round(time.monotonic() - t0, 1), "settings": s}
        if s["until_loss"] is not None:
            done["reached_until_loss"] = ema <= s["until_loss"]
            if ema > s["until_loss"]:
                print(f"warning: bootstrap phase {index} stopped at max_steps {s['max_steps']} with "
                      f"loss {ema:.3f} > until_loss {s['until_loss']}", file=sys.stderr)
        log.append(done)
    model.eval()
    return model


def run_bootstrap(spec: BootstrapSpec, out: str | Path, progress: bool = True) -> Path:
    """Train, probe and save the teacher into ``out``; the directory appears only when complete."""
    boot = spec.boot
    if spec.tokenizer != "byte":
        raise UserError("data.tokenizer: the bootstrapped teacher uses the byte tokenizer; "
                        f"got '{spec.tokenizer}'")
    check_arch(boot.model_dump(), "teacher.bootstrap.")  # built like a fresh student: the same rules
    check_seed(boot.seed, "teacher.bootstrap.seed")
    final = Path(out)
    t0 = time.monotonic()
    log: list[dict[str, Any]] = []
    model = train_teacher(spec, log, progress=progress)
    train_s = time.monotonic() - t0
    t1 = time.monotonic()
    probes = probe_teacher(model, spec.synthetic, spec.doc_len, boot.probe.lengths, boot.probe.depths,
                           boot.probe.trials, boot.probe.seed)
    documents = document_loss(model, spec.synthetic, spec.doc_len,
                              max(p.window_len for p in boot.phases))
    probe_s = time.monotonic() - t1
    trained_max = max(max(_phase_settings(boot, p)["max_period"], _phase_settings(boot, p)["max_distance"])
                      for p in boot.phases)
    meta = {
        "fingerprint": fingerprint(spec.identity()),
        "config": boot.model_dump(mode="json"),
        "synthetic": spec.synthetic.model_dump(mode="json"),
        "doc_len": list(spec.doc_len),
        "rope_parameters": dict(model.config.rope_parameters),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_s, 1),
        "probe_seconds": round(probe_s, 1),
        "max_trained_copy_distance": trained_max,
        "by_distance": by_distance(probes, distance_edges(max(p.window_len for p in boot.phases))),
        "needle_accuracy": accuracy_grid(probes["needle"]),
        "needle_token_accuracy": accuracy_grid(probes["needle"], "token_acc"),
        "passkey_accuracy": accuracy_grid(probes["passkey"]),
        "documents": documents,
        **probes,
        "log": log,
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    with atomic_dir(final, "bootstrap") as tmp:
        model.save_pretrained(tmp)
        build_byte_tokenizer().save_pretrained(tmp)
        save_heatmap({"name": heatmap_title(boot, trained_max), "tasks": probes}, tmp / HEATMAP_FILE)
        atomic_write_json(tmp / META_FILE, meta)
    return final


def summary_lines(meta: dict[str, Any]) -> Iterator[str]:
    """The by-distance scores and a short table of the needle grid, for the terminal."""
    bd = meta.get("by_distance")
    if bd:
        for task in ("needle", "passkey"):
            yield f"{task} exact / token acc by distance: " + ", ".join(
                f"{c['bucket']} {c['exact']:.2f} / {c['token_acc']:.2f} (n={c['probes']})"
                for c in bd.get(task, []) if c["probes"])
    for title, key in (("needle exact match", "needle_accuracy"),
                       ("needle per-token accuracy", "needle_token_accuracy")):
        grid = meta[key]
        lengths = sorted(grid, key=int)
        yield f"{title} (rows: depth, columns: length)"
        yield "depth  " + " ".join(f"{L:>6}" for L in lengths)
        for d in grid[lengths[0]]:
            yield f"{d:>5}  " + " ".join(f"{grid[L][d]:>6.2f}" for L in lengths)


def markdown_tables(meta: dict[str, Any]) -> str:
    """bootstrap.json's grids as Markdown (rows: depth, columns: length, distance in brackets),
    so the numbers in docs/teacher.md are pasted from a run, never typed by hand."""
    bands = meta["config"].get("holdout_distances", [])
    out = []
    for title, task, metric in (("needle exact match", "needle", "exact"),
                                ("needle per-token accuracy (teacher forcing)", "needle", "token_acc"),
                                ("passkey exact match", "passkey", "exact")):
        g = meta[task]
        out += [f"**{title}**", "", "| depth | " + " | ".join(map(str, g["lengths"])) + " |",
                "|---|" + "---|" * len(g["lengths"])]
        for d, values, far in zip(g["depths"], g[metric], g["distance"]):
            cells = [f"{v:.2f} ({f:.0f})" for v, f in zip(values, far)]
            cells = [f"*{c}*" if any(lo <= f <= hi for lo, hi in bands) else c for c, f in zip(cells, far)]
            out.append(f"| {d:g} | " + " | ".join(cells) + " |")
        out.append("")
    if bands:
        out.append(f"(distance to the needle in brackets; *italic*: inside a held-out band {bands}, "
                   "never a copy distance in training)")
    return "\n".join(out)


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / META_FILE
    if not p.is_file():
        raise UserError(f"{p}: not found (not a bootstrapped teacher directory)")
    return json.loads(p.read_text())


__all__ = [
    "periodic_row", "spans_row", "needle_row", "formats_row", "retrieval_row", "DistanceSampler", "PhaseSampler", "probe_teacher",
    "document_loss", "train_teacher", "run_bootstrap", "accuracy_grid", "summary_lines", "markdown_tables",
    "read_meta",
]
