"""``posdistill eval``: teacher and students scored side by side on the same probes."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from pipeline.progress import Progress
from stages.evaluate.loss_by_position import loss_by_position
from stages.evaluate.models import LoadedModel, load_model, unique_names
from stages.evaluate.report import effective_length, markdown_table, safe_name, save_heatmap, save_loss_plot
from stages.evaluate.retrieval import grid, score_probes
from stages.evaluate.tasks import Haystack, Probe, build_probes, encode
from stages.specs import EvalSpec, spec_to_dict

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


def _tokenizer_key(tok: Any) -> tuple:
    """Two tokenizers with the same vocabulary and the same ids for a probe text are one."""
    return (len(tok), tuple(encode(tok, "The pass key: 01234. abcxyz")), tok.bos_token_id)


class ProbeSet:
    """Probes per tokenizer, built once and shared by every model that uses that tokenizer."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self._cache: dict[tuple, dict[str, list[Probe]]] = {}

    def get(self, tok: Any) -> dict[str, list[Probe]]:
        key = _tokenizer_key(tok)
        if key not in self._cache:
            ev, seed, data = self.spec.eval, self.spec.heldout_seed, self.spec.data
            hay = None
            if "needle" in ev.tasks:
                need = max(ev.lengths) * max(ev.trials, 4)
                hay = Haystack(data, tok, self.spec.pack.doc_len, seed, need)
            self._cache[key] = {
                t: build_probes(t, tok, ev.lengths, ev.depths, ev.trials, seed, haystack=hay,
                                alphabet=data.synthetic.alphabet)
                for t in ev.tasks}
        return self._cache[key]


def evaluate_model(spec: EvalSpec, lm: LoadedModel, probes: dict[str, list[Probe]],
                   loss_rows: list[dict] | None, verbose: bool = True) -> dict[str, Any]:
    ev = spec.eval
    total = sum(len(v) for v in probes.values())
    progress = Progress(f"eval {lm.name}", total, unit="probes", enabled=verbose)
    t0 = time.monotonic()
    result: dict[str, Any] = {"name": lm.name, "path": lm.path, "tasks": {}}
    for task, ps in probes.items():
        scores = score_probes(lm.model, ps, ev.batch_tokens, progress)
        g = grid(ps, scores, ev.lengths, ev.depths)
        # Per probe too: the report scores claims by distance, with intervals over probes.
        g["probes"] = [{"length": p.length, "depth": p.depth, "trial": p.trial, "distance": int(p.distance),
                        "exact": sc["exact"], "token_acc": sc["token_acc"]} for p, sc in zip(ps, scores)]
        g["effective_length"] = effective_length(g["lengths"], g["exact"], ev.threshold)
        result["tasks"][task] = g
    progress.close()
    if loss_rows:
        result["loss_by_position"] = loss_by_position(lm.model, loss_rows, spec.pack.mode, ev.loss_buckets, ev.tile)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def run_eval(spec: EvalSpec, models: dict[str, str] | list[str | LoadedModel], out: str | Path,
             heldout_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """Evaluate every model (name -> directory, or directories) on the same probes and on the
    first ``eval.loss_windows`` held-out windows of ``heldout_dir``; write the report to
    ``out`` all at once. Returns the output directory."""
    from stages.windows import PackedWindows

    if not models:
        raise UserError("--model: give at least one model directory")
    ev = spec.eval
    out = Path(out)
    paths = list(models.values()) if isinstance(models, dict) else list(models)
    names = list(models) if isinstance(models, dict) else unique_names(
        [m.name if isinstance(m, LoadedModel) else m for m in paths])
    probe_sets = ProbeSet(spec)

    loss_rows, data_tok_key = None, None
    if ev.loss_windows > 0 and heldout_dir is not None:
        from stages.tokenizer import load_tokenizer

        loss_rows = list(PackedWindows(heldout_dir).rows(ev.loss_windows))
        data_tok_key = _tokenizer_key(load_tokenizer(spec.data.tokenizer))

    results = []
    for m, name in zip(paths, names):
        lm = m if isinstance(m, LoadedModel) else load_model(m, ev.dtype, ev.device, spec.tokenizer, name=name)
        rows = loss_rows
        if rows and _tokenizer_key(lm.tokenizer) != data_tok_key:
            rows = None  # held-out windows are in data.tokenizer's ids, not this model's
            if verbose:
                print(f"eval: {lm.name}: its tokenizer differs from data.tokenizer; loss by position skipped")
        results.append(evaluate_model(spec, lm, probe_sets.get(lm.tokenizer), rows, verbose))
        if not isinstance(m, LoadedModel):
            del lm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    report = {
        "models": results,
        "threshold": ev.threshold,
        "heldout_seed": spec.heldout_seed,
        "loss_windows_dir": str(heldout_dir) if loss_rows else None,
        "machine": {"torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    with atomic_dir(out) as tmp:
        (tmp / EVAL_JSON).write_text(json.dumps(json_clean(report), indent=2, allow_nan=False) + "\n")
        (tmp / "spec.json").write_text(json.dumps(spec_to_dict(spec), indent=2) + "\n")
        (tmp / EVAL_MD).write_text(markdown_table(results, ev.threshold))
        for r in results:
            if r["tasks"]:
                save_heatmap(r, tmp / f"heatmap-{safe_name(r['name'])}.png")
        save_loss_plot(results, tmp / LOSS_PNG)
    if verbose:
        print((out / EVAL_MD).read_text())
        print(f"eval: wrote {out}")
    return out
