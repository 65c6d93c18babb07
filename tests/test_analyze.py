"""Analyses: RoPE pair layout, positional perturbation and query-span updates, on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.config import parse_config
from pipeline.resolve import analyze_spec
from stages.analyze.perturb import perturbed, positions, repeated_window, run_probe, trace
from stages.analyze.query_spans import analyze_spans, find_spans, pair_updates
from stages.analyze.rope import inv_freq_of, rope_pairs, rotate_pairs
from stages.evaluate.models import LoadedModel
from stages.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer


def tiny_llama(seed: int = 0, layers: int = 3, theta: float = 100.0, kv_heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": theta}, bos_token_id=257)
    return LlamaForCausalLM(cfg).eval()


def make_cfg(tmp_path, **perturb):
    pc = {"deltas": [0, 4, 64], "windows": 1, "window_len": 96, "segment_len": [8, 24]}
    pc.update(perturb)
    return parse_config({
        "run": {"out_dir": str(tmp_path / "run"), "seed": 1},
        "data": {"source": "synthetic", "tokenizer": "byte", "synthetic": {"num_docs": 50}},
        "pack": {"window_len": 128, "doc_len": [16, 48]},
        "eval": {"tile": 40},
        "analyze": {"perturb": pc},
    })


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def lm(model):
    return LoadedModel("tiny", model, build_byte_tokenizer())


# ----------------------------------------------------------------------------- RoPE layout


def test_pairs_are_hf_rotation_planes():
    """Pair i = dims (i, i + d/2): HF's RoPE keeps a vector on those two dims there, and
    rotating it by delta first equals RoPE at position t + delta."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    m = tiny_llama(layers=1)
    rot = LlamaRotaryEmbedding(m.config)
    d = 16
    pairs = rope_pairs(d)
    assert pairs[3].tolist() == [3, 11] and pairs.shape == (8, 2)
    t, delta = 37, 11
    x = torch.zeros(1, 1, 1, d)  # [B, heads, T, d]
    x[..., pairs[3]] = torch.tensor([0.6, -1.3])
    cos, sin = rot(x, torch.tensor([[t]]))
    y, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.count_nonzero(y[..., [i for i in range(d) if i not in (3, 11)]]) == 0
    v = torch.randn(1, 1, 1, d)
    cos2, sin2 = rot(v, torch.tensor([[t + delta]]))
    shifted, _ = apply_rotary_pos_emb(rotate_pairs(v, d, rot.inv_freq.double(), delta), v, cos, sin)
    direct, _ = apply_rotary_pos_emb(v, v, cos2, sin2)
    assert torch.allclose(shifted, direct, atol=1e-5)
    assert torch.equal(rotate_pairs(v, d, rot.inv_freq.double(), 0), v)  # identity at delta 0
    assert torch.allclose(inv_freq_of(m.config).float(), rot.inv_freq)


# ----------------------------------------------------------------------------- perturbation


def test_repeated_window_layout():
    import random

    pool = np.arange(97, 123)
    ids, copy = repeated_window(random.Random(0), pool, 200, (5, 9), 3, bos=257)
    assert ids.shape == copy.shape == (200,) and ids[0] == 257
    starts = np.flatnonzero(ids == 257)
    seg = ids[1:starts[1]]
    p = len(seg) // 3
    assert np.array_equal(seg[:p], seg[p:2 * p]) and not copy[1:1 + p].any() and copy[1 + p:starts[1]].all()


def test_zero_delta_gives_exactly_zero_change(lm, tmp_path):
    cfg = make_cfg(tmp_path)
    res = run_probe(lm, analyze_spec(cfg), verbose=False)
    rows = {r["delta"]: r for r in res["deltas"]}
    assert len(rows[0]["hidden_rel"]) == res["n_layers"] + 1 == 4
    for key in ("hidden_rel", "hidden_rel_copy", "kl", "kl_copy"):
        assert all(v == 0.0 for v in rows[0][key]), (key, rows[0][key])
    assert rows[0]["copy_accuracy"] == rows[0]["copy_accuracy_clean"]
    for delta in (4, 64):
        assert rows[delta]["hidden_rel"][0] == 0.0  # embeddings are not touched by positions
        assert all(v > 1e-6 for v in rows[delta]["hidden_rel"][1:])
        assert rows[delta]["kl"][-1] > 0


