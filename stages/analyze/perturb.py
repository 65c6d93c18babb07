"""The seed paper's positional probe: perturb the positions attention sees, trace the change.

Input: windows of packed repeated token sequences (each a BOS, then a random sequence of
in-distribution tokens repeated ``repeats`` times), so every position in a later copy can
be predicted by looking back one period. Positions are 0..L-1 across the window.

Perturbation (``analyze.perturb.target``), chosen so that delta = 0 is exactly the clean run:
  query  every query in the chosen layers is rotated by ``R(delta)`` before RoPE, so it is
         rotated as if it sat at ``t + delta``; RoPE scores depend on the query-key offset
         only, so every attention distance grows by delta while keys, values and the
         causal mask stay put. (Shifting all positions by delta would change nothing.)
  key    the same for keys: every distance shrinks by delta.
  gap    the position ids of the window's second half jump by delta (``t + delta`` for
         ``t >= L/2``, the mask stays causal): distances across the middle grow by delta.
The rotation is applied to the output of ``q_proj`` / ``k_proj`` (or of ``q_norm`` /
``k_norm`` where a model normalises per head before RoPE), i.e. exactly where RoPE's input is.

Traced per layer l (0 = embeddings, l = output of decoder layer l), averaged over positions:
  hidden_rel  ||h'_l - h_l|| / ||h_l||
  kl          KL(p_l || p'_l) of the read-out ``lm_head(norm(h_l))`` (a logit lens; at the
              last layer this is the model's output distribution). Tiled over positions.
Both also over the copy positions only (where retrieval happens), plus the next-token
accuracy on copy positions, clean and perturbed.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.atomic import atomic_dir
from pipeline.config import PerturbConfig
from pipeline.errors import UserError
from pipeline.progress import Progress
from stages.analyze.rope import head_dim_of, rotate_pairs
from stages.evaluate.models import LoadedModel, load_model, model_device, split_model
from stages.evaluate.report import pyplot
from stages.evaluate.tasks import Haystack
from stages.specs import AnalyzeSpec, EvalSpec, spec_to_dict

PERTURB_JSON = "perturb.json"


# ----------------------------------------------------------------------------- probe windows


def token_pool(ev: EvalSpec, tok: Any) -> np.ndarray:
    """Token ids seen in held-out documents (specials excluded): random sequences stay in-distribution."""
    hay = Haystack(ev.data, tok, ev.pack.doc_len, ev.heldout_seed, min_tokens=1 << 16)
    special = set(getattr(tok, "all_special_ids", []) or [])
    pool = np.array(sorted(set(np.unique(hay.tokens).tolist()) - special), dtype=np.int64)
    if len(pool) < 2:
        raise UserError("analyze.perturb: the held-out documents have fewer than 2 distinct tokens")
    return pool


def repeated_window(rng: random.Random, pool: np.ndarray, window_len: int, segment_len: tuple[int, int],
                    repeats: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L], copy [L] bool): packed documents ``BOS + s * repeats``; copy marks later copies."""
    ids: list[int] = []
    copy: list[bool] = []
    while len(ids) < window_len:
        seg = [int(pool[rng.randrange(len(pool))]) for _ in range(rng.randint(*segment_len))]
        if bos is not None:
            ids.append(bos)
            copy.append(False)
        ids += seg * repeats
        copy += [False] * len(seg) + [True] * (len(seg) * (repeats - 1))
    return np.asarray(ids[:window_len], dtype=np.int64), np.asarray(copy[:window_len])


# ----------------------------------------------------------------------------- perturbation


def _check_model(model: Any) -> tuple[Any, Any]:
    body, head = split_model(model)
    for attr in ("layers", "embed_tokens", "norm", "rotary_emb"):
        if not hasattr(body, attr):
            raise UserError(f"analyze perturb: {type(model).__name__} has no '{attr}' "
                            "(a Llama-family decoder is needed)")
    return body, head


