"""Bad inputs of the training and teacher side: one ``error:`` line naming the field or file,
exit 2, no traceback, nothing left behind (the pattern of tests/test_bad_inputs.py).

Student sizes a Llama attention cannot be built from and seeds an RNG refuses are told by
``posdistill plan`` and by ``posdistill train`` before any node (pack, cache) or rank runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import test_bad_inputs as bad  # a module, so pytest does not collect its tests here again
from test_bad_inputs import Case, _cfg

CE = {"batch_size": 2, "workers": 2, "warmup_steps": 0, "report_to": [],
      "phases": [{"window_len": 64, "steps": 2, "kd": {"alpha": 0.0}}]}  # no teacher needed


def _student(command: str, arch: dict[str, Any], names: list[str], id: str, **sections: Any) -> Case:
    def build(root: Path) -> list[str]:
        teacher = _init_dir(root, "teacher")  # plan reads its config.json; CE phases need no more
        cfg = _cfg(root, pack={"window_len": 64, "doc_len": [16, 64]}, teacher={"model": str(teacher)},
                   student={"config": {"num_hidden_layers": 1, **arch}}, **{"train": CE, **sections})
        return [command, str(cfg)]
    return Case(f"{command}-{id}", build, names)


def _init_dir(root: Path, name: str = "init", **conf: Any) -> Path:
    """A model directory whose config.json alone is enough for the checks."""
    d = root / name
    d.mkdir()
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 260, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
            "head_dim": 16, "max_position_embeddings": 256}
    (d / "config.json").write_text(json.dumps({**base, **conf}))
    return d


def _init(command: str, conf: dict[str, Any], names: list[str], id: str) -> Case:
    def build(root: Path) -> list[str]:
        init = _init_dir(root, **conf)
        cfg = _cfg(root, pack={"window_len": 64, "doc_len": [16, 64]}, student={"init": str(init)}, train=CE,
                   teacher={"model": str(init)})  # plan reads the teacher's config.json too
        return [command, str(cfg)]
    return Case(f"{command}-init-{id}", build, names)


ARCH = [
    ({"hidden_size": 30, "num_attention_heads": 4}, ["student.config.hidden_size", "num_attention_heads"], "indivisible"),
    ({"hidden_size": 28, "num_attention_heads": 4}, ["student.config.hidden_size", "odd head size of 7"], "odd-head"),
    ({"hidden_size": 32, "num_attention_heads": 4, "head_dim": 5}, ["student.config.head_dim", "odd"], "odd-head-dim"),
    ({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 3},
     ["student.config.num_attention_heads 4", "student.config.num_key_value_heads 3"], "kv-groups"),
    ({"hidden_size": 0}, ["student.config.hidden_size"], "zero"),
    ({"num_attention_heads": -2}, ["student.config.num_attention_heads"], "negative"),
]
SEED = ["train.seed", "-1"]

CASES = [
    *[_student(cmd, arch, names, id) for cmd in ("plan", "train") for arch, names, id in ARCH],
    _student("plan", {}, ["run.seed", "-1"], "negative-run-seed", run={"name": "bad", "seed": -1}),
    _student("train", {}, SEED, "negative-train-seed", train={**CE, "seed": -1}),
    _student("train", {}, ["train.seed", "4294967296"], "huge-train-seed", train={**CE, "seed": 2**32}),
    _init("plan", {"head_dim": 15}, ["student.init", "config.json", "head_dim 15"], "odd-head-dim"),
    _init("train", {"num_key_value_heads": 3}, ["student.init", "config.json", "num_key_value_heads 3"], "kv-groups"),
    _init("plan", {"vocab_size": 100}, ["teacher.model", "100", "data.tokenizer"], "vocab-below-tokenizer"),
    *[Case(f"bootstrap-{id}", lambda r, boot=boot: ["bootstrap", str(_cfg(r, teacher={"bootstrap": {
        "num_hidden_layers": 1, "phases": [{"window_len": 64, "rope_theta": 1e4, "steps": 1}], **boot}}))], names)
      for boot, names, id in [({"hidden_size": 24, "num_attention_heads": 8}, ["teacher.bootstrap.hidden_size"],
                               "odd-head"), ({"seed": -3}, ["teacher.bootstrap.seed"], "negative-seed")]],
]


def test_arch_check_takes_exactly_what_llama_runs():
    """The rule is the model's, not the examples': every accepted size builds and runs a
    forward, every refused one fails to."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from pipeline.config import StudentArch
    from pipeline.errors import UserError
    from stages.student import check_arch, llama_config
    from stages.tokenizer import build_byte_tokenizer

    hf_logging.set_verbosity_error()
    tok = build_byte_tokenizer()
    seen = {"accepted": 0, "refused": 0}
    for hidden in (12, 16, 24):
        for heads in (1, 2, 3, 4):
            for kv in (None, 1, 2, 3):
                for head_dim in (None, 3, 4):
                    arch = StudentArch(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                       num_key_value_heads=kv, head_dim=head_dim, intermediate_size=8)
                    try:
                        check_arch(arch.model_dump(), "student.config.")
                        refused = None
                    except UserError as err:
                        refused = str(err)
                    try:
                        model = AutoModelForCausalLM.from_config(llama_config(arch, len(tok), 16, tok))
                        assert model(torch.arange(8)[None]).logits.shape == (1, 8, len(tok))
                        runs = True
                    except Exception:  # noqa: BLE001 - any failure to build or run
                        runs = False
                    assert runs == (refused is None), (arch, refused)
                    seen["accepted" if runs else "refused"] += 1
    assert seen["accepted"] > 10 and seen["refused"] > 10, seen


