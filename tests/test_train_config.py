"""What posdistill hands DeepSpeed: derived settings merged with the user's DeepSpeed JSON,
conflicts named, precision resolved."""

import json

import pytest

from pipeline.config import parse_config
from pipeline.errors import UserError
from stages.train.ds_config import deepspeed_config, precision
from stages.train.plan import geometry


def _train(**train):
    return parse_config({"train": {"batch_size": 8, "workers": 2, **train}}).train


def test_derived_settings_and_optimizer_keys():
    t = _train(betas=[0.8, 0.99], eps=1e-6, weight_decay=0.1, lr=1e-3)
    ds = deepspeed_config(t, geometry(t, 2), gpu=False)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1,
                                         "torch_adam": True}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}


def test_user_json_passes_through_auto_takes_ours_and_conflicts_are_named(tmp_path):
    f = tmp_path / "ds_config.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True},
                             "train_batch_size": "auto", "activation_checkpointing": {"partition_activations": True}}))
    t = _train(deepspeed={"zero_stage": 2, "config": str(f)})
    assert t.deepspeed.config["zero_optimization"]["overlap_comm"] is True  # read at load: in the fingerprint
    ds = deepspeed_config(t, geometry(t, 2), gpu=False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 8 and ds["activation_checkpointing"] == {"partition_activations": True}
    f.write_text(json.dumps({"train_batch_size": 32}))
    t = _train(deepspeed={"config": str(f)})
    with pytest.raises(UserError, match=r"train_batch_size is 32 there, but posdistill derives 8 from train.batch_size"):
        deepspeed_config(t, geometry(t, 2), gpu=False)
    t = _train(deepspeed={"zero_stage": 3, "config": {"zero_optimization": {"stage": 1}}})
    with pytest.raises(UserError, match=r"zero_optimization.stage is 1 there, but posdistill derives 3"):
        deepspeed_config(t, geometry(t, 2), gpu=False)


def test_precision():
    assert precision(_train(), gpu=False) == "fp32" and precision(_train(), gpu=True) == "bf16"
    assert precision(_train(precision="bf16"), gpu=False) == "bf16"
    with pytest.raises(UserError, match="train.precision: fp16 needs a GPU"):
        precision(_train(precision="fp16"), gpu=False)
    t = _train(precision="fp16")
    ds = deepspeed_config(t, geometry(t, 2), gpu=True)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]


@pytest.mark.slow
def test_bf16_trains_on_cpu(tmp_path):
    """train.precision: bf16 on 2 CPU ranks: DeepSpeed keeps bf16 module weights, the loss falls."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "bf16.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": "bf16", "out_dir": str(tmp_path / "run")}, "data": {"synthetic": {"num_docs": 200}},
        "pack": {"window_len": 128, "doc_len": [16, 64]},
        "student": {"name": "bf16", "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}},
        "train": {"workers": 2, "batch_size": 2, "precision": "bf16", "lr": 3e-3, "warmup_steps": 0, "save_every": 8,
                  "kd": {"alpha": 0.0}, "phases": [{"window_len": 128, "steps": 8}]}}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg)], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision bf16" in proc.stderr
    run = tmp_path / "run" / "train" / "bf16"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    from stages.train.checkpoint import weights_only_loading

    with weights_only_loading():
        states = torch.load(next((run / "checkpoints").glob("step-*/mp_rank_00_model_states.pt")))
    dtypes = {v.dtype for v in states["module"].values() if torch.is_tensor(v) and v.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes
