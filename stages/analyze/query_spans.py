"""Where in the RoPE spectrum did W_q and W_k move during long-context extension?

For each layer, head and RoPE frequency pair i (rows i and i + d/2 of the head in HF's
rotate_half layout, see ``stages.analyze.rope``):

    rel[l, h, i] = ||W_after[rows] - W_before[rows]||_F / ||W_before[rows]||_F

plotted against the pair's wavelength 2 pi / theta^(-2i/d) (of the *after* model, whose
spectrum the update was trained under), with the phase windows marked: a pair whose
wavelength exceeds a window never completes a turn inside it. Windows split the spectrum
into bands (``lambda < w1``, ``w1 <= lambda < w2``, ...); the report ranks the bands by
mean update and names the contiguous runs of pairs ("spans") whose mean update over heads
stands out (at least mean + one standard deviation of that layer's profile).

Weights are read tensor by tensor from safetensors (or a ``weights_only`` torch file), so
only W_q and W_k of two checkpoints are ever in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from pipeline.locate import local_path
from stages.analyze.rope import head_dim_of, inv_freq_of, wavelengths
from stages.evaluate.report import pyplot

QK_RE = re.compile(r"layers\.(\d+)\.self_attn\.([qk])_proj\.weight$")
SPANS_JSON = "query_spans.json"


def parse_windows(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--windows: '{text}' is not a comma-separated list of integers") from None
    if not out or out[0] <= 0:
        raise UserError(f"--windows: '{text}' must list positive window lengths")
    return out


_FIELD = "analyze query-spans"  # how errors name a model given as a Hub id that cannot be fetched


def load_config_of(path: str | Path) -> Any:
    from transformers import AutoConfig

    p = local_path(path, _FIELD, "config")
    if not (p / "config.json").is_file():
        raise UserError(f"'{path}' is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)


def load_qk(path: str | Path) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, 'q'|'k'): weight [out, in] float32}`` read without loading the rest."""
    p = local_path(path, _FIELD, "model")
    out: dict[tuple[int, str], torch.Tensor] = {}
    st = sorted(p.glob("*.safetensors"))
    if st:
        from safetensors import safe_open

        for f in st:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    m = QK_RE.search(key)
                    if m:
                        out[(int(m.group(1)), m.group(2))] = fh.get_tensor(key).float()
    else:
        for f in sorted(p.glob("*.bin")):
            state = torch.load(f, map_location="cpu", weights_only=True)
            for key, t in state.items():
                m = QK_RE.search(key)
                if m:
                    out[(int(m.group(1)), m.group(2))] = t.float()
    if not out:
        raise UserError(f"'{path}': no layers.N.self_attn.q_proj/k_proj weights found (safetensors or .bin)")
    return out


def pair_updates(w_before: torch.Tensor, w_after: torch.Tensor, head_dim: int, rotary_dim: int) -> np.ndarray:
    """``[heads, pairs]`` relative update of each head's rows (i, i + rotary_dim/2)."""
    if w_before.shape != w_after.shape:
        raise UserError(f"weight shapes differ between checkpoints: {tuple(w_before.shape)} vs {tuple(w_after.shape)}")
    half = rotary_dim // 2
    wb = w_before.double().reshape(-1, head_dim, w_before.shape[-1])  # [heads, d, hidden]
    dw = (w_after.double() - w_before.double()).reshape(-1, head_dim, w_before.shape[-1])
    num = dw[:, :half].pow(2).sum(-1) + dw[:, half:2 * half].pow(2).sum(-1)  # [heads, pairs]
    den = wb[:, :half].pow(2).sum(-1) + wb[:, half:2 * half].pow(2).sum(-1)
    return (num.sqrt() / den.sqrt().clamp_min(1e-30)).numpy()


def band_names(windows: list[int]) -> list[str]:
    if not windows:
        return ["all"]
    names = [f"λ < {windows[0]}"]
    names += [f"{a} ≤ λ < {b}" for a, b in zip(windows[:-1], windows[1:])]
    return names + [f"λ ≥ {windows[-1]}"]


