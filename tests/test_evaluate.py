"""Eval stage: probes, scoring, loss by position and the comparison report, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.config import parse_config
from pipeline.resolve import eval_spec
from stages.evaluate.models import LoadedModel
from stages.evaluate.report import effective_length
from stages.evaluate.retrieval import grid, score_probes
from stages.evaluate.run import run_eval
from stages.evaluate.tasks import Haystack, build_probes
from stages.specs import EVAL_FORMAT
from stages.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer

from helpers import InductionLM

BOS = 257


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, max_position_embeddings=1024, bos_token_id=BOS, eos_token_id=258,
                      pad_token_id=256)
    return LlamaForCausalLM(cfg).eval()


def make_cfg(tmp_path, **eval_over):
    ev = {"lengths": [64, 128], "depths": [0.0, 0.5, 1.0], "trials": 2, "loss_windows": 2,
          "loss_buckets": 4, "tile": 48}
    ev.update(eval_over)
    return parse_config({
        "run": {"out_dir": str(tmp_path / "run"), "seed": 3},
        "data": {"source": "synthetic", "tokenizer": "byte", "synthetic": {"num_docs": 200}},
        "pack": {"window_len": 128, "doc_len": [16, 48]},
        "eval": ev,
    })


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_probe_formats(tok, tmp_path):
    cfg = make_cfg(tmp_path)
    hay = Haystack(cfg.data, tok, (16, 48), seed=4, min_tokens=1000)
    for task in ("passkey", "needle"):
        probes = build_probes(task, tok, [64, 128], [0.0, 0.5, 1.0], 2, seed=4, haystack=hay)
        again = build_probes(task, tok, [64, 128], [0.0, 0.5, 1.0], 2, seed=4, haystack=hay)
        assert [p.context for p in probes] == [p.context for p in again]  # deterministic
        assert len(probes) == 2 * 3 * 2
        for p in probes:
            assert len(p.context) == p.length and p.context[0] == BOS
            text = bytes(p.context[1:]).decode("latin-1") if all(i < 256 for i in p.context[1:]) else None
            if task == "passkey":
                digits = bytes(p.answer).decode()
                assert len(digits) == 5 and digits.isdigit()
                assert text.endswith("pass key: ") and f"pass key: {digits}." in text
            else:
                assert len(p.answer) == 8
                key = p.context[-8:]
                needle = key + p.answer
                starts = [i for i in range(len(p.context)) if p.context[i:i + 16] == needle]
                assert len(starts) == 1
            # the needle sits about (1 - depth) * L before the query
            assert abs(p.distance - (1 - p.depth) * p.length) <= 0.25 * p.length + 20
        d0 = [p.distance for p in probes if p.depth == 0.0 and p.length == 128]
        d1 = [p.distance for p in probes if p.depth == 1.0 and p.length == 128]
        assert min(d0) > max(d1)


def test_needle_bookkeeping_is_exact(tok, tmp_path):
    """BOS, then the haystack with key + value at round(depth * room), then the key; the
    distance is the offset from the value's first token (p) to the last context position
    (q = length - 1, whose logits predict that token)."""
    hay = Haystack(make_cfg(tmp_path).data, tok, (16, 48), seed=4, min_tokens=1000)
    for p in build_probes("needle", tok, [100], [0.0, 0.5, 1.0], 2, seed=4, haystack=hay):
        key, room = p.context[-8:], 100 - 1 - 16 - 8
        at = 1 + round(p.depth * room)
        assert len(p.context) == 100 and p.context[0] == BOS
        assert p.context[at:at + 16] == key + p.answer
        assert p.distance == (100 - 1) - (at + 8) and p.fact_at == at + 8
        if p.depth == 0.0:  # the needle first: the farthest distance from the query
            assert p.context[1:17] == key + p.answer


def test_perfect_copier_scores_100_and_random_model_near_chance(tok, tmp_path):
    cfg = make_cfg(tmp_path)
    hay = Haystack(cfg.data, tok, (16, 48), seed=4, min_tokens=2000)
    copier, rand = InductionLM(), tiny_llama()
    for task in ("passkey", "needle"):
        probes = build_probes(task, tok, [64, 128], [0.0, 0.5, 1.0], 3, seed=4, haystack=hay)
        g = grid(probes, score_probes(copier, probes, batch_tokens=512), [64, 128], [0.0, 0.5, 1.0])
        assert np.all(np.asarray(g["exact"]) == 1.0), (task, g["exact"])
        assert np.all(np.asarray(g["rank"]) == 0.0)
        g = grid(probes, score_probes(rand, probes, batch_tokens=512), [64, 128], [0.0, 0.5, 1.0])
        assert np.mean(g["exact"]) <= 0.05
        # chance: the answer's mean rank among 260 ids is far from the top
        assert np.mean(g["rank"]) > 20
        assert np.mean(g["token_acc"]) < 0.2


def test_heatmap_shape_bounds_and_effective_length(tok, tmp_path):
    cfg = make_cfg(tmp_path, loss_windows=0)
    out = run_eval(eval_spec(cfg), [LoadedModel("copier", InductionLM(), tok)], out=tmp_path / "ev", verbose=False)
    rep = json.loads((out / "eval.json").read_text())
    g = rep["models"][0]["tasks"]["passkey"]
    ex = np.asarray(g["exact"])
    assert ex.shape == (3, 2)  # [depth, length]
    assert np.all((ex >= 0) & (ex <= 1))
    assert g["effective_length"] == 128
    assert (out / "heatmap-copier.png").stat().st_size > 1000
    assert effective_length([64, 128, 256], [[1.0, 0.9, 0.0], [1.0, 0.8, 0.1]], 0.86) == 64
    assert effective_length([64, 128], [[0.0, 0.1]], 0.85) is None


def test_eval_two_models_one_table(tmp_path):
    from pipeline.cli import cli

    tok = build_byte_tokenizer()
    dirs = []
    for i in range(2):
        d = tmp_path / f"student{i}"
        tiny_llama(seed=i).save_pretrained(d)
        if i == 0:
            tok.save_pretrained(d)  # the other falls back to data.tokenizer
        dirs.append(str(d))
    cfg = make_cfg(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    args = ["eval", str(cfg_path)] + sum((["--model", d] for d in dirs), []) + ["--out", str(tmp_path / "ev")]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "ev"
    rep = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in rep["models"]] == ["student0", "student1"]
    md = (out / "eval.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| student")]
    assert len([line for line in table if "eff. length" not in line]) >= 2
    assert md.count("| model |") == 1 + 2  # one comparison table, one per-length table per task
    for m in rep["models"]:
        lb = m["loss_by_position"]
        assert len(lb["loss"]) == len(lb["bucket_edges"]) - 1 == 4
        assert all(3.0 < x < 8.0 for x in lb["loss"])  # random model: about ln(260) = 5.56
    assert (out / "loss_by_position.png").is_file() and (out / "spec.json").is_file()
    assert (out / "heatmap-student0.png").is_file() and (out / "heatmap-student1.png").is_file()


def test_bad_model_dir_is_user_error(tmp_path):
    from pipeline.cli import main
    import sys

    cfg = make_cfg(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    argv = sys.argv
    sys.argv = ["posdistill", "eval", str(cfg_path), "--model", str(tmp_path / "nope")]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
    assert e.value.code == 2


def test_fresh_probes_per_training_seed(tok, tmp_path):
    """Seed 0 keeps the held-out seed's probes; another seed gets different ones, the same
    each time; eval.json records which probes each model saw."""
    from stages.evaluate.run import ProbeSet, probe_seed

    spec = eval_spec(make_cfg(tmp_path, loss_windows=0))
    ps = ProbeSet(spec)
    s0, s1 = ps.get(tok, 0), ps.get(tok, 1)
    hay = Haystack(spec.data, tok, spec.pack.doc_len, spec.heldout_seed,
                   max(spec.eval.lengths) * max(spec.eval.trials, 4))
    ref = build_probes("needle", tok, spec.eval.lengths, spec.eval.depths, spec.eval.trials, spec.heldout_seed,
                       haystack=hay)
    assert [p.context for p in s0["needle"]] == [p.context for p in ref]
    for task in spec.eval.tasks:
        assert [p.answer for p in s0[task]] != [p.answer for p in s1[task]]
        assert [p.context for p in ProbeSet(spec).get(tok, 1)[task]] == [p.context for p in s1[task]]
    out = run_eval(spec, [LoadedModel("a", InductionLM(), tok), LoadedModel("b", InductionLM(), tok)],
                   out=tmp_path / "ev", verbose=False, seeds={"b": 2})
    rep = {m["name"]: m for m in json.loads((out / "eval.json").read_text())["models"]}
    assert rep["a"]["probe_seed"] == spec.heldout_seed and rep["b"]["probe_seed"] == probe_seed(spec.heldout_seed, 2)
    # Each probe record carries the distance q - p and both positions (docs/eval.md, "Distance"):
    # the fact's answer token at p is where the question's last position q = length - 1 copies from.
    assert json.loads((out / "eval.json").read_text())["format"] == EVAL_FORMAT
    for task in spec.eval.tasks:
        for r, p in zip(rep["a"]["tasks"][task]["probes"], s0[task]):
            assert r["query_at"] == p.length - 1 and r["distance"] == r["query_at"] - r["fact_at"] == p.distance
            assert p.context[r["fact_at"]] == p.answer[0]
