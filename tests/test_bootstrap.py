"""Teacher bootstrap: training writes a loadable HF teacher, the probe's bookkeeping is right,
and the committed tiny teacher really retrieves at the demo window."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import SyntheticConfig, parse_config
from pipeline.errors import UserError
from pipeline.resolve import bootstrap_spec
from stages import bootstrap as B

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "configs" / "teacher-tiny"


class InductionOracle(torch.nn.Module):
    """A perfect copier: predicts the token that followed the last earlier occurrence of the
    n-gram ending here (uniform when there is none). Scores 1.0 on a correct probe."""

    def __init__(self, n: int = 8, vocab: int = 260):
        super().__init__()
        self.n, self.vocab = n, vocab

    def forward(self, input_ids, position_ids=None, logits_to_keep=0, **_):
        n_rows, length = input_ids.shape
        logits = torch.zeros(n_rows, length, self.vocab)
        for b in range(n_rows):
            ids = input_ids[b].tolist()
            last: dict[tuple, int] = {}
            for t in range(length):
                gram = tuple(ids[max(0, t - self.n + 1):t + 1])
                if len(gram) == self.n and gram in last and last[gram] + 1 < length:
                    logits[b, t, ids[last[gram] + 1]] = 10.0
                if len(gram) == self.n:
                    last[gram] = t
        keep = logits[:, -logits_to_keep:] if logits_to_keep else logits
        return SimpleNamespace(logits=keep)


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
    assert set(meta["needle_accuracy"]) == {"64", "128"}
    assert meta["documents"]["window"] == 128 and meta["documents"]["ce"] > 0
    assert [e["phase"] for e in meta["log"] if e.get("done")] == [0, 1]
    assert meta["max_trained_copy_distance"] == 128  # max_distance defaults to the window
    assert (out / B.HEATMAP_FILE).stat().st_size > 1000
    assert not list(tmp_path.glob(".teacher.tmp-*"))  # nothing half-written left behind


def test_set_rope_theta_changes_the_forward(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path).teacher.bootstrap
    torch.manual_seed(0)
    model = B.build_model(cfg, 1e4, 128).eval()
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        B.set_rope_theta(model, 1e6, 128)
        after = model(input_ids=ids).logits
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert not torch.allclose(before, after)


def test_needle_context_bookkeeping() -> None:
    hay = list(range(1000, 2000))
    key, value = [1, 2, 3], [4, 5]
    for depth in (0.0, 0.5, 1.0):
        ctx, at = B.needle_context(hay, key, value, 100, depth)
        assert len(ctx) == 100 and ctx[-3:] == key
        assert ctx[at:at + 5] == key + value
        assert at == round(depth * (100 - 8))
    # Depth 0 puts the needle first: the farthest distance from the query.
    assert B.needle_context(hay, key, value, 100, 0.0)[0][:5] == key + value


def test_probe_scores_perfect_copier_and_random_model(tmp_path: Path) -> None:
    syn = SyntheticConfig()
    oracle = B.needle_probe(InductionOracle(), syn, (64, 256), [128, 256], [0.0, 0.5, 1.0],
                            trials=4, seed=7)
    assert all(c["accuracy"] == 1.0 and c["mean_rank"] == 0 for c in oracle["cells"])
    assert oracle["cells"][0]["distance"] > oracle["cells"][-1]["distance"]
    passkey = B.passkey_probe(InductionOracle(n=6), [128], [0.0, 1.0], trials=3, seed=7)
    assert all(c["accuracy"] == 1.0 for c in passkey["cells"])

    torch.manual_seed(0)
    rand = B.build_model(tiny_cfg(tmp_path).teacher.bootstrap, 1e4, 256).eval()
    probe = B.needle_probe(rand, syn, (64, 256), [128], [0.0, 0.5], trials=8, seed=7)
    assert all(c["accuracy"] == 0.0 for c in probe["cells"])
    assert all(c["token_acc"] < 0.3 for c in probe["cells"])


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
    model = B.load_teacher(COMMITTED)
    meta = B.read_meta(COMMITTED)
    assert model.config.rope_parameters["rope_theta"] == meta["rope_parameters"]["rope_theta"]
    syn = SyntheticConfig.model_validate(meta["synthetic"])
    # Depth 0 at 1024: the needle sits ~1000 tokens back, beyond every trained copy distance.
    # Depth 0.1 at 1024: the needle ~900 tokens back; 0.5: ~500, inside the held-out band.
    probe = B.needle_probe(model, syn, tuple(meta["doc_len"]), [1024], [0.1, 0.5], trials=8,
                           seed=2024)
    acc = {c["depth"]: c["token_acc"] for c in probe["cells"]}
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
