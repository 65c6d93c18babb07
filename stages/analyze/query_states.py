"""How far did extension move the query *states* in each RoPE frequency pair?

The paper's third finding is about activations: during extension the queries change in
structured spans of the rotary spectrum. Weights alone (``query_spans``) can move without
the states moving (a change in directions the inputs never excite), so both models, before
and after extension, are run on the same held-out windows, and each layer's queries are
read where RoPE reads them (the output of ``q_norm``, else ``q_proj``, so they carry no
rotation). Per window w, layer l, head h and pair i (dims i and i + rotary/2):

    abs[w, l, h, i] = ||Q_after - Q_before||_F / sqrt(positions)
    rel[w, l, h, i] = ||Q_after - Q_before||_F / ||Q_before||_F

Pairs are classed by their wavelength under the *before* model's spectrum: a pair whose
wavelength exceeds the short window never completed a turn in pretraining, and the claim
is that those move more (``pipeline/findings.span_contrast`` tests it against a control).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from stages.analyze.query_spans import load_config_of
from stages.analyze.rope import head_dim_of, inv_freq_of, wavelengths
from stages.evaluate.models import LoadedModel, load_model, model_device, split_model
from stages.evaluate.tasks import Haystack
from stages.specs import AnalyzeSpec

STATES_JSON = "query_states.json"


@torch.no_grad()
def query_states(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder layer the pre-RoPE queries ``[L, heads, head_dim]`` (float64) of one window."""
    body, _ = split_model(model)
    hd = head_dim_of(model.config)
    out: list[torch.Tensor] = []
    hooks = []
    for layer in body.layers:
        attn = layer.self_attn
        mod = getattr(attn, "q_norm", None)
        mod = mod if mod is not None else attn.q_proj

        def grab(_m: Any, _inp: Any, o: torch.Tensor) -> None:
            out.append(o[0].detach().double().reshape(o.shape[1], -1, hd).cpu())

        hooks.append(mod.register_forward_hook(grab))
    try:
        body(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return out


def pair_change(before: torch.Tensor, after: torch.Tensor, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(abs, rel) ``[heads, pairs]`` change of one layer's query states ``[L, heads, d]``."""
    half = rotary_dim // 2
    d = after - before
    num = d[..., :half].pow(2).sum(0) + d[..., half:2 * half].pow(2).sum(0)  # [heads, pairs]
    den = before[..., :half].pow(2).sum(0) + before[..., half:2 * half].pow(2).sum(0)
    return (num.sqrt() / before.shape[0] ** 0.5).numpy(), (num.sqrt() / den.sqrt().clamp_min(1e-30)).numpy()


def held_out_windows(spec: AnalyzeSpec, tok: Any, n: int, window_len: int) -> list[np.ndarray]:
    ev = spec.eval
    hay = Haystack(ev.data, tok, ev.pack.doc_len, ev.heldout_seed, min_tokens=n * window_len)
    rng = random.Random(f"{ev.heldout_seed}-query-states")
    return [np.asarray(hay.take(rng, window_len), dtype=np.int64) for _ in range(n)]


def measure(before: LoadedModel, after: LoadedModel, windows: list[np.ndarray]) -> dict[str, Any]:
    """abs / rel per window ``[W, layers, heads, pairs]`` and the wavelengths before and after."""
    cb, ca = before.model.config, after.model.config
    if head_dim_of(cb) != head_dim_of(ca) or cb.num_hidden_layers != ca.num_hidden_layers:
        raise UserError(f"analyze query states: '{before.path}' and '{after.path}' differ in shape")
    inv_b, inv_a = inv_freq_of(cb), inv_freq_of(ca)
    rot = 2 * inv_b.numel()
    abs_w, rel_w = [], []
    for ids_np in windows:
        qb = query_states(before.model, torch.from_numpy(ids_np).to(model_device(before.model)))
        qa = query_states(after.model, torch.from_numpy(ids_np).to(model_device(after.model)))
        per = [pair_change(b, a, rot) for b, a in zip(qb, qa)]
        abs_w.append(np.stack([p[0] for p in per]))
        rel_w.append(np.stack([p[1] for p in per]))
    return {"abs": np.stack(abs_w), "rel": np.stack(rel_w),
            "wavelength_before": wavelengths(inv_b).numpy(), "wavelength_after": wavelengths(inv_a).numpy()}


def run_query_states(spec: AnalyzeSpec, before: str, after: str, samples: int, window_len: int,
                     out: str | Path) -> Path:
    """Writes query_states.json: the per-window change of the query states per RoPE pair."""
    t0 = time.monotonic()
    ev = spec.eval
    load_config_of(before), load_config_of(after)  # one clear error for a non-model directory
    mb = load_model(before, ev.eval.dtype, ev.eval.device, ev.tokenizer)
    ma = load_model(after, ev.eval.dtype, ev.eval.device, ev.tokenizer)
    res = measure(mb, ma, held_out_windows(spec, ma.tokenizer, samples, window_len))
    doc = {"before": str(before), "after": str(after), "window_len": window_len, "windows": samples,
           "layout": "[window][layer][head][pair]; pair i = dims (i, i + rotary_dim/2) of a head",
           "abs": res["abs"].tolist(), "rel": res["rel"].tolist(),
           "wavelength_before": res["wavelength_before"].tolist(),
           "wavelength_after": res["wavelength_after"].tolist(), "seconds": round(time.monotonic() - t0, 2)}
    out = Path(out)
    with atomic_dir(out, "analyze") as tmp:
        (tmp / STATES_JSON).write_text(json.dumps(doc) + "\n")
    return out