def band_of(wl: np.ndarray, windows: list[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(windows, dtype=float), wl, side="right")


def find_spans(profile: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of pairs at or above mean + std of the profile (nothing when all zero)."""
    if not np.any(profile > 0):
        return []
    cut = profile.mean() + profile.std()
    above = profile >= cut
    spans, start = [], None
    for i, a in enumerate(np.append(above, False)):
        if a and start is None:
            start = i
        elif not a and start is not None:
            spans.append((start, i - 1))
            start = None
    return spans


def analyze_spans(before: str | Path, after: str | Path, windows: list[int], top: int = 5) -> dict[str, Any]:
    cb, ca = load_config_of(before), load_config_of(after)
    hd = head_dim_of(ca)
    if head_dim_of(cb) != hd:
        raise UserError(f"head_dim differs: {before} has {head_dim_of(cb)}, {after} has {hd}")
    inv_a, inv_b = inv_freq_of(ca), inv_freq_of(cb)
    rot = 2 * inv_a.numel()
    wl_a, wl_b = wavelengths(inv_a).numpy(), wavelengths(inv_b).numpy()
    wb, wa = load_qk(before), load_qk(after)
    if set(wb) != set(wa):
        raise UserError(f"'{before}' and '{after}' have different attention layers")
    n_layers = 1 + max(layer for layer, _ in wa)
    bands = band_of(wl_a, windows)
    names = band_names(windows)
    res: dict[str, Any] = {"before": str(before), "after": str(after), "head_dim": hd, "rotary_dim": rot,
                           "pair_layout": "pair i = rows (i, i + rotary_dim/2) of each head (rotate_half)",
                           "windows": windows, "bands": names,
                           "wavelength_after": wl_a.tolist(), "wavelength_before": wl_b.tolist(),
                           "rope_after": dict(ca.rope_parameters or {}), "rope_before": dict(cb.rope_parameters or {})}
    for proj in ("q", "k"):
        rel = np.stack([pair_updates(wb[(l, proj)], wa[(l, proj)], hd, rot) for l in range(n_layers)])  # [L, H, P]
        prof = rel.mean(axis=1)  # [L, P]
        band_mean = [float(prof[:, bands == b].mean()) if np.any(bands == b) else None for b in range(len(names))]
        spans = []
        for l in range(n_layers):
            for a, b in find_spans(prof[l]):
                ba, bb = int(bands[a]), int(bands[b])
                spans.append({"layer": l, "pairs": [a, b], "wavelength": [float(wl_a[a]), float(wl_a[b])],
                              "mean_update": float(prof[l, a:b + 1].mean()),
                              "band": names[ba] if ba == bb else f"{names[ba]} .. {names[bb]}",
                              "top_head": int(rel[l, :, a:b + 1].mean(-1).argmax())})
        spans.sort(key=lambda s: -s["mean_update"])
        ranked = [names[i] for i in np.argsort([-(m if m is not None else -1) for m in band_mean])
                  if band_mean[i] is not None]
        res[proj] = {"rel": rel.tolist(), "band_mean": dict(zip(names, band_mean)), "bands_ranked": ranked,
                     "spans": spans[:top], "max": float(rel.max()), "mean": float(rel.mean())}
    return res


def save_plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    wl = np.asarray(res["wavelength_after"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    for col, proj in enumerate(("q", "k")):
        rel = np.asarray(res[proj]["rel"])  # [L, H, P]
        ax = axes[0, col]
        cmap = plt.get_cmap("viridis")
        for l in range(rel.shape[0]):
            c = cmap(l / max(rel.shape[0] - 1, 1))
            ax.fill_between(wl, rel[l].min(0), rel[l].max(0), color=c, alpha=0.12, lw=0)
            ax.plot(wl, rel[l].mean(0), color=c, lw=1.5, label=f"layer {l}")
        for w in res["windows"]:
            ax.axvline(w, color="r", ls="--", lw=1)
            ax.text(w, ax.get_ylim()[1], f" {w}", color="r", fontsize=7, va="top")
        ax.set_xscale("log")
        ax.set_xlabel("RoPE pair wavelength (positions)")
        ax.set_ylabel(f"‖ΔW_{proj}‖ / ‖W_{proj}‖ per pair")
        ax.set_title(f"W_{proj}: mean over heads (band: min..max over heads)", fontsize=9)
        ax.grid(alpha=0.3)
        if rel.shape[0] <= 12:
            ax.legend(fontsize=7)
        ax = axes[1, col]
        im = ax.imshow(rel.mean(1), aspect="auto", cmap="magma", origin="lower", vmin=0)
        ax.set_yticks(range(0, rel.shape[0], max(1, rel.shape[0] // 16)))
        ax.set_xlabel("pair index i (wavelength grows →)")
        ax.set_ylabel("layer")
        bands = band_of(wl, res["windows"])
        for i in np.flatnonzero(np.diff(bands)):
            ax.axvline(i + 0.5, color="c", ls="--", lw=1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"query/key update per RoPE pair: {Path(res['before']).name} → {Path(res['after']).name}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_windows(before: str | Path, after: str | Path) -> list[int]:
    """Both models' max_position_embeddings: the windows they were last trained at."""
    return sorted({int(getattr(load_config_of(p), "max_position_embeddings", 0) or 0)
                   for p in (before, after)} - {0})


def run_query_spans(before: str, after: str, windows: list[int] | None, top: int, out: str | Path,
                    verbose: bool = True) -> Path:
    """``posdistill analyze query-spans``: writes query_spans.json and query_spans.png."""
    windows = windows or default_windows(before, after)
    res = analyze_spans(before, after, windows, top)
    out = Path(out)
    with atomic_dir(out, "analyze") as tmp:
        (tmp / SPANS_JSON).write_text(json.dumps(res, indent=2) + "\n")
        save_plot(res, tmp / "query_spans.png")
    if verbose:
        for proj in ("q", "k"):
            r = res[proj]
            print(f"W_{proj}: mean relative update {r['mean']:.3e}, max {r['max']:.3e}; "
                  f"bands by update: {', '.join(r['bands_ranked'])}")
            for s in r["spans"]:
                print(f"  layer {s['layer']} pairs {s['pairs'][0]}-{s['pairs'][1]} "
                      f"(λ {s['wavelength'][0]:.0f}-{s['wavelength'][1]:.0f}, {s['band']}): "
                      f"{s['mean_update']:.3e}, most in head {s['top_head']}")
        print(f"analyze query-spans: wrote {out}")
    return out
