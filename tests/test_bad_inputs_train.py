"""Bad inputs of the training and teacher side: one ``error:`` line naming the field or file,
exit 2, no traceback, nothing left behind (the pattern of tests/test_bad_inputs.py).

Student sizes a Llama attention cannot be built from and seeds an RNG refuses are told by
``posdistill plan`` and by ``posdistill train`` before any node (pack, cache) or rank runs; a
teacher asked for windows past its ``max_position_embeddings`` is refused unless its RoPE
scaling covers them (then the log says so); a full disk under the cache (Ray actor or
in-process shard writes), a checkpoint or an export is one line, with no partial output.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import test_bad_inputs as bad  # a module, so pytest does not collect its tests here again
from test_bad_inputs import Case, _cfg

REPO = Path(__file__).resolve().parents[1]
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


# ----------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _volume(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size``: writes past it fail with ENOSPC (as test_bad_inputs' small_volume)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _cli(argv: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run posdistill; returns the process and its one ``error:`` line (asserted: exit 2, no
    traceback). Without the test hooks: they import the stages into every Ray agent too, which
    on a loaded machine can outlast Ray's node start-up timeout; nothing here needs them."""
    env = {**os.environ, "POSDISTILL_TEST_HOOKS": "0"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-4000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return proc, errors[0]


def _no_partial_shard(cache_root: Path) -> int:
    """Every visible shard under ``cache_root`` is complete and valid; no temp file, no manifest.
    Returns how many shards the failed run finished (the re-run keeps them)."""
    from stages.cache.verify import check_shard
    from stages.cache.writer import TEMP_GLOB

    assert not list(cache_root.rglob(TEMP_GLOB)) and not list(cache_root.rglob("manifest.json"))
    shards = sorted(cache_root.rglob("shard-*.parquet"))
    plan = {s["index"]: s for d in {p.parent for p in shards}
            for s in json.loads((d / "plan.json").read_text())["shards"]} if shards else {}
    for f in shards:
        s = plan[int(f.stem.split("-")[1])]
        assert check_shard(f, f.parent.name, s["first_window"], s["rows"]) is None, f
    return len(shards)


def _cache_cfg(root: Path, cache_root: Path) -> dict[str, Any]:
    from helpers import make_tiny_llama

    teacher = make_tiny_llama(root / "teacher")
    return {"run": {"name": "full", "out_dir": str(root / "out")}, "data": {"synthetic": {"num_docs": 400}},
            "pack": {"window_len": 128, "doc_len": [16, 64]}, "teacher": {"model": str(teacher)},
            "cache": {"k": 8, "windows_per_shard": 8, "root": str(cache_root)}}


@pytest.mark.slow
def test_cache_shards_on_a_full_disk_in_process(tmp_path: Path):
    """The in-process executor: the shard write's ENOSPC is one UserError naming the cache
    directory; no temp file, no manifest, every shard left is a valid one."""
    from cluster.executor import LocalExecutor
    from helpers import build_cache, cache_dir_of
    from pipeline.config import parse_config
    from pipeline.errors import UserError

    with _volume(tmp_path / "small", "64k") as vol:
        cfg = parse_config(_cache_cfg(tmp_path, vol / "cache"))
        with pytest.raises(UserError) as got:
            build_cache(cfg, executor=LocalExecutor())
        message = str(got.value)
        assert str(cache_dir_of(cfg)) in message and "No space left on device" in message, message
        assert "\n" not in message
        assert _no_partial_shard(vol) >= 1  # it failed writing shards, not before


@pytest.mark.slow
def test_cache_shards_on_a_full_disk_through_ray(tmp_path: Path):
    """`posdistill cache run` with its shards written by a Ray actor onto a full volume."""
    with _volume(tmp_path / "small", "64k") as vol:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump(_cache_cfg(tmp_path, vol / "cache")))
        _, error = _cli(["cache", "run", str(cfg)])
        assert str(vol / "cache") in error and "No space left on device" in error, error
        assert _no_partial_shard(vol) >= 1


