"""Teacher bootstrap: training writes a loadable HF teacher, the probe's bookkeeping is right,
and the committed tiny teacher really retrieves at the demo window."""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import pytest
import torch

from pipeline.config import SyntheticConfig, parse_config
from pipeline.errors import UserError
from pipeline.resolve import bootstrap_spec
from stages import bootstrap as B
from stages.evaluate.models import load_model
from stages.rope import apply_rope
from stages.student import fresh_model, llama_config
from stages.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer

from helpers import InductionLM

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "configs" / "teacher-tiny"


def fresh_teacher(boot, max_positions: int, seed: int = 0):
    """A teacher as train_teacher builds it, before any training."""
    return fresh_model(llama_config(boot, BYTE_VOCAB_SIZE, max_positions, build_byte_tokenizer()), seed, "sdpa")


def tiny_cfg(tmp_path: Path, **boot):
    raw = {
        "run": {"out_dir": str(tmp_path / "run")},
        "teacher": {"bootstrap": {
            "hidden_size": 32, "num_attention_heads": 2, "batch_size": 2, "threads": 1,
            "phases": [
                {"window_len": 64, "rope_theta": 10000, "steps": 3, "max_period": 16},
                {"window_len": 128, "rope_theta": 50000, "steps": 2, "batch_size": 1,
                 "mix": {"periodic": 1, "documents": 1, "needle": 1}},
            ],
            "alphabets": ["bytes", "data"],
            "probe": {"lengths": [64, 128], "depths": [0.0, 1.0], "trials": 2},
            **boot,
        }},
    }
    return parse_config(raw)


