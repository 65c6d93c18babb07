"""The teacher: load a Hugging Face causal LM and turn windows into sparse targets.

``teacher.model`` is a local directory or a Hub id ``org/name[@revision]`` (``pipeline.locate``).

Two things here are shared with the student trainer and must stay the single source of
truth: ``model_inputs`` (what position ids and attention a packed window gets) and the
chunked head (``TeacherScorer``), which never materialises the ``[window_len, vocab]``
logits: the model body runs once, then the LM head, a full-vocabulary log-softmax at the
cache temperature and the top-k (or the sampling) run ``chunk_len`` positions at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import UserError
from pipeline.fingerprint import dir_identity
from pipeline.locate import hub_ref, hub_wanted, local_path, ref_identity
from stages.attention import check_backend, implementation
from stages.tokenizer import TOKENIZER_FILES
from stages.windows import position_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files whose content decides the teacher's numbers (weights, architecture, RoPE parameters,
# remote code). Tokenizer files are covered by the tokenizer identity instead.
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".json", ".py", ".pt", ".gguf")


# ----------------------------------------------------------------------------- inputs


def model_inputs(input_ids: torch.Tensor, doc_starts: list[list[int]], mode: str) -> dict[str, Any]:
    """Keyword arguments for ``model(...)`` / ``model.model(...)`` for a batch of packed windows.

    input_ids: [B, L]. ``cross_doc``: plain causal attention, positions 0..L-1.
    ``doc_masked``: positions restart at every document start and a document attends only
    to itself. transformers (5.x) derives that block-diagonal causal mask from restarting
    ``position_ids`` when ``attention_mask`` is None and no KV cache is used (so never pass
    an attention mask here); tests/test_teacher.py checks it against running each document
    alone, for the eager and sdpa attention implementations.
    """
    if mode not in ("cross_doc", "doc_masked"):
        raise UserError(f"pack.mode: unknown packing mode '{mode}'")
    if input_ids.dim() != 2 or len(doc_starts) != input_ids.shape[0]:
        raise ValueError(f"input_ids must be [B, L] with one doc_starts list per row, got "
                         f"{tuple(input_ids.shape)} and {len(doc_starts)} lists")
    B, L = input_ids.shape
    pos = np.stack([position_ids(list(s), L, mode) for s in doc_starts])  # [B, L]
    return {
        "input_ids": input_ids,
        "position_ids": torch.from_numpy(pos).to(input_ids.device),
        "use_cache": False,
    }


# ----------------------------------------------------------------------------- loading


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_weight_files(model: str) -> None:
    """Refuse a teacher directory whose weights are missing, truncated or not parseable, before
    any Ray worker starts loading it: the header of every safetensors file must parse and its
    tensors must end exactly at the end of the file (a copy cut short fails here, not as a
    traceback inside an actor)."""
    import json
    import struct

    root = local_path(model, "teacher.model", "model")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"teacher.model: {index} is not a safetensors index ({err})") from None
        missing = [w for w in wanted if not (root / w).is_file()]
        if missing:
            raise UserError(f"teacher.model: {index} names weight files that are missing: {', '.join(missing[:4])}")
    if not files:
        raise UserError(f"teacher.model: '{model}' has no weights (no *.safetensors or pytorch_model*.bin)")
    for f in files:
        if f.suffix != ".safetensors":
            continue
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise UserError(f"teacher.model: {f} is not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                raise UserError(f"teacher.model: {f} is corrupt (its safetensors header does not parse)") from None
        if 8 + n + end != size:
            raise UserError(f"teacher.model: {f} is truncated or padded: {size} bytes, its header says "
                            f"{8 + n + end}")


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """A NaN or inf anywhere in the weights makes every target it touches NaN; refuse it at
    load (naming the tensors) instead of caching garbage."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        raise UserError(f"teacher.model: {where} has non-finite weights (NaN/inf) in {len(bad)} tensor(s): "
                        + ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else ""))


def teacher_identity(tcfg: TeacherConfig) -> dict[str, Any]:
    """What of the teacher changes cached numbers: its weights and config files, and dtype."""
    if not tcfg.model:
        raise UserError("teacher.model: no teacher given (a Hugging Face model directory or Hub id)")
    path = teacher_dir(tcfg)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"teacher.model: '{tcfg.model}' is not a Hugging Face model directory "
                        f"(no config.json)")
    hub = hub_ref(tcfg.model)
    files = [f for f in dir_identity(path)
             if f["name"].endswith(_IDENTITY_SUFFIXES) and Path(f["name"]).name not in TOKENIZER_FILES
             and (hub is None or hub_wanted(f["name"], "model", tcfg.trust_remote_code))]
    ident = {"files": files, "dtype": tcfg.dtype, "trust_remote_code": tcfg.trust_remote_code}
    return ident if hub is None else {**ident, **ref_identity(tcfg.model, "teacher.model", "model")}


def teacher_dir(tcfg: TeacherConfig) -> Path:
    """The local directory of ``teacher.model`` (a Hub id is fetched into the Hub cache)."""
    return local_path(tcfg.model, "teacher.model", "model", remote_code=bool(tcfg.trust_remote_code))


def load_teacher(tcfg: TeacherConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """AutoModelForCausalLM from ``teacher.model`` (a local directory, or a Hub id fetched into
    the Hub cache first), in ``teacher.dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    teacher_identity(tcfg)  # validates the path with a clear message
    kwargs: dict[str, Any] = {"dtype": DTYPES[tcfg.dtype], "local_files_only": True,
                              "trust_remote_code": bool(tcfg.trust_remote_code)}
    check_backend(tcfg.attn_implementation, "teacher.attn_implementation", str(device))
    kwargs["attn_implementation"] = implementation(tcfg.attn_implementation)
    check_weight_files(tcfg.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(teacher_dir(tcfg)), **kwargs)
    except Exception as err:  # OSError, ValueError, safetensors' SafetensorError, torch's unpickling errors
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"teacher.model: cannot load '{tcfg.model}': {first}") from None
    check_finite_weights(model, f"'{tcfg.model}' (as {tcfg.dtype})")
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings()
    if body is None or head is None or body is model:
        raise UserError(f"teacher.model: {type(model).__name__} has no separate body and LM head; "
                        "only causal LMs of the usual <body> + lm_head layout are supported")
    return body, head


# ----------------------------------------------------------------------------- scoring


def sample_uniforms(seed: int, window_id: int, window_len: int, samples: int) -> torch.Tensor:
    """[L, S] uniforms for one window, fixed by (seed, window_id) alone: a retried or
    re-chunked shard draws exactly the same samples."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(window_id)) % (2**63 - 1))
    return torch.rand(window_len, samples, generator=g, dtype=torch.float64)


class TeacherScorer:
    """Sparse teacher targets for batches of windows.

    ``kind == "topk"``: the k most likely ids per position and their log-probs (the tail
    mass is ``1 - sum(exp(logp))``). ``kind == "sampled"``: ``samples`` i.i.d. draws per
    position from the full teacher distribution (inverse-CDF sampling, exact up to float
    rounding), stored as distinct ids with their counts and teacher log-probs; padding slots
    have count 0 and repeat the first slot's id and log-prob.
    """

    def __init__(self, model: torch.nn.Module, *, kind: str, k: int, samples: int, temperature: float,
                 chunk_len: int, seed: int = 0):
        self.model = model
        self.body, self.head = _body_and_head(model)
        self.kind, self.k, self.samples = kind, k, samples
        self.temperature = float(temperature)
        self.chunk_len = chunk_len
        self.seed = seed
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.device = next(model.parameters()).device
        vocab = self.head.weight.shape[0]
        # Slots per position: k, or the most distinct ids ``samples`` draws can give.
        self.width = min(k if kind == "topk" else samples, vocab)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, c, H] -> float32 logits [B, c, V] (the only vocab-sized tensor)."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check_head(self) -> None:
        """Refuse an architecture whose forward transforms logits in a way we do not replicate."""
        ids = torch.arange(8, device=self.device).unsqueeze(0) % self.head.weight.shape[0]
        inputs = model_inputs(ids, [[0]], "cross_doc")
        with torch.no_grad():
            full = self.model(**inputs).logits.float()
            ours = self._logits(self.body(**inputs).last_hidden_state)
        if not torch.isfinite(full).all():
            raise UserError(f"teacher.model: gives non-finite logits on a probe input although its weights are "
                            f"finite (an overflow in {next(self.model.parameters()).dtype}? try teacher.dtype: "
                            "float32 or bfloat16)")
        if not torch.allclose(full, ours, rtol=1e-3, atol=1e-3):
            raise UserError(f"teacher.model: {type(self.model).__name__} post-processes its logits in a way the "
                            "chunked top-k does not replicate (max diff "
                            f"{(full - ours).abs().max().item():.3g}); this architecture is not supported")

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, doc_starts: list[list[int]], mode: str,
              window_ids: list[int] | None = None) -> dict[str, torch.Tensor | None]:
        """input_ids [B, L] -> ids int32 [B, L, m], logp float32 [B, L, m], counts int16 [B, L, m] | None."""
        return self.select(self.hidden(input_ids, doc_starts, mode), window_ids)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, doc_starts: list[list[int]], mode: str) -> torch.Tensor:
        """The teacher body's final hidden states [B, L, H]: the forward, without the head."""
        input_ids = input_ids.to(self.device)
        return self.body(**model_inputs(input_ids, doc_starts, mode)).last_hidden_state

    @torch.no_grad()
    def select(self, hidden: torch.Tensor, window_ids: list[int] | None = None) -> dict[str, torch.Tensor | None]:
        """Final hidden states [B, L, H] -> the sparse targets, one sequence chunk of logits at a time.

        Separate from ``hidden`` so a cache worker can select batch b on one thread while
        the teacher computes batch b+1 on another."""
        B, L = hidden.shape[:2]
        m = self.width
        ids = torch.empty(B, L, m, dtype=torch.int32)
        logp = torch.empty(B, L, m, dtype=torch.float32)
        counts = torch.empty(B, L, m, dtype=torch.int16) if self.kind == "sampled" else None
        if self.kind == "sampled":
            if window_ids is None:
                raise ValueError("sampled scoring needs window_ids (they seed the draws)")
            uniforms = torch.stack([sample_uniforms(self.seed, w, L, self.samples) for w in window_ids])  # [B, L, S]
        for s in range(0, L, self.chunk_len):
            e = min(L, s + self.chunk_len)
            z = self._logits(hidden[:, s:e])  # [B, c, V]
            if self.temperature != 1.0:
                z.div_(self.temperature)
            if self.kind == "topk":
                # log p = z - logsumexp(z): the top-k of z are those of log p, and the
                # normaliser is a reduction, so no second [B, c, V] tensor is written.
                lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [B, c, 1]
                v, i = torch.topk(z, m, dim=-1)  # [B, c, k], sorted by log-prob
                ids[:, s:e], logp[:, s:e] = i.int().cpu(), (v - lse).cpu()
                _check_finite(logp[:, s:e], s, window_ids)
                continue
            lp = torch.log_softmax(z, dim=-1)  # [B, c, V]
            del z
            cdf = torch.cumsum(lp.exp(), dim=-1)  # [B, c, V]
            cdf_len = cdf.shape[-1]
            u = uniforms[:, s:e].to(self.device, torch.float32) * cdf[..., -1:]  # [B, c, S]
            draws = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=cdf.shape[-1] - 1)
            del cdf
            hist = torch.zeros(lp.shape, dtype=torch.int32, device=lp.device)
            hist.scatter_add_(-1, draws, torch.ones_like(draws, dtype=torch.int32))  # [B, c, V]
            cnt, i = torch.topk(hist, m, dim=-1)  # the distinct ids, then zero-count padding
            del hist
            # Deterministic slot order whatever topk does with ties: ids ascending, padding last.
            order = torch.argsort(torch.where(cnt > 0, i, i + cdf_len), dim=-1)
            cnt, i = torch.gather(cnt, -1, order), torch.gather(i, -1, order)
            i = torch.where(cnt > 0, i, i[..., :1])
            ids[:, s:e] = i.int().cpu()
            logp[:, s:e] = torch.gather(lp, -1, i).cpu()
            _check_finite(logp[:, s:e], s, window_ids)
            counts[:, s:e] = cnt.to(torch.int16).cpu()
        return {"ids": ids, "logp": logp, "counts": counts}


class NonFiniteTargets(UserError):
    """The teacher produced NaN/inf log-probs: deterministic, so a retry would only repeat it."""


def _check_finite(logp: torch.Tensor, offset: int, window_ids: list[int] | None) -> None:
    """Fail at the first non-finite log-prob, naming its window and position: a NaN target
    would otherwise be cached, verified and trained on without a word."""
    bad = ~torch.isfinite(logp)
    if bool(bad.any()):
        b, pos, _ = (int(x) for x in bad.nonzero()[0])
        window = window_ids[b] if window_ids is not None else f"#{b} of the batch"
        raise NonFiniteTargets(f"cache: teacher log-probs are {logp[b, pos][bad[b, pos]][0].item()} at window "
                               f"{window}, position {offset + pos} ({int(bad.sum())} non-finite values in this "
                               "chunk); the teacher overflows or its weights are bad")