@contextlib.contextmanager
def perturbed(model: Any, target: str, delta: float, layers: list[int] | None) -> Iterator[None]:
    """Hooks that rotate queries (or keys) by ``delta`` positions in ``layers`` (all when None)."""
    if target == "gap":
        yield
        return
    body, _ = _check_model(model)
    head_dim = head_dim_of(model.config)
    inv_freq = body.rotary_emb.inv_freq.detach().double().cpu()  # [pairs], what RoPE itself uses
    name = "q" if target == "query" else "k"
    handles = []
    for i in (range(len(body.layers)) if layers is None else layers):
        attn = body.layers[i].self_attn
        mod = getattr(attn, f"{name}_norm", None)
        mod = mod if mod is not None else getattr(attn, f"{name}_proj")

        def hook(_m, _inp, out, _d=delta):
            return rotate_pairs(out, head_dim, inv_freq, _d)

        handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def positions(window_len: int, target: str, delta: float) -> torch.Tensor:
    pos = torch.arange(window_len)
    if target == "gap":
        pos = pos + int(delta) * (pos >= window_len // 2)
    return pos  # [L]


@torch.no_grad()
def trace(model: Any, ids: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states ``[L, H]`` after the embeddings and after every decoder layer."""
    body, _ = _check_model(model)
    states: list[torch.Tensor] = []

    def grab(_m, _inp, out):
        states.append((out[0] if isinstance(out, tuple) else out)[0].detach().float().clone())  # [L, H]

    hooks = [body.embed_tokens.register_forward_hook(grab)]
    hooks += [layer.register_forward_hook(grab) for layer in body.layers]
    try:
        # An explicit all-ones mask keeps attention causal across the whole row even where
        # position ids jump (HF would read a jump as a new packed document otherwise).
        body(input_ids=ids[None], position_ids=pos[None].to(ids.device),
             attention_mask=torch.ones_like(ids)[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return states


@torch.no_grad()
def _readout_logp(body: Any, head: Any, h: torch.Tensor, s: int, e: int) -> torch.Tensor:
    x = h[s:e].to(next(head.parameters()).dtype)
    # float64: the KL of a small delta (1e-9 and below) is lost to float32 round-off otherwise
    return torch.log_softmax(head(body.norm(x)).double(), dim=-1)  # [t, V]


@torch.no_grad()
def compare(model: Any, clean: list[torch.Tensor], pert: list[torch.Tensor], copy: torch.Tensor,
            ids: torch.Tensor, logit_lens: bool, tile: int) -> dict[str, list[float]]:
    """Per-layer sums over positions (all, copy) of relative change and KL; copy-accuracy counts."""
    body, head = _check_model(model)
    n = len(clean)
    out: dict[str, list[float]] = {k: [0.0] * n for k in ("hidden_rel", "hidden_rel_copy", "kl", "kl_copy")}
    L = ids.shape[0]
    target = torch.empty_like(ids)
    target[:-1] = ids[1:]
    for l_idx, (h, hp) in enumerate(zip(clean, pert)):
        norm = h.norm(dim=-1)  # [L]
        rel = (hp - h).norm(dim=-1) / norm.clamp_min(1e-12)  # [L]
        out["hidden_rel"][l_idx] = float(rel.sum())
        out["hidden_rel_copy"][l_idx] = float(rel[copy].sum())
        if l_idx == 0 or not (logit_lens or l_idx == n - 1):
            continue  # the embeddings' read-out is unchanged by construction
        for s in range(0, L, tile):
            e = min(s + tile, L)
            lp, lq = _readout_logp(body, head, h, s, e), _readout_logp(body, head, hp, s, e)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # [t]
            out["kl"][l_idx] += float(kl.sum())
            out["kl_copy"][l_idx] += float(kl[copy[s:e]].sum())
            if l_idx == n - 1:
                m = copy[s:e].clone()
                if e == L:
                    m[-1] = False  # the last position has no target in the window
                tg = target[s:e][m]
                out.setdefault("copy_hits_clean", [0.0])[0] += float((lp[m].argmax(-1) == tg).sum())
                out.setdefault("copy_hits", [0.0])[0] += float((lq[m].argmax(-1) == tg).sum())
                out.setdefault("copy_count", [0.0])[0] += float(m.sum())
    return out


def run_probe(lm: LoadedModel, spec: AnalyzeSpec, pc: PerturbConfig | None = None,
              verbose: bool = True) -> dict[str, Any]:
    """All deltas on all probe windows; numbers per delta and layer (means over positions)."""
    pc = pc or spec.analyze.perturb
    model = lm.model
    body, _ = _check_model(model)
    n_layers = len(body.layers)
    layers = None if pc.target == "gap" else pc.layers
    if layers is not None and any(not 0 <= i < n_layers for i in layers):
        raise UserError(f"analyze.perturb.layers: {layers} out of range for a model with {n_layers} layers")
    window_len = pc.window_len or spec.window_len
    seed = spec.eval.heldout_seed
    pool = token_pool(spec.eval, lm.tokenizer)
    rng = random.Random(f"{seed}-perturb")
    dev = model_device(model)
    sums: dict[int, dict[str, np.ndarray]] = {}
    n_pos = n_copy = 0
    per_window: list[list[float]] = []  # [window][delta] output KL, mean over the window's positions
    progress = Progress(f"perturb {lm.name}", pc.windows * len(pc.deltas), unit="runs", enabled=verbose)
    for _ in range(pc.windows):
        ids_np, copy_np = repeated_window(rng, pool, window_len, pc.segment_len, pc.repeats,
                                          lm.tokenizer.bos_token_id)
        ids, copy = torch.from_numpy(ids_np).to(dev), torch.from_numpy(copy_np).to(dev)
        clean = trace(model, ids, positions(window_len, pc.target, 0))
        n_pos += window_len
        n_copy += int(copy_np.sum())
        per_window.append([])
        for delta in pc.deltas:
            with perturbed(model, pc.target, delta, layers):
                pert = trace(model, ids, positions(window_len, pc.target, delta))
            res = compare(model, clean, pert, copy, ids, pc.logit_lens, spec.eval.eval.tile)
            per_window[-1].append(res["kl"][-1] / window_len)
            acc = sums.setdefault(delta, {})
            for k, v in res.items():
                acc[k] = acc.get(k, 0) + np.asarray(v, dtype=np.float64)
            del pert
            progress.update(1, window_len)
    progress.close()
    per_delta = []
    for delta in pc.deltas:
        s = sums[delta]
        row: dict[str, Any] = {"delta": delta}
        for k in ("hidden_rel", "kl"):
            row[k] = (s[k] / n_pos).tolist()
            row[k + "_copy"] = (s[k + "_copy"] / max(n_copy, 1)).tolist()
        if not pc.logit_lens:
            row["kl"] = [None] * (n_layers) + row["kl"][-1:]
            row["kl_copy"] = [None] * (n_layers) + row["kl_copy"][-1:]
        row["copy_accuracy"] = float(s["copy_hits"][0] / max(s["copy_count"][0], 1))
        row["copy_accuracy_clean"] = float(s["copy_hits_clean"][0] / max(s["copy_count"][0], 1))
        per_delta.append(row)
    return {"model": lm.name, "path": lm.path, "target": pc.target, "layers_perturbed": layers,
            # per probe window: the output KL at each delta (the units finding 2's bootstrap resamples)
            "output_kl_by_window": per_window,
            "window_len": window_len, "windows": pc.windows, "segment_len": list(pc.segment_len),
            "repeats": pc.repeats, "n_layers": n_layers, "layer_index": "0 = embeddings, l = after decoder layer l",
            "deltas": per_delta}


# ----------------------------------------------------------------------------- plots and the command


def save_plots(res: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    rows = res["deltas"]
    layers = np.arange(res["n_layers"] + 1)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, row in enumerate(rows):
        c = cmap(k / max(len(rows) - 1, 1))
        axes[0].plot(layers, row["hidden_rel"], marker="o", ms=3, color=c, label=f"δ={row['delta']}")
        kl = np.array([np.nan if v is None else v for v in row["kl"]], dtype=float)
        axes[1].plot(layers, kl, marker="o", ms=3, color=c, label=f"δ={row['delta']}")
    axes[0].set_ylabel("‖h′ − h‖ / ‖h‖ (mean over positions)")
    axes[1].set_ylabel("KL(p ‖ p′) of the layer's read-out (nats)")
    for ax in axes:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_xticks(layers)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{res['model']}: {res['target']} positions shifted by δ — change per layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "perturb.png", dpi=110)
    plt.close(fig)

    deltas = np.array([r["delta"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(deltas, [r["kl"][-1] for r in rows], marker="o", label="output KL (all positions)")
    ax.plot(deltas, [r["kl_copy"][-1] for r in rows], marker="s", label="output KL (copy positions)")
    ax.plot(deltas, [r["hidden_rel"][-1] for r in rows], marker="^", label="last hidden rel. change")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("δ (positions)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(deltas, [r["copy_accuracy"] for r in rows], color="k", ls="--", label="copy accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("next-token accuracy on copy positions")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    ax.set_title(f"{res['model']}: output change by δ ({res['target']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "perturb_by_delta.png", dpi=110)
    plt.close(fig)


def run_perturb(spec: AnalyzeSpec, model: str, out: str | Path, verbose: bool = True) -> Path:
    """``posdistill analyze perturb``: writes perturb.json, perturb.png, perturb_by_delta.png."""
    t0 = time.monotonic()
    ev = spec.eval
    lm = load_model(model, ev.eval.dtype, ev.eval.device, ev.tokenizer)
    res = run_probe(lm, spec, verbose=verbose)
    res["seconds"] = round(time.monotonic() - t0, 2)
    out = Path(out)
    with atomic_dir(out, "analyze") as tmp:
        (tmp / PERTURB_JSON).write_text(json.dumps(res, indent=2) + "\n")
        (tmp / "spec.json").write_text(json.dumps(spec_to_dict(spec), indent=2) + "\n")
        save_plots(res, tmp)
    if verbose:
        last = res["deltas"]
        print("delta  output-KL  copy-KL  last-hidden-rel  copy-acc")
        for r in last:
            print(f"{r['delta']:>5}  {r['kl'][-1]:.3e}  {r['kl_copy'][-1]:.3e}  {r['hidden_rel'][-1]:.3e}"
                  f"  {r['copy_accuracy']:.3f}")
        print(f"analyze perturb: wrote {out}")
    return out
