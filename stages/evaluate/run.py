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
from stages.specs import EVAL_FORMAT, EvalSpec, spec_to_dict

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


PROBE_SEED_STRIDE = 1000


def probe_seed(heldout_seed: int, model_seed: int) -> int:
    """The probes a model of training seed ``model_seed`` is scored on. Seed 0 (and the
    teacher) keep the held-out seed's probes; every other seed gets fresh ones, so that a
    variant's seeds sample probes as well as training runs, while students of the same seed
    across variants stay paired on the same probes."""
    return heldout_seed + PROBE_SEED_STRIDE * model_seed


class ProbeSet:
    """Probes per (tokenizer, probe seed), built once and shared by every model that uses them;
    the haystack (a pool of held-out documents) is read once per tokenizer."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec
        self._cache: dict[tuple, dict[str, list[Probe]]] = {}
        self._hay: dict[tuple, Haystack | None] = {}

    def get(self, tok: Any, model_seed: int = 0) -> dict[str, list[Probe]]:
        tkey = _tokenizer_key(tok)
        key = (tkey, model_seed)
        if key not in self._cache:
            ev, data = self.spec.eval, self.spec.data
            if tkey not in self._hay:
                need = max(ev.lengths) * max(ev.trials, 4)
                self._hay[tkey] = (Haystack(data, tok, self.spec.pack.doc_len, self.spec.heldout_seed, need)
                                   if "needle" in ev.tasks else None)
            seed = probe_seed(self.spec.heldout_seed, model_seed)
            self._cache[key] = {
                t: build_probes(t, tok, ev.lengths, ev.depths, ev.trials, seed, haystack=self._hay[tkey],
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
        # distance = query_at - fact_at (docs/eval.md, "Distance"), both recorded so it can be checked.
        g["probes"] = [{"length": p.length, "depth": p.depth, "trial": p.trial, "distance": int(p.distance),
                        "fact_at": p.fact_at, "query_at": p.length - 1,
                        "exact": sc["exact"], "token_acc": sc["token_acc"]} for p, sc in zip(ps, scores)]
        g["effective_length"] = effective_length(g["lengths"], g["exact"], ev.threshold)
        result["tasks"][task] = g
    progress.close()
    if loss_rows:
        result["loss_by_position"] = loss_by_position(lm.model, loss_rows, spec.pack.mode, ev.loss_buckets, ev.tile)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def run_eval(spec: EvalSpec, models: dict[str, str] | list[str | LoadedModel], out: str | Path,
             heldout_dir: str | Path | None = None, verbose: bool = True,
             seeds: dict[str, int] | None = None) -> Path:
    """Evaluate every model (name -> directory, or directories) on the probes of its training
    seed (``seeds``: name -> seed; absent = 0, see ``probe_seed``) and on the first
    ``eval.loss_windows`` held-out windows of ``heldout_dir``; write the report to ``out`` all
    at once. Returns the output directory."""
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
        seed = (seeds or {}).get(name, 0)
        result = evaluate_model(spec, lm, probe_sets.get(lm.tokenizer, seed), rows, verbose)
        result["probe_seed"] = probe_seed(spec.heldout_seed, seed)
        results.append(result)
        if not isinstance(m, LoadedModel):
            del lm
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    report = {
        "format": EVAL_FORMAT,
        "models": results,
        "threshold": ev.threshold,
        "heldout_seed": spec.heldout_seed,
        "loss_windows_dir": str(heldout_dir) if loss_rows else None,
        "machine": {"torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    with atomic_dir(out, "eval") as tmp:
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