def test_perturbing_one_layer_leaves_earlier_layers_alone(lm, tmp_path):
    cfg = make_cfg(tmp_path, layers=[1], deltas=[0, 8])
    res = run_probe(lm, analyze_spec(cfg), verbose=False)
    hr = res["deltas"][1]["hidden_rel"]
    assert hr[0] == 0.0 and hr[1] == 0.0  # embeddings, layer 0
    assert hr[2] > 1e-6 and hr[3] > 1e-6  # layer 1 is perturbed, layer 2 inherits it


def test_query_plus_delta_equals_key_minus_delta(model):
    """Attention sees only q_pos - k_pos: queries at t + d and keys at s - d are the same
    perturbation. This fails if the rotation planes were paired wrongly."""
    ids = torch.randint(97, 123, (64,))
    pos = positions(64, "query", 0)
    clean = trace(model, ids, pos)[-1]
    with perturbed(model, "query", 9, None):
        q = trace(model, ids, pos)[-1]
    with perturbed(model, "key", -9, None):
        k = trace(model, ids, pos)[-1]
    assert torch.allclose(q, k, atol=1e-4, rtol=1e-4)
    assert (q - clean).norm() / clean.norm() > 1e-3


def test_gap_moves_only_the_second_half(model):
    ids = torch.randint(97, 123, (64,))
    clean = trace(model, ids, positions(64, "gap", 0))[-1]
    gap = trace(model, ids, positions(64, "gap", 16))[-1]
    assert torch.allclose(clean[:32], gap[:32], atol=1e-5)
    assert (clean[32:] - gap[32:]).norm() / clean[32:].norm() > 1e-3
    assert torch.equal(trace(model, ids, positions(64, "gap", 0))[-1], clean)


