"""Eval outputs: ``eval.json``, a depth x length heatmap per model, one loss-by-position
plot with every model, and a Markdown comparison table.

Effective length (RULER): the longest evaluated length whose mean score over depths is at
least ``eval.threshold``; ``None`` when no length clears it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np


def effective_length(lengths: list[int], scores: list[list[float]], threshold: float) -> int | None:
    """``scores`` is ``[depth][length]``; the mean over depths is compared with the threshold."""
    means = np.nanmean(np.asarray(scores, dtype=float), axis=0) if scores else []
    passing = [L for L, m in zip(lengths, means) if m >= threshold]
    return max(passing) if passing else None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_heatmap(result: dict[str, Any], path: Path) -> None:
    """One panel per task: exact match, rows = needle depth, columns = context length."""
    plt = pyplot()
    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(1.2 + 4.2 * max(len(tasks), 1), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = result["tasks"][task]
        data = np.asarray(g["exact"], dtype=float)  # [D, L]
        im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(g["lengths"])), [str(L) for L in g["lengths"]])
        ax.set_yticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        eff = g.get("effective_length")
        ax.set_title(f"{task}: exact match (eff. length {eff if eff is not None else '-'})", fontsize=9)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(result["name"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Okabe & Ito's colour-blind-safe palette; line styles tell apart more curves than colours.
OKABE_ITO = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"]


def save_loss_plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Every model's loss-by-position curve on one axis; False when no model has one."""
    curves = [(r["name"], r["loss_by_position"]) for r in results if r.get("loss_by_position")]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, lb in curves:
        edges = np.asarray(lb["bucket_edges"], dtype=float)
        centers = (edges[:-1] + edges[1:]) / 2
        ax.plot(centers, lb["loss"], marker="o", markersize=3, label=name,
                color=OKABE_ITO[len(ax.lines) % len(OKABE_ITO)], linestyle=("-", "--", ":")[len(ax.lines) // 8 % 3])
    ax.set_xlabel("target position in the window")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(f"loss by position, held-out packed windows ({curves[0][1]['windows']} x "
                 f"{curves[0][1]['window_len']} tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(results: list[dict[str, Any]], threshold: float) -> str:
    """One comparison table (a row per model), then per task the mean exact match per length."""
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    head = ["model"]
    for t in tasks:
        head += [f"{t} exact", f"{t} eff. length"]
    head += ["loss (first bucket)", "loss (last bucket)", "mean loss"]
    lines = [f"Exact match averaged over depths and lengths; effective length = longest length whose "
             f"mean exact match >= {threshold:g}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["name"]]
        for t in tasks:
            g = r["tasks"].get(t)
            row += [_fmt(float(np.nanmean(g["exact"]))) if g else "-",
                    _fmt(g["effective_length"]) if g else "-"]
        lb = r.get("loss_by_position")
        row += [_fmt(lb["loss"][0]), _fmt(lb["loss"][-1]), _fmt(lb["mean_loss"])] if lb else ["-"] * 3
        lines.append("| " + " | ".join(row) + " |")
    for t in tasks:
        lengths = next(r["tasks"][t]["lengths"] for r in results if t in r["tasks"])
        lines += ["", f"**{t}**: mean exact match (mean answer rank) per context length", "",
                  "| model | " + " | ".join(str(L) for L in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
        for r in results:
            g = r["tasks"].get(t)
            if not g:
                continue
            ex = np.nanmean(np.asarray(g["exact"], dtype=float), axis=0)
            rk = np.nanmean(np.asarray(g["rank"], dtype=float), axis=0)
            lines.append(f"| {r['name']} | " + " | ".join(f"{e:.2f} ({k:.1f})" for e, k in zip(ex, rk)) + " |")
    return "\n".join(lines) + "\n"


def save_variant_heatmaps(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> bool:
    """One figure: a row per variant (its seeds' exact match averaged), a column per task."""
    groups = {v: rs for v, rs in groups.items() if rs and any(r["tasks"] for r in rs)}
    if not groups:
        return False
    tasks = list(dict.fromkeys(t for rs in groups.values() for r in rs for t in r["tasks"]))
    plt = pyplot()
    fig, axes = plt.subplots(len(groups), len(tasks), figsize=(1.2 + 3.6 * len(tasks), 0.6 + 2.3 * len(groups)),
                             squeeze=False)
    im = None
    for row, (variant, rs) in zip(axes, groups.items()):
        for ax, task in zip(row, tasks):
            grids = [np.asarray(r["tasks"][task]["exact"], dtype=float) for r in rs if task in r["tasks"]]
            g = next(r["tasks"][task] for r in rs if task in r["tasks"])
            data = np.mean(grids, axis=0)
            im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(g["lengths"])), [str(L) for L in g["lengths"]], fontsize=7)
            ax.set_yticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=7)
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] < 0.5 else "black")
            ax.set_title(f"{variant} ({len(grids)} seed{'s' if len(grids) > 1 else ''}): {task}", fontsize=8)
            ax.set_xlabel("context length", fontsize=7)
            ax.set_ylabel("needle depth", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.98))
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02, label="exact match")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def save_variant_loss(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> bool:
    """Loss by position per variant: the mean over its seeds, and a band from their min to max."""
    curves = {v: [r["loss_by_position"] for r in rs if r.get("loss_by_position")] for v, rs in groups.items()}
    curves = {v: c for v, c in curves.items() if c}
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for k, (variant, lbs) in enumerate(curves.items()):
        edges = np.asarray(lbs[0]["bucket_edges"], dtype=float)
        centers = (edges[:-1] + edges[1:]) / 2
        ys = np.asarray([lb["loss"] for lb in lbs], dtype=float)
        color, ls = OKABE_ITO[k % len(OKABE_ITO)], ("-", "--", ":")[k // len(OKABE_ITO) % 3]
        ax.plot(centers, ys.mean(0), color=color, linestyle=ls, marker="o", markersize=3,
                label=f"{variant} ({len(lbs)})")
        if len(lbs) > 1:
            ax.fill_between(centers, ys.min(0), ys.max(0), color=color, alpha=0.18, linewidth=0)
    ax.set_xlabel("target position in the window")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="variant (seeds); band: min–max over seeds", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