def test_few_steps_make_a_loadable_teacher_with_last_theta(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = B.run_bootstrap(bootstrap_spec(tiny_cfg(tmp_path)), tmp_path / "teacher", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.rope_parameters["rope_theta"] == 50000
    # The rotary frequencies were rebuilt for the last theta, not only the config field.
    inv = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv[1], torch.tensor(1 / 50000 ** (2 / 16)), rtol=1e-5)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("ab")["input_ids"][-2:] == [97, 98]
    meta = json.loads((out / B.META_FILE).read_text())
    assert set(meta["needle_accuracy"]) == {"64", "128"} and set(meta["passkey_accuracy"]) == {"64", "128"}
    # The probes are the eval's grids ([depth][length]), read back by the summaries.
    assert meta["needle"]["lengths"] == [64, 128] and meta["needle"]["depths"] == [0.0, 1.0]
    assert len(list(B.summary_lines(meta))) == 2 + 2 * (2 + 2)
    # Scored by distance too: buckets below the first window, then doublings up to the last.
    bd = meta["by_distance"]
    assert bd["edges"] == [0, 64, 128] and [c["bucket"] for c in bd["needle"]] == ["0-63", "64-127"]
    rows = meta["needle"]["probes"]
    assert sum(c["probes"] for c in bd["needle"]) == len(rows) == 2 * 2 * 2
    near = [r["exact"] for r in rows if r["distance"] < 64]
    assert bd["needle"][0]["exact"] == pytest.approx(np.mean(near), abs=1e-4)
    assert B.markdown_tables(meta).count("| 0 | ") == 3
    assert meta["documents"]["window"] == 128 and meta["documents"]["ce"] > 0
    assert [e["phase"] for e in meta["log"] if e.get("done")] == [0, 1]
    assert meta["max_trained_copy_distance"] == 128  # max_distance defaults to the window
    assert (out / B.HEATMAP_FILE).stat().st_size > 1000
    assert not list(tmp_path.glob(".teacher.tmp-*"))  # nothing half-written left behind


def test_apply_rope_changes_the_teachers_forward(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path).teacher.bootstrap
    model = fresh_teacher(cfg, 128).eval()
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        apply_rope(model, {"rope_type": "default", "rope_theta": 1e6}, 128)
        after = model(input_ids=ids).logits
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert not torch.allclose(before, after)


def test_probe_scores_perfect_copier_and_random_model(tmp_path: Path) -> None:
    syn = SyntheticConfig()
    oracle = B.probe_teacher(InductionLM(), syn, (64, 256), [128, 256], [0.0, 0.5, 1.0], trials=4, seed=7)
    needle = oracle["needle"]
    assert np.all(np.asarray(needle["exact"]) == 1.0) and np.all(np.asarray(needle["rank"]) == 0)
    assert needle["distance"][0][0] > needle["distance"][-1][-1]  # (128, depth 0) vs (256, depth 1)
    assert np.all(np.asarray(oracle["passkey"]["exact"]) == 1.0)
    assert B.accuracy_grid(needle) == {"128": {"0": 1.0, "0.5": 1.0, "1": 1.0},
                                       "256": {"0": 1.0, "0.5": 1.0, "1": 1.0}}

    rand = fresh_teacher(tiny_cfg(tmp_path).teacher.bootstrap, 256).eval()
    probe = B.probe_teacher(rand, syn, (64, 256), [128], [0.0, 0.5], trials=8, seed=7, tasks=("needle",))["needle"]
    assert np.all(np.asarray(probe["exact"]) == 0.0)
    assert np.all(np.asarray(probe["token_acc"]) < 0.3)


def test_periodic_row_labels_start_after_first_period() -> None:
    gen = torch.Generator().manual_seed(0)
    ids, labels = B.periodic_row(gen, 64, 5, 5, torch.arange(97, 123))
    assert torch.equal(ids[5:], ids[:-5])
    assert (labels[:5] == B.IGNORE).all() and torch.equal(labels[5:], ids[5:])


def test_training_rows_never_use_held_out_distances() -> None:
    gen = torch.Generator().manual_seed(0)
    dist = B.DistanceSampler(((40, 80),))
    draws = [dist.sample(gen, 8, 200) for _ in range(2000)]
    assert not any(40 <= d <= 80 for d in draws) and min(draws) < 20 and max(draws) > 180
    ids, labels = B.spans_row(gen, 256, (8, 16), 200, torch.arange(256), dist)
    copied = (labels != B.IGNORE).nonzero().flatten().tolist()
    assert len(copied) > 64
    # Every labelled token is a copy of an earlier token at an allowed distance.
    for t in copied:
        assert any(ids[t - d] == ids[t] for d in range(1, t + 1) if dist.allowed(d))
    hay = list(range(1000, 1300))
    for _ in range(50):
        ids, labels = B.needle_row(gen, hay, 128, 200, torch.arange(97, 123), dist, key_len=8)
        value_at = (labels != B.IGNORE).nonzero().flatten()
        assert value_at.tolist() == list(range(120, 128))
        key = ids[112:120].tolist()
        starts = [i for i in range(112) if ids[i:i + 8].tolist() == key]
        assert len(starts) == 1 and dist.allowed(120 - (starts[0] + 8))


def test_formats_rows_are_the_eval_formats_at_every_distance() -> None:
    """formats rows: the probe's needle (8 + 8 data letters amid documents) or pass key, the
    question at the end, loss on the answer only, the fact anywhere in the window; never the
    eval's own filler sentence."""
    from stages.corpus import PASSKEY_PREFIX
    from stages.evaluate.tasks import PASSKEY_FILLER

    gen = torch.Generator().manual_seed(0)
    syn = SyntheticConfig()
    docs = B.DocumentStream(syn, (32, 128), seed=0)
    letters = set(syn.alphabet.encode())
    distances = {"needle": [], "passkey": []}
    for _ in range(300):
        ids, labels = B.formats_row(gen, docs, 512, 512, B.alphabet_ids("data", syn.alphabet))
        assert ids.shape == labels.shape == (512,)
        answer_at = (labels != B.IGNORE).nonzero().flatten().tolist()
        n = len(answer_at)
        assert answer_at == list(range(512 - n, 512))
        text = bytes(i if i < 256 else 0 for i in ids.tolist())
        assert PASSKEY_FILLER.encode()[:24] not in text
        if n == 5:  # pass key: the query is the prefix, the answer five digits
            assert text[-15:-5] == PASSKEY_PREFIX.encode() and text[-5:].isdigit()
            fact = text.index(PASSKEY_PREFIX.encode() + text[-5:] + b".")
            distances["passkey"].append(512 - 5 - (fact + len(PASSKEY_PREFIX)))
        else:
            assert n == 8 and set(text[-16:]) <= letters
            fact = text.index(text[-16:])
            assert fact < 512 - 16  # the key + value earlier in the window, the key asked again
            distances["needle"].append(512 - 8 - (fact + 8))
    for task, ds in distances.items():
        assert len(ds) > 100, task
        # Every part of the window: short, middle and the needle at position 0 or 1.
        assert min(ds) < 64 and any(200 < d < 300 for d in ds) and max(ds) > 480, (task, sorted(ds)[-5:])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"phases\[0\]\.max_perod: unknown key"):
        parse_config({"teacher": {"bootstrap": {"phases": [
            {"window_len": 64, "rope_theta": 1e4, "steps": 1, "max_perod": 3}]}}})
    with pytest.raises(UserError, match=r"phases\[0\]: .*max_period 64 must be < window_len 64"):
        parse_config({"teacher": {"bootstrap": {"phases": [
            {"window_len": 64, "rope_theta": 1e4, "steps": 1, "max_period": 64}]}}})
    cfg = parse_config({"teacher": {"bootstrap": {"phases": [
        {"window_len": 64, "rope_theta": 1e4, "steps": 1}]}}})
    with pytest.raises(UserError, match="data.tokenizer"):
        B.run_bootstrap(bootstrap_spec(cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": "x"})})),
                        tmp_path / "never")


def test_committed_teacher_retrieves_at_demo_window() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(COMMITTED, device="cpu").model
    meta = B.read_meta(COMMITTED)
    assert model.config.rope_parameters["rope_theta"] == meta["rope_parameters"]["rope_theta"]
    syn = SyntheticConfig.model_validate(meta["synthetic"])
    # Depth 0 at 1024: the needle sits ~1000 tokens back, beyond every trained copy distance.
    # Depth 0.1 at 1024: the needle ~900 tokens back; 0.5: ~500, inside the held-out band.
    probe = B.probe_teacher(model, syn, tuple(meta["doc_len"]), [1024], [0.1, 0.5], trials=8, seed=2024,
                            tasks=("needle",))["needle"]
    acc = {d: row[0] for d, row in zip(probe["depths"], probe["token_acc"])}
    assert acc[0.1] >= 0.6 and acc[0.5] >= 0.5, acc  # chance is 1/26 per token
    # Informative on the demo's own documents: far below uniform over the alphabet (3.26 nats).
    docs = B.document_loss(model, syn, tuple(meta["doc_len"]), 1024, windows=2)
    assert docs["ce"] < 2.2, docs


def test_cli_bootstrap_without_section_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {out_dir: %s}\n" % (tmp_path / "run"))
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "bootstrap", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "teacher.bootstrap" in res.stderr
