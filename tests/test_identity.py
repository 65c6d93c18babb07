"""A node's identity includes its inputs': a change anywhere upstream re-runs everything below.

Graph-level cases compute every node's recorded identity (no stage runs) before and after one
edit of each kind of input; the end-to-end case trains a real student (DeepSpeed ranks), edits
the corpus and checks the second `train` retrains instead of reusing the finished student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_tiny_llama

from pipeline.config import parse_config
from pipeline.graph import build_graph

REPO = Path(__file__).resolve().parents[1]


def _corpus(path: Path, salt: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "abcdefgh" if not salt else "".join(sorted(set(salt)))[:8].ljust(8, "z")  # every window changes
    lines = [json.dumps({"text": f"document {i} {salt} " + body * (4 + i % 5)}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(root: Path, teacher: Path | None, corpus: Path, tokenizer: str = "byte") -> dict:
    cfg: dict = {
        "run": {"name": "ident", "out_dir": str(root / "out")},
        "data": {"source": str(corpus), "tokenizer": tokenizer},
        "pack": {"window_len": 64, "doc_len": [16, 64]},
        "student": {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
        "train": {"batch_size": 2, "workers": 1, "warmup_steps": 0},
        "students": [
            {"name": "base", "phases": [{"window_len": 64, "steps": 1, "kd": {"alpha": 0.0}}]},
            {"name": "ext", "init_from": "base", "phases": [{"window_len": 64, "steps": 1}]},
        ],
    }
    if teacher is not None:
        cfg["teacher"] = {"model": str(teacher)}
    return cfg


def _idents(cfg: dict) -> dict[str, str]:
    """Recorded identity per node; pack and cache nodes are named by their input's fingerprint,
    so they are keyed by their place in the (deterministic) run order instead."""
    graph = build_graph(parse_config(cfg))
    return {(f"{n.stage}#{i}" if n.stage in ("pack", "cache") else n.name): n.ident()
            for i, n in enumerate(graph.nodes)}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if before[k] != after[k]}


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    teacher = make_tiny_llama(tmp_path / "teacher")
    return tmp_path, teacher, _corpus(tmp_path / "data" / "docs.jsonl")


def test_corpus_change_reaches_every_node(tree):
    root, teacher, corpus = tree
    cfg = _config(root, teacher, corpus)
    before = _idents(cfg)
    _corpus(corpus, salt="edited")
    changed = _changed(before, _idents(cfg))
    stages = {name.split("#")[0].split()[0] for name in changed}
    assert {"pack", "cache", "train", "eval", "perturb", "query"} <= stages, changed
    assert "train base-s0" in changed and "train ext-s0" in changed


def test_teacher_weight_change_spares_the_pack_and_the_ce_base(tree):
    from safetensors.torch import load_file, save_file

    root, teacher, corpus = tree
    cfg = _config(root, teacher, corpus)
    before = _idents(cfg)
    weights = load_file(teacher / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.5
    save_file({k: v.contiguous() for k, v in weights.items()}, str(teacher / "model.safetensors"),
              metadata={"format": "pt"})
    changed = _changed(before, _idents(cfg))
    assert any(c.startswith("cache") for c in changed), changed
    assert "train ext-s0" in changed  # distils from the cache
    assert "train base-s0" not in changed  # CE on the pack: the teacher is not its input
    assert not any(c.startswith("pack") for c in changed), changed


def test_tokenizer_change_reaches_pack_cache_and_students(tree):
    from stages.tokenizer import build_byte_tokenizer

    root, teacher, corpus = tree
    tok = root / "tok"
    build_byte_tokenizer().save_pretrained(tok)
    cfg = _config(root, teacher, corpus, tokenizer=str(tok))
    before = _idents(cfg)
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf["model_max_length"] = 12345  # a tokenizer file's content changes
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    changed = _changed(before, _idents(cfg))
    assert any(c.startswith("pack") for c in changed) and any(c.startswith("cache") for c in changed)
    assert {"train base-s0", "train ext-s0"} <= changed


def test_a_changed_parent_retrains_its_children(tree):
    root, teacher, corpus = tree
    parent_corpus = _corpus(root / "data2" / "docs.jsonl", salt="parent")
    cfg = _config(root, teacher, corpus)
    cfg["students"][0]["phases"][0]["data"] = {"source": str(parent_corpus), "tokenizer": "byte"}
    before = _idents(cfg)
    _corpus(parent_corpus, salt="the parent's corpus edited")  # no config text changes
    changed = _changed(before, _idents(cfg))
    assert "train base-s0" in changed
    assert "train ext-s0" in changed  # its own windows are unchanged: only its parent is
    assert parse_config(cfg)  # the child's config is the same text throughout


def _train(cfg_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_finished_student_is_retrained_after_its_corpus_changed(tmp_path: Path):
    from safetensors.torch import load_file

    corpus = _corpus(tmp_path / "data" / "docs.jsonl")
    cfg = _config(tmp_path, None, corpus)
    cfg["students"] = cfg["students"][:1]  # the CE base alone: no teacher needed
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = _train(path)
    assert first.returncode == 0, first.stderr[-3000:]
    model = next((tmp_path / "out" / "train").glob("base-s0-*")) / "model"
    w1 = load_file(model / "model.safetensors")

    same = _train(path)
    assert same.returncode == 0 and "train: reusing train base-s0" in same.stdout, same.stdout

    _corpus(corpus, salt="a different corpus")
    again = _train(path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: reusing train" not in again.stdout, again.stdout
    assert "train: computed train base-s0" in again.stdout, again.stdout
    assert "trained on other inputs" in again.stderr, again.stderr[-2000:]
    w2 = load_file(model / "model.safetensors")
    assert any(not (w1[k] == w2[k]).all() for k in w1), "the retrained model is byte-identical to the stale one"
