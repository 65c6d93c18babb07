"""Phase-wise RoPE: the theta rule, complete rope_parameters, and a rebuilt rotary embedding."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import PhaseConfig, RopeConfig
from pipeline.errors import UserError
from stages.rope import (RopeAnchor, apply_rope, auto_theta, plan_phases, rotating_pairs, scaled_theta,
                         theta_lower_bound)


def _model(theta: float = 1e4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    return LlamaForCausalLM(cfg).eval()


def test_lower_bound_matches_the_published_values():
    # Men et al. 2024 (head dim 128): 8K -> 8.4e4 (NOTES.md); the bound grows with the window.
    assert theta_lower_bound(8192, 128) == pytest.approx(8.4e4, rel=0.05)
    assert theta_lower_bound(2048, 128) < theta_lower_bound(8192, 128)


def test_critical_dimension_scaling_composes_and_keeps_the_rotating_pairs():
    direct = scaled_theta(1e4, 256, 4096)
    assert scaled_theta(scaled_theta(1e4, 256, 1024), 1024, 4096) == pytest.approx(direct, rel=1e-9)
    d = 128
    pairs = lambda theta, L: sum(2 * math.pi * theta ** (2 * i / d) <= L for i in range(d // 2))  # noqa: E731
    assert abs(pairs(direct, 4096) - pairs(1e4, 256)) <= 1
    # auto never goes below the lower bound, and grows with the window
    a = auto_theta(1024, 16, RopeAnchor(1e4, 4096))
    assert a >= theta_lower_bound(1024, 16) and auto_theta(4096, 16, RopeAnchor(a, 1024)) > a


def test_plan_gives_complete_parameters_for_every_type():
    model = _model()
    phases = [PhaseConfig(window_len=64, steps=1, rope=RopeConfig(theta=1e4)),
              PhaseConfig(window_len=256, steps=1),  # auto, anchored on phase 0
              PhaseConfig(window_len=512, steps=1, rope=RopeConfig(type="yarn")),
              PhaseConfig(window_len=1024, steps=1, rope=RopeConfig(type="llama3", factor=8.0))]
    plan = plan_phases(phases, model.config, fresh=False)
    assert plan[0] == {"rope_type": "default", "rope_theta": 1e4}
    assert plan[1]["rope_theta"] == pytest.approx(max(scaled_theta(1e4, 64, 256), theta_lower_bound(256, 16)))
    assert plan[2] == {"rope_type": "yarn", "rope_theta": plan[1]["rope_theta"], "factor": 2.0,
                       "original_max_position_embeddings": 256}
    assert plan[3]["factor"] == 8.0 and {"low_freq_factor", "high_freq_factor"} <= set(plan[3])
    for params, phase in zip(plan, phases):  # every one is accepted by transformers
        apply_rope(model, params, phase.window_len)


def test_phase_switch_rebuilds_the_rotary_frequencies():
    model = _model(1e4)
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(0))
    before_freq = model.model.rotary_emb.inv_freq.clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = apply_rope(model, {"rope_type": "default", "rope_theta": 1e6}, 4096)
    after_freq = model.model.rotary_emb.inv_freq
    expected = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    assert not torch.allclose(before_freq, after_freq)
    assert torch.allclose(after_freq, expected)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)  # the model really sees new positions
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert report.rotating_pairs == rotating_pairs(expected, 4096) and report.total_pairs == 8
    assert "frequency pairs complete a full rotation within 4096" in report.line(4096)


def test_scaling_parameters_need_a_scaling_type():
    with pytest.raises(UserError, match="need a scaling type"):
        plan_phases([PhaseConfig(window_len=64, steps=1, rope=RopeConfig(factor=2.0))], _model().config, False)