def test_perturb_cli_writes_json_and_plots(tmp_path):
    from pipeline.cli import cli

    d = tmp_path / "m"
    tiny_llama(layers=2).save_pretrained(d)
    cfg = make_cfg(tmp_path, target="gap", deltas=[0, 32])
    p = tmp_path / "cfg.json"
    p.write_text(cfg.to_json())
    res = CliRunner().invoke(cli, ["analyze", "perturb", str(p), "--model", str(d)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "run" / "analyze" / "perturb-m"
    rep = json.loads((out / "perturb.json").read_text())
    assert rep["target"] == "gap" and [r["delta"] for r in rep["deltas"]] == [0, 32]
    assert rep["deltas"][0]["kl"][-1] == 0.0 and rep["deltas"][1]["kl"][-1] > 0
    assert (out / "perturb.png").is_file() and (out / "perturb_by_delta.png").is_file()


# ----------------------------------------------------------------------------- query spans


def test_pair_updates_follow_rotate_half_rows():
    d, hidden, heads = 16, 32, 2
    wb = torch.randn(heads * d, hidden)
    wa = wb.clone()
    wa[1 * d + 5] += 0.5  # head 1, row 5: pair 5 ...
    wa[1 * d + 5 + d // 2] += 0.5  # ... and its partner row 13
    rel = pair_updates(wb, wa, d, d)
    assert rel.shape == (heads, d // 2)
    nz = np.argwhere(rel > 0)
    assert nz.tolist() == [[1, 5]]


def test_identical_checkpoints_give_zero_and_updates_are_found(tmp_path):
    from pipeline.cli import cli

    before, after, same = tmp_path / "before", tmp_path / "after", tmp_path / "same"
    m = tiny_llama(layers=2, kv_heads=2)
    m.save_pretrained(before)
    m.save_pretrained(same)
    with torch.no_grad():  # move the slow pairs (the last 3 of 8) of layer 1, all heads
        q = m.model.layers[1].self_attn.q_proj.weight.view(4, 16, 64)
        q[:, [5, 6, 7, 13, 14, 15]] *= 1.5
    m.config.rope_parameters = {"rope_type": "default", "rope_theta": 1000.0}
    m.save_pretrained(after)

    res = analyze_spans(before, same, [32, 128])
    for proj in ("q", "k"):
        assert res[proj]["max"] == 0.0 and res[proj]["spans"] == []
    assert np.asarray(res["k"]["rel"]).shape == (2, 2, 8)  # GQA: 2 key heads

    res = analyze_spans(before, after, [32, 128])
    rel = np.asarray(res["q"]["rel"])
    assert np.allclose(rel[1, :, 5:], 0.5) and rel[0].max() == 0 and rel[1, :, :5].max() == 0
    assert res["q"]["spans"][0]["layer"] == 1 and res["q"]["spans"][0]["pairs"] == [5, 7]
    assert res["k"]["max"] == 0.0
    wl = res["wavelength_after"]  # theta 1000, d 16: 2 pi * 1000^(2i/16)
    assert wl[0] == pytest.approx(2 * np.pi) and wl[-1] == pytest.approx(2 * np.pi * 1000 ** (14 / 16))
    assert res["q"]["bands_ranked"][0] == "λ ≥ 128"

    r = CliRunner().invoke(cli, ["analyze", "query-spans", "--before", str(before), "--after", str(after),
                                 "--windows", "32,128", "--out", str(tmp_path / "qs")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "qs" / "query_spans.png").is_file()
    assert json.loads((tmp_path / "qs" / "query_spans.json").read_text())["windows"] == [32, 128]


def test_find_spans():
    assert find_spans(np.zeros(8)) == []
    assert find_spans(np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 1.0, 0, 0])) == [(2, 3), (9, 9)]


# ----------------------------------------------------------------------------- findings 2 and 3 inputs


def test_fractional_deltas_and_one_layer_by_default(lm, tmp_path):
    """The default perturbs only the first layer (so its spread is traced) with small deltas;
    a fractional delta changes the output less than a whole one, and each window's output
    KL is recorded (finding 2's units). A gap refuses fractions."""
    cfg = make_cfg(tmp_path, deltas=[0, 0.25, 1], windows=2)
    assert cfg.analyze.perturb.layers == [0]
    res = run_probe(lm, analyze_spec(cfg), verbose=False)
    per_window = np.asarray(res["output_kl_by_window"])
    assert per_window.shape == (2, 3) and np.all(per_window[:, 0] == 0)
    assert np.all(per_window[:, 1] > 0) and np.all(per_window[:, 1] < per_window[:, 2])
    assert np.isclose(per_window.mean(0)[2], res["deltas"][2]["kl"][-1])
    with pytest.raises(Exception, match="whole offsets"):
        make_cfg(tmp_path, target="gap", deltas=[0, 0.5])


def test_query_states_see_only_what_moved(tmp_path):
    """Before == after gives exactly zero; scaling W_q's rows of the long-wavelength pairs
    moves those pairs' states and leaves every other pair's states at exactly zero."""
    from pipeline.findings import span_contrast
    from stages.analyze.query_states import measure

    tok = build_byte_tokenizer()
    before = tiny_llama(layers=2, theta=10000.0)
    after = tiny_llama(layers=2, theta=10000.0)
    ids = [np.random.default_rng(0).integers(0, 256, 64)]
    same = measure(LoadedModel("b", before, tok), LoadedModel("a", after, tok), ids)
    assert np.all(same["rel"] == 0) and same["rel"].shape == (1, 2, 4, 8)
    wl = same["wavelength_before"]
    long = np.flatnonzero(wl > 64)
    assert 0 < len(long) < 8
    with torch.no_grad():
        q = after.model.layers[0].self_attn.q_proj.weight.view(4, 16, 64)
        q[:, long] *= 1.5
        q[:, long + 8] *= 1.5
    moved = measure(LoadedModel("b", before, tok), LoadedModel("a", after, tok), ids)
    rel = moved["rel"][0, 0]  # layer 0: [heads, pairs]
    assert np.allclose(rel[:, long], 0.5) and np.all(rel[:, np.setdiff1d(np.arange(8), long)] == 0)
    assert span_contrast(moved["rel"], wl, 64)[0] > 0 and span_contrast(same["rel"], wl, 64)[0] == 0
    assert len(span_contrast(moved["rel"], wl, 1)) == 0  # every pair long: no contrast to draw
