"""``posdistill eval``: teacher and students scored side by side on the same probes."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_dir
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.progress import Progress
from stages.evaluate.loss_by_position import heldout_windows, loss_by_position
from stages.evaluate.models import LoadedModel, load_model, unique_names
from stages.evaluate.report import effective_length, markdown_table, safe_name, save_heatmap, save_loss_plot
from stages.evaluate.retrieval import grid, score_probes
from stages.evaluate.tasks import Haystack, Probe, build_probes, encode

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
LOSS_PNG = "loss_by_position.png"


def json_clean(obj: Any) -> Any:
    """NaN (an empty cell) becomes null: eval.json stays strict JSON."""
    if isinstance(obj, float):
        return None if obj != obj else obj
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return obj


def heldout_seed(cfg: Config) -> int:
    return cfg.eval.heldout_seed if cfg.eval.heldout_seed is not None else cfg.run.seed + 1


def _tokenizer_key(tok: Any) -> tuple:
    """Two tokenizers with the same vocabulary and the same ids for a probe text are one."""
    return (len(tok), tuple(encode(tok, "The pass key: 01234. abcxyz")), tok.bos_token_id)


class ProbeSet:
    """Probes per tokenizer, built once and shared by every model that uses that tokenizer."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._cache: dict[tuple, dict[str, list[Probe]]] = {}

    def get(self, tok: Any) -> dict[str, list[Probe]]:
        key = _tokenizer_key(tok)
        if key not in self._cache:
            ev, seed = self.cfg.eval, heldout_seed(self.cfg)
            data = ev.data or self.cfg.data
            hay = None
            if "needle" in ev.tasks:
                need = max(ev.lengths) * max(ev.trials, 4)
                hay = Haystack(data, tok, self.cfg.pack.doc_len, seed, need)
            self._cache[key] = {
                t: build_probes(t, tok, ev.lengths, ev.depths, ev.trials, seed, haystack=hay,
                                alphabet=data.synthetic.alphabet)
                for t in ev.tasks}
        return self._cache[key]


def evaluate_model(cfg: Config, lm: LoadedModel, probes: dict[str, list[Probe]],
                   loss_rows: list[dict] | None, verbose: bool = True) -> dict[str, Any]:
    ev = cfg.eval
    total = sum(len(v) for v in probes.values())
    progress = Progress(f"eval {lm.name}", total, unit="probes", enabled=verbose)
    t0 = time.monotonic()
    result: dict[str, Any] = {"name": lm.name, "path": lm.path, "tasks": {}}
    for task, ps in probes.items():
        g = grid(ps, score_probes(lm.model, ps, ev.batch_tokens, progress), ev.lengths, ev.depths)
        g["effective_length"] = effective_length(g["lengths"], g["exact"], ev.threshold)
        result["tasks"][task] = g
    progress.close()
    if loss_rows:
        result["loss_by_position"] = loss_by_position(lm.model, loss_rows, cfg.pack.mode, ev.loss_buckets, ev.tile)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def run_eval(cfg: Config, models: list[str | LoadedModel], out: str | Path | None = None,
             verbose: bool = True) -> Path:
    """Evaluate every model on the same probes and windows; write the report to ``out``
    (default ``<run.out_dir>/eval``) all at once. Returns the output directory."""
    if not models:
        raise UserError("--model: give at least one model directory")
    ev = cfg.eval
    out = Path(out) if out is not None else cfg.out_dir / "eval"
    names = unique_names([m if isinstance(m, str) else m.name for m in models])
    probe_sets = ProbeSet(cfg)

    loss_rows, pack_dir, data_tok_key = None, None, None
    if ev.loss_windows > 0:
        from stages.tokenizer import load_tokenizer

        data = ev.data or cfg.data
        window_len = ev.loss_window_len or max(ev.lengths)
        pack_dir, loss_rows = heldout_windows(cfg, window_len, ev.loss_windows, heldout_seed(cfg))
        data_tok_key = _tokenizer_key(load_tokenizer(data.tokenizer))

    results = []
    for m, name in zip(models, names):
        lm = m if isinstance(m, LoadedModel) else load_model(m, ev.dtype, ev.device, (ev.data or cfg.data).tokenizer,
                                                              name=name)
        rows = loss_rows
        if rows and _tokenizer_key(lm.tokenizer) != data_tok_key:
            rows = None  # held-out windows are in data.tokenizer's ids, not this model's
            if verbose:
                print(f"eval: {lm.name}: its tokenizer differs from data.tokenizer; loss by position skipped")
        results.append(evaluate_model(cfg, lm, probe_sets.get(lm.tokenizer), rows, verbose))
        if not isinstance(m, LoadedModel):
            del lm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    report = {
        "models": results,
        "threshold": ev.threshold,
        "heldout_seed": heldout_seed(cfg),
        "loss_windows_dir": str(pack_dir) if pack_dir else None,
        "machine": {"torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    with atomic_dir(out) as tmp:
        (tmp / EVAL_JSON).write_text(json.dumps(json_clean(report), indent=2, allow_nan=False) + "\n")
        (tmp / "config.json").write_text(cfg.to_json() + "\n")
        (tmp / EVAL_MD).write_text(markdown_table(results, ev.threshold))
        for r in results:
            if r["tasks"]:
                save_heatmap(r, tmp / f"heatmap-{safe_name(r['name'])}.png")
        save_loss_plot(results, tmp / LOSS_PNG)
    if verbose:
        print((out / EVAL_MD).read_text())
        print(f"eval: wrote {out}")
    return out