TRAIN_RAW = {"data": {"synthetic": {"num_docs": 40}}, "pack": {"window_len": 64, "doc_len": [16, 64]},
             "student": {"name": "s", "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
             "train": CE}


@pytest.mark.slow
def test_checkpoint_writes_on_a_full_disk(tmp_path: Path):
    """The pack fits, the first checkpoint does not: the ranks' torch.save failure (a
    RuntimeError without errno) is one line naming the run directory, from the launcher; the
    half-written checkpoint is gone, nothing claims to be a model."""
    with _volume(tmp_path / "small", "256k") as vol:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"run": {"name": "full", "out_dir": str(vol / "out")}, **TRAIN_RAW}))
        _, error = _cli(["train", str(cfg)])
        run = vol / "out" / "train" / "s"
        assert f"{run}: No space left on device" in error, error
        assert run.is_dir() and not list(run.glob("checkpoints/step-*")) and not (run / "model").exists()
        assert not (run / ".rank-error").exists() and not list(vol.rglob(".*tmp*"))


def test_write_failure_tells_a_full_volume_from_a_bug(tmp_path: Path):
    """An exception without errno (torch.save's RuntimeError) is a storage error only when the
    volume is full now; a UserError is never recast; an OSError's errno speaks for itself."""
    import errno

    from pipeline.errors import UserError, write_failure

    bug = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert write_failure(bug, tmp_path / "run") is None  # plenty of space: a bug keeps its traceback
    assert write_failure(UserError("x"), tmp_path) is None
    user = write_failure(OSError(errno.EROFS, "Read-only file system"), tmp_path / "run")
    assert user is not None and str(user).startswith(f"{tmp_path / 'run'}: Read-only file system")
    with _volume(tmp_path / "small", "64k") as vol:
        (vol / "fill").write_bytes(bytes(60 * 1024))
        user = write_failure(bug, vol / "run" / "checkpoints")
        assert user is not None and str(user).startswith(f"{vol / 'run' / 'checkpoints'}: No space left on device")
        assert [p.name for p in vol.iterdir()] == ["fill"]  # the probe is gone


def test_a_rank_error_that_cannot_reach_its_file_still_is_the_one_line(tmp_path: Path, capsys):
    """A full disk under the run directory: the rank's marked stderr line carries the message,
    and the launcher's failure report after it is not forwarded."""
    from cluster.launch import run_ranks
    from pipeline.errors import UserError
    from stages.train.loop import RANK_ERROR_LINE

    script = ("import sys; print('train: step 1', file=sys.stderr); "
              f"print('[rank1]: ' + {RANK_ERROR_LINE!r} + 'run: No space left on device', file=sys.stderr); "
              "print('Traceback (most recent call last):', file=sys.stderr); sys.exit(2)")
    with pytest.raises(UserError, match="^run: No space left on device$"):
        run_ranks([sys.executable, "-c", script], dict(os.environ), tmp_path / ".rank-error")
    err = capsys.readouterr().err
    assert "train: step 1" in err and "Traceback" not in err and RANK_ERROR_LINE not in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "ok", "out_dir": str(root / "out")}, **TRAIN_RAW}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "out" / "train" / "s"


@pytest.mark.slow
def test_export_to_a_full_disk(trained_run: Path, tmp_path: Path):
    """safetensors' write error (no errno) is one line naming the export directory; nothing is left."""
    with _volume(tmp_path / "small", "64k") as vol:
        _, error = _cli(["export", str(trained_run), str(vol / "exports" / "model")])
        assert f"{vol / 'exports' / 'model'}: No space left on device" in error, error
        assert list(vol.iterdir()) == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_train_input(case: Case, tmp_path: Path):
    bad.test_bad_input(case, tmp_path)  # its assertions, on these cases