# ----------------------------------------------------------------------------- teacher context


def _short_teacher(max_positions: int, rope: dict[str, Any] | None = None):
    def make(tiny: Path, root: Path) -> Path:
        """A teacher trained (by its config) for ``max_positions`` tokens; windows are 128."""
        from helpers import make_tiny_llama

        extra = {"rope_parameters": {"rope_theta": 10000.0, **rope}} if rope else {}
        return make_tiny_llama(root / "teacher", max_position_embeddings=max_positions, **extra)
    return make


def _context_case(command: str, id: str, names: list[str], max_positions: int, rope: dict[str, Any] | None = None,
                  **sections: Any) -> Case:
    def build(root: Path) -> list[str]:
        teacher = _short_teacher(max_positions, rope)(Path(), root)
        cfg = _cfg(root, teacher={"model": str(teacher)}, cache={"k": 8}, **sections)
        return [*command.split(), str(cfg)]
    return Case(f"{command.replace(' ', '-')}-{id}", build, names)


CONTEXT = ["teacher.model", "max_position_embeddings 64", "128 tokens"]
CASES += [
    _context_case("cache run", "teacher-context-below-window", CONTEXT, 64),
    _context_case("plan", "teacher-context-below-window", CONTEXT, 64,
                  student={"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
                  train={"phases": [{"window_len": 128, "steps": 2}]}),
    _context_case("train", "teacher-context-below-window", CONTEXT, 64,
                  student={"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
                  train={"batch_size": 2, "workers": 2, "report_to": [], "phases": [{"window_len": 128, "steps": 2}]}),
    _context_case("cache run", "teacher-yarn-too-short", [*CONTEXT, "yarn", "covers only 96"], 64,
                  {"rope_type": "yarn", "factor": 1.5, "original_max_position_embeddings": 64}),
]


@pytest.mark.parametrize("conf,covered", [
    ({"max_position_embeddings": 32}, None),
    ({"max_position_embeddings": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, None),
    ({"max_position_embeddings": 32, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16}}, 64),
    ({"max_position_embeddings": 32, "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, 128),  # of 32
    ({"max_position_embeddings": 32, "rope_scaling": {"type": "dynamic", "factor": 2}}, 64),  # legacy key
    ({"max_position_embeddings": 32, "original_max_position_embeddings": 8,
      "rope_parameters": {"rope_type": "longrope", "factor": 8.0}}, 64),  # Phi-3 keeps the original at the top
    ({"max_position_embeddings": 32, "rope_parameters": {
        "full_attention": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32},
        "sliding_attention": {"rope_type": "default"}}}, 256),  # per layer type: the widest
])
def test_scaled_context_reads_each_rope_form(conf, covered):
    from stages.model_config import context_note, scaled_context

    got = scaled_context(conf)
    assert (got[0] if got else None) == covered
    if covered is not None:  # covered windows are allowed with one line, a longer one refused
        note = context_note(conf, "teacher.model t", covered, "t/config.json")
        assert note and "below the" in note and f"covers {covered}" in note
        from pipeline.errors import UserError

        with pytest.raises(UserError, match=f"covers only {covered}"):
            context_note(conf, "teacher.model t", covered + 1, "t/config.json")
    assert context_note(conf, "teacher.model t", 32, "t/config.json") is None  # within max_position_embeddings


@pytest.mark.slow
def test_a_yarn_teacher_covering_the_window_caches_and_says_so(tmp_path, capsys):
    """The in-process executor, a teacher trained for 32 positions whose yarn factor 4 covers
    the 128-token windows: the cache is written, and the log says why it was allowed."""
    from cluster.executor import LocalExecutor
    from helpers import build_cache
    from pipeline.config import parse_config
    from stages.cache.manifest import read_manifest

    teacher = _short_teacher(32, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})(
        Path(), tmp_path)
    cfg = parse_config({"run": {"out_dir": str(tmp_path / "run")}, "data": {"synthetic": {"num_docs": 12}},
                        "pack": {"window_len": 128, "doc_len": [16, 64]},
                        "teacher": {"model": str(teacher)}, "cache": {"k": 4, "windows_per_shard": 4}})
    out = build_cache(cfg, executor=LocalExecutor(), verbose=True)
    assert read_manifest(out)["windows"] > 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "max_position_embeddings" in x]
    assert lines == [f"cache: teacher.model {teacher}: max_position_embeddings 32 is below the 128-token window; "
                     "its yarn RoPE scaling, factor 4 x original_max_position_embeddings 32 covers 128"], lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_train_input(case: Case, tmp_path: Path):
    bad.test_bad_input(case, tmp_path)  # its assertions, on these cases
