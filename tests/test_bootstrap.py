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
    # Scored by distance too: quarters of the window, then its second half.
    bd = meta["by_distance"]
    assert bd["edges"] == [0, 32, 64, 128] and [c["bucket"] for c in bd["needle"]] == ["0-31", "32-63", "64-127"]
    rows = meta["needle"]["probes"]
    assert sum(c["probes"] for c in bd["needle"]) == len(rows) == 2 * 2 * 2
    far = [r["exact"] for r in rows if r["distance"] >= 64]
    assert far and bd["needle"][2]["exact"] == pytest.approx(np.mean(far), abs=1e-4)
    assert B.markdown_tables(meta).count("| 0 | ") == 3
    assert meta["documents"]["window"] == 128 and meta["documents"]["ce"] > 0
    assert [e["phase"] for e in meta["log"] if e.get("done")] == [0, 1]
    assert meta["max_trained_copy_distance"] == 128  # max_distance defaults to the window
    assert (out / B.HEATMAP_FILE).stat().st_size > 1000
    assert not list(tmp_path.glob(".teacher.tmp-*"))  # nothing half-written left behind


def test_continuing_a_teacher_keeps_its_function_and_grows_layers(tmp_path: Path) -> None:
    """init: the earlier teacher's weights; layers added on top start as identity blocks, so
    the grown model computes exactly what the earlier one did. Other sizes are refused."""
    from transformers import AutoModelForCausalLM

    first = B.run_bootstrap(bootstrap_spec(tiny_cfg(tmp_path)), tmp_path / "first", progress=False)
    old = AutoModelForCausalLM.from_pretrained(first, local_files_only=True).eval()
    boot = tiny_cfg(tmp_path, init=str(first), num_hidden_layers=old.config.num_hidden_layers + 1).teacher.bootstrap
    grown = fresh_teacher(boot, 128)
    B.continue_from(grown, first)
    apply_rope(grown, dict(old.config.rope_parameters), 128)
    ids = torch.randint(0, 256, (2, 96))
    with torch.no_grad():
        assert torch.allclose(grown.eval()(input_ids=ids).logits, old(input_ids=ids).logits, atol=1e-5)
    assert not torch.equal(grown.model.layers[-1].self_attn.q_proj.weight, torch.zeros(1))
    wider = fresh_teacher(tiny_cfg(tmp_path, hidden_size=48).teacher.bootstrap, 128)
    with pytest.raises(UserError, match="teacher.bootstrap.init: .* only num_hidden_layers may grow"):
        B.continue_from(wider, first)
    with pytest.raises(UserError, match="teacher.bootstrap.init: .*model.safetensors not found"):
        B.continue_from(grown, tmp_path)
    # The fingerprint reads the weights it continues from.
    other = tmp_path / "other"
    other.mkdir()
    weights = (first / "model.safetensors").read_bytes()
    (other / "model.safetensors").write_bytes(weights[:-4] + bytes(4))  # the same path layout, other content
    ident = bootstrap_spec(tiny_cfg(tmp_path, init=str(first))).identity()
    assert ident["init"] != bootstrap_spec(tiny_cfg(tmp_path, init=str(other))).identity()["init"]
    assert "init" not in bootstrap_spec(tiny_cfg(tmp_path)).identity()


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


def test_committed_teacher_retrieves_across_its_window() -> None:
    """The committed teacher retrieves by content at every distance of its window, on fresh
    probes (seed 2024: neither its probe seed nor a training seed), and its bootstrap.json's
    by-distance scores are its own probe rows'."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(COMMITTED, device="cpu").model
    meta = B.read_meta(COMMITTED)
    assert model.config.rope_parameters["rope_theta"] == meta["rope_parameters"]["rope_theta"]
    assert meta["config"]["init"] == "configs/teacher-tiny-stage1" and (REPO / meta["config"]["init"]).is_dir()
    bd = meta["by_distance"]
    assert bd["edges"] == [0, 256, 512, 1024]
    for task in ("needle", "passkey"):
        rows = meta[task]["probes"]
        for cell, lo, hi in zip(bd[task], bd["edges"], bd["edges"][1:]):
            xs = [r["exact"] for r in rows if lo <= r["distance"] < hi]
            assert cell["probes"] == len(xs) > 100 and cell["exact"] == pytest.approx(np.mean(xs), abs=1e-4)
    syn = SyntheticConfig.model_validate(meta["synthetic"])
    # Depth 0.1 at 1024: the fact ~900 tokens back; 0.5: ~500; 0.9 at 512: ~60.
    probe = B.probe_teacher(model, syn, tuple(meta["doc_len"]), [512, 1024], [0.1, 0.5, 0.9], trials=8,
                            seed=2024)
    for task, floor in (("needle", 0.75), ("passkey", 0.8)):  # chance per token 0.04 / 0.1; measured 0.83, 0.9
        acc = np.asarray(probe[task]["token_acc"])
        assert acc.min() >= floor, (task, acc)
    assert np.mean(probe["passkey"]["exact"]) >= 0.6, probe["passkey"]["exact"]
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
