"""Every bad input gets one clear line, a non-zero exit and nothing left behind.

Table-driven: each case builds its inputs under a fresh directory, runs one real
``posdistill`` command in a subprocess, and checks (1) the exit code, (2) exactly one
``error:`` line on stderr, naming the key or file given in the table, with no traceback,
(3) that no file or directory appeared under the case's output directory (or anywhere
else in its tree but the inputs it wrote).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    id: str
    build: Callable[[Path], list[str]]  # writes the inputs under the case dir, returns argv
    names: list[str]  # substrings the one error line must hold (the key or the file)
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


def _cfg(root: Path, **sections: Any) -> Path:
    base: dict[str, Any] = {"run": {"name": "bad", "out_dir": str(root / "out")},
                            "data": {"synthetic": {"num_docs": 40}},
                            "pack": {"window_len": 128, "doc_len": [16, 64]}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _config_case(id: str, names: list[str], command: str = "plan", **sections: Any) -> Case:
    return Case(id, lambda root: [*command.split(), str(_cfg(root, **sections))], names)


def _raw(id: str, text: str, names: list[str]) -> Case:
    def build(root: Path) -> list[str]:
        (root / "c.yaml").write_text(text)
        return ["config", "show", str(root / "c.yaml")]
    return Case(id, build, names)


def _data_case(id: str, names: list[str], write: Callable[[Path], Path], text_field: str = "text") -> Case:
    def build(root: Path) -> list[str]:
        src = write(root / "data")
        return ["pack", str(_cfg(root, data={"source": str(src), "text_field": text_field}))]
    return Case(id, build, names)


def _file(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p
    return write


def _parquet(column: Any) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": column}), d / "docs.parquet")
        return d / "docs.parquet"
    return write


def _teacher(tiny_teacher: Path, root: Path, keep: Callable[[Path], bool] = lambda p: True) -> Path:
    out = root / "teacher"
    out.mkdir()
    for p in tiny_teacher.iterdir():
        if keep(p):
            shutil.copy(p, out / p.name)
    return out


def _teacher_case(id: str, names: list[str], command: str = "cache run",
                  teacher: Callable[[Path, Path], Path] | None = None, **sections: Any) -> Case:
    """A case that needs the tiny teacher; ``teacher(tiny, root)`` may damage a copy."""
    def build(root: Path) -> list[str]:
        model = (teacher or _teacher)(TINY[0], root)
        kd = {"teacher": {"model": str(model)}, "cache": {"k": 8}}
        for key, value in sections.items():
            kd[key] = {**kd.get(key, {}), **value}
        return [*command.split(), str(_cfg(root, **kd))]
    return Case(id, build, names)


_NO_S3 = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent/posdistill-test-hub-cache"}
TINY: list[Path] = []  # the module fixture's tiny teacher


def _no_weights(tiny: Path, root: Path) -> Path:
    return _teacher(tiny, root, keep=lambda p: p.suffix != ".safetensors")


def _damaged_weights(damage: Callable[[bytes], bytes]) -> Callable[[Path, Path], Path]:
    def make(tiny: Path, root: Path) -> Path:
        out = _teacher(tiny, root)
        f = out / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        return out
    return make


def _no_config(tiny: Path, root: Path) -> Path:
    return _teacher(tiny, root, keep=lambda p: p.name != "config.json")


def _export_of(make: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        ckpt = root / "ckpt"
        make(ckpt)
        return ["export", str(ckpt), str(root / "out" / "model")]
    return build


def _verify_of(make: Callable[[Path], None], command: str = "cache verify") -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        d = root / "cache"
        d.mkdir()
        make(d)
        return [*command.split(), str(d)]
    return build


def _bpe_teacher(vocab: int) -> Callable[[Path, Path], Path]:
    """The tiny teacher's weights with a trained BPE tokenizer of ``vocab`` ids beside them."""
    def make(tiny: Path, root: Path) -> Path:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        out = _teacher(tiny, root, keep=lambda p: not p.name.startswith("tokenizer"))
        core = Tokenizer(models.BPE(unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        core.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
        PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>").save_pretrained(out)
        return out
    return make


def _user_dir(root: Path, name: str = "mine") -> Path:
    """A directory holding a file the user wrote (which no command may delete)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("the user's own file\n")
    return d


def _ckpt(root: Path) -> Path:
    (root / "ckpt").mkdir()
    return root / "ckpt"


def _manifest_with(file: str) -> Callable[[Path], None]:
    """A cache directory whose manifest points shard 0 at ``file``."""
    def make(d: Path) -> None:
        manifest = {"fingerprint": "f" * 16, "format": 1, "identity": {}, "kind": "topk", "codec": "plain",
                    "window_len": 8, "vocab": 260, "windows": 1, "tokens": 8,
                    "shards": [{"index": 0, "first_window": 0, "rows": 1, "file": file}]}
        (d / "manifest.json").write_text(json.dumps(manifest))
    return make


CASES: list[Case] = [
    # --- the config file itself
    Case("config-missing", lambda r: ["config", "show", str(r / "nope.yaml")], ["nope.yaml"]),
    _raw("yaml-syntax", "run: {name: [unclosed\n", ["c.yaml"]),
    _raw("yaml-not-mapping", "- a\n- b\n", ["c.yaml"]),
    _raw("unknown-key", "pack: {windw_len: 5}\n", ["pack.windw_len", "window_len"]),
    _raw("unknown-section", "bogus: 1\n", ["bogus"]),
    # --- strict types: nothing is coerced
    _raw("seed-bool", "run: {seed: true}\n", ["run.seed"]),
    _raw("k-string", "cache: {k: '8'}\n", ["cache.k"]),
    _raw("checkpointing-string", "train: {gradient_checkpointing: 'yes'}\n", ["train.gradient_checkpointing"]),
    _raw("window-float", "pack: {window_len: 128.5}\n", ["pack.window_len"]),
    _raw("lr-string", "train: {lr: fast}\n", ["train.lr"]),
    _raw("doc-len-string", "pack: {doc_len: ['8', 64]}\n", ["pack.doc_len"]),
    # --- values out of range
    _raw("window-zero", "pack: {window_len: 0}\n", ["pack.window_len"]),
    _raw("mode-unknown", "pack: {mode: diagonal}\n", ["pack.mode"]),
    _raw("doc-len-reversed", "pack: {doc_len: [100, 10]}\n", ["pack.doc_len"]),
    _raw("doc-longer-than-window", "pack: {window_len: 100, doc_len: [10, 200]}\n", ["window_len"]),
    _raw("steps-zero", "train: {phases: [{window_len: 64, steps: 0}]}\n", ["train.phases[0].steps"]),
    _raw("lr-negative", "train: {lr: -1.0}\n", ["train.lr"]),
    _raw("kd-loss-unknown", "train: {kd: {loss: cross_entropy_plus}}\n", ["train.kd.loss"]),
    _raw("k-zero", "cache: {k: 0}\n", ["cache.k"]),
    _raw("precision-unknown", "train: {precision: fp8}\n", ["train.precision"]),
    _raw("ds-config-missing", "train: {deepspeed: {config: no/such/ds.json}}\n", ["train.deepspeed.config", "no/such/ds.json"]),
    Case("ds-config-not-json", lambda r: ["plan", str(_cfg(r, train={"deepspeed": {"config": str(
        (r / "ds.json").write_text("{oops") and r / "ds.json")}}))], ["train.deepspeed.config", "ds.json"]),
    Case("ds-config-conflict", lambda r: ["train", str(_cfg(
        r, student={"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}},
        train={"workers": 2, "batch_size": 2, "phases": [{"window_len": 128, "steps": 2}], "kd": {"alpha": 0.0},
               "deepspeed": {"config": {"train_batch_size": 64}}}))], ["train_batch_size", "64", "train.batch_size"]),
    _raw("attn-unknown", "student: {config: {hidden_size: 32}, attn_implementation: flash}\n",
         ["student.attn_implementation", "flash"]),
    Case("attn-flex-trains-on-cpu", lambda r: ["train", str(_cfg(
        r, student={"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
                    "attn_implementation": "flex_attention"},
        train={"workers": 2, "batch_size": 2, "phases": [{"window_len": 128, "steps": 2}], "kd": {"alpha": 0.0}}))],
        ["student.attn_implementation", "flex_attention", "no backward"]),
    # --- selecting what does not exist
    _config_case("student-unknown", ["--student", "nobody"], command="pack --student nobody",
                 train={"phases": [{"window_len": 128, "steps": 2}]}),
    _config_case("no-student", ["student:", "train.phases"], command="train"),
    # --- data
    _config_case("source-missing", ["data.source", "no/such/corpus"], command="pack",
                 data={"source": "no/such/corpus"}),
    Case("source-empty-dir", lambda r: (r / "empty").mkdir() or
         ["pack", str(_cfg(r, data={"source": str(r / "empty")}))], ["data.source", "empty"]),
    _data_case("jsonl-bad-json", ["docs.jsonl", "line 2"], _file("docs.jsonl", '{"text": "a"}\n{"text": \n')),
    _data_case("jsonl-no-field", ["data.text_field", "docs.jsonl"], _file("docs.jsonl", '{"body": "abc"}\n')),
    _data_case("jsonl-int-field", ["data.text_field", "docs.jsonl"], _file("docs.jsonl", '{"text": 42}\n')),
    _data_case("jsonl-not-utf8", ["docs.jsonl", "UTF-8"], _file("docs.jsonl", b'{"text": "\xff\xfe"}\n')),
    _data_case("txt-not-utf8", ["docs.txt", "UTF-8"], _file("docs.txt", b"fine\n\xff\xfe\xfd\n")),
    _data_case("parquet-no-column", ["data.text_field", "docs.parquet"], _parquet(["a", "b"]), text_field="body"),
    _data_case("parquet-int-column", ["data.text_field", "docs.parquet", "int64"], _parquet([1, 2, 3])),
    _data_case("parquet-binary-column", ["data.text_field", "docs.parquet", "binary"], _parquet([b"ab", b"cd"])),
    _data_case("parquet-corrupt", ["docs.parquet"], _file("docs.parquet", b"PAR1 this is not parquet PAR1")),
    _config_case("too-few-tokens", ["pack.window_len"], command="pack",
                 data={"synthetic": {"num_docs": 2}}, pack={"window_len": 4096, "doc_len": [16, 64]}),
    _config_case("window-cannot-fit", ["pack.window_len", "memory"], command="pack",
                 pack={"window_len": 10 ** 12, "doc_len": [16, 64]}),
    _config_case("tokenizer-missing", ["data.tokenizer"], command="pack", data={"tokenizer": "no/such/tokenizer"}),
    # --- Hugging Face Hub ids that are neither cached nor reachable (offline: nothing is fetched)
    Case("hub-tokenizer-missing", lambda r: ["pack", str(_cfg(r, data={"tokenizer": "org/no-such-model"}))],
         ["data.tokenizer", "'org/no-such-model'", "HF_HUB_OFFLINE=1"], env=_OFFLINE),
    Case("hub-teacher-missing", lambda r: ["cache", "run", str(_cfg(r, teacher={"model": "org/no-such-teacher"},
                                                                    cache={"k": 8}))],
         ["teacher.model", "'org/no-such-teacher'", "Hugging Face cache"], env=_OFFLINE),
    # --- object storage: a server that does not answer, a URI without a bucket
    Case("s3-source-unreachable", lambda r: ["pack", str(_cfg(r, data={"source": "s3://no-bucket/corpus/*.jsonl"}))],
         ["data.source", "s3://no-bucket/corpus", "connect"], env=_NO_S3),
    Case("s3-out-dir-no-bucket", lambda r: ["pack", str(_cfg(r, run={"out_dir": "s3://"}))],
         ["run.out_dir", "s3://", "not a bucket URI"]),
    # --- the output directory
    Case("out-dir-is-a-file", lambda r: ["pack", str(_cfg(r))] if (r / "out").write_text("x") else [], ["out"]),
    # --- teacher
    _teacher_case("teacher-missing", ["teacher.model"], teacher=lambda tiny, root: root / "no-teacher"),
    _teacher_case("teacher-no-config", ["teacher.model"], teacher=_no_config),
    _teacher_case("teacher-no-weights", ["teacher.model", "no weights"], teacher=_no_weights),
    _teacher_case("teacher-truncated", ["teacher.model", "model.safetensors", "truncated"],
                  teacher=_damaged_weights(lambda b: b[: len(b) // 2])),
    _teacher_case("teacher-bad-header", ["teacher.model", "model.safetensors", "corrupt"],
                  teacher=_damaged_weights(lambda b: b[:8] + b"{not json" + b[17:])),
    _teacher_case("teacher-not-safetensors", ["teacher.model", "model.safetensors", "not a safetensors"],
                  teacher=_damaged_weights(lambda b: b"\xff" * 16)),
    _teacher_case("kd-cache-too-small-for-ranks", ["phases[0]", "cache.windows_per_row_group"], command="train",
                  student={"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}},
                  train={"workers": 2, "batch_size": 2, "phases": [{"window_len": 128, "steps": 1}]}),
    _teacher_case("k-above-vocab", ["cache.k", "vocabulary"], cache={"k": 100000}),
    # --- caches
    Case("verify-not-a-dir", lambda r: ["cache", "verify", str(r / "nothing")], ["nothing"]),
    Case("verify-no-manifest", _verify_of(lambda d: (d / "shard-000000.parquet").write_bytes(b"x")),
         ["manifest"], code=1),
    Case("info-not-a-cache", _verify_of(lambda d: None, command="cache info"), ["cache"]),
    # --- checkpoints
    Case("export-missing", lambda r: ["export", str(r / "no-ckpt"), str(r / "out" / "m")], ["no-ckpt"]),
    Case("export-empty", _export_of(lambda c: c.mkdir()), ["ckpt"]),
    Case("export-incomplete", _export_of(lambda c: (c / "step-00000002").mkdir(parents=True)), ["ckpt"]),
    Case("resume-without-checkpoint", lambda r: ["train", "--resume", str(_cfg(
        r, student={"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}},
        train={"phases": [{"window_len": 128, "steps": 2}], "kd": {"alpha": 0.0}}))], ["--resume"]),
    # --- nothing deleted that posdistill did not write; paths stay inside their roots
    Case("export-into-user-dir", lambda r: ["export", str(_ckpt(r)), str(_user_dir(r))], ["mine", "did not write"]),
    Case("export-into-cwd", lambda r: ["export", str(_ckpt(r)), "."], ["."]),
    Case("export-into-its-checkpoint", lambda r: ["export", str(_ckpt(r)), str(r / "ckpt")], ["ckpt", "reads"]),
    Case("export-into-a-parent", lambda r: ["export", str(_ckpt(r)), str(r)], ["reads"]),
    Case("eval-out-user-dir", lambda r: ["eval", str(_cfg(r)), "--model", str(r), "--out", str(_user_dir(r))],
         ["mine", "did not write"]),
    Case("perturb-out-user-dir", lambda r: ["analyze", "perturb", str(_cfg(r)), "--model", str(r), "--out",
                                            str(_user_dir(r))], ["mine"]),
    Case("query-spans-out-user-dir", lambda r: ["analyze", "query-spans", "--before", str(r), "--after", str(r),
                                                "--out", str(_user_dir(r))], ["mine"]),
    Case("bootstrap-out-user-dir", lambda r: ["bootstrap", str(_cfg(r, teacher={"bootstrap": {"phases": [
        {"window_len": 64, "rope_theta": 10000.0, "steps": 1}]}})), "--out",
                                              str(_user_dir(r))], ["mine"]),
    Case("manifest-absolute-shard", _verify_of(_manifest_with("/etc/passwd")), ["shards[0].file", "/etc/passwd"],
         code=1),
    Case("manifest-dotdot-shard", _verify_of(_manifest_with("../../x.parquet")), ["shards[0].file", "../../x.parquet"],
         code=1),
    Case("manifest-info-dotdot", _verify_of(_manifest_with("../x.parquet"), command="cache info"), ["shards[0].file"]),
    _raw("run-name-path", "run: {name: ../../etc}\n", ["run.name"]),
    _raw("student-name-absolute", "student: {name: /tmp/x}\n", ["student.name"]),
    _raw("phase-name-slash", "train: {phases: [{name: a/b, window_len: 8, steps: 1}]}\n", ["train.phases[0].name"]),
    # --- strict YAML and finite numbers
    _raw("yaml-duplicate-section", "cache: {k: 8}\nrun: {seed: 1}\ncache: {k: 16}\n", ["duplicate key 'cache'",
                                                                                      "line 3", "line 1"]),
    _raw("yaml-duplicate-nested", "train:\n  lr: 0.1\n  lr: 0.2\n", ["duplicate key 'lr'", "line 3"]),
    _raw("lr-inf", "train: {lr: .inf}\n", ["train.lr", "finite"]),
    _raw("temperature-nan", "cache: {temperature: .nan}\n", ["cache.temperature", "finite"]),
    _raw("betas-out-of-range", "train: {betas: [0.9, 1.5]}\n", ["train.betas"]),
    _raw("seed-negative", "run: {seed: -3}\n", ["run.seed"]),
    _raw("seed-too-large", "train: {seed: 4294967296}\n", ["train.seed"]),
    _raw("variant-seed-negative", "students: [{name: a, seeds: [-1], phases: [{window_len: 8, steps: 1}]}]\n",
         ["students[0].seeds[0]"]),
    # --- the data must be tokenized as the teacher reads it
    _teacher_case("tokenizer-not-the-teachers", ["data.tokenizer", "byte", "teacher.model"], teacher=_bpe_teacher(300)),
    _teacher_case("teacher-without-tokenizer", ["teacher.model", "teacher.tokenizer"],
                  teacher=lambda tiny, root: _teacher(tiny, root, keep=lambda p: not p.name.startswith("tokenizer"))),
    # --- cluster
    Case("submit-unknown-stage", lambda r: ["submit", "bake", str(_cfg(r))], ["bake"]),
    Case("jobs-unreachable", lambda r: ["jobs", "list", "--address", "http://127.0.0.1:9"], ["127.0.0.1:9"]),
]


@pytest.fixture(scope="module", autouse=True)
def tiny_teacher(tmp_path_factory):
    from helpers import make_tiny_llama

    TINY[:] = [make_tiny_llama(tmp_path_factory.mktemp("tiny") / "teacher")]
    yield


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    argv = case.build(tmp_path)
    before = _tree(tmp_path)
    env = {**os.environ, "HOME": str(tmp_path / "home"), **case.env}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == case.code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    if case.code == 2:
        assert len(errors) == 1, proc.stderr[-3000:]
        message = errors[0]
    else:  # a command that reports findings (verify) rather than a bad invocation
        message = proc.stdout + proc.stderr
    for name in case.names:
        assert name in message, (name, message)
    left = _tree(tmp_path) - before - {p for p in _tree(tmp_path) if p.startswith("home")}
    assert not left, sorted(left)


def test_the_table_is_large_enough():
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def small_volume(tmp_path: Path):
    """A 64 KiB tmpfs: a real full disk (ENOSPC) and, remounted, a real read-only one."""
    d = tmp_path / "small"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


def _pack_onto(volume: Path, root: Path) -> subprocess.CompletedProcess:
    cfg = _cfg(root, run={"name": "bad", "out_dir": str(volume / "out")}, data={"synthetic": {"num_docs": 20000}},
               pack={"window_len": 256, "doc_len": [16, 64]})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "pack", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault,reason", [("full", "No space left on device"), ("read-only", "Read-only file system")])
def test_storage_faults_give_one_line(small_volume: Path, tmp_path: Path, fault: str, reason: str):
    if fault == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_volume)], check=True)
    proc = _pack_onto(small_volume, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and reason in errors[0] and str(small_volume / "out") in errors[0], proc.stderr
    assert list(small_volume.iterdir()) == []  # the half-written pack is gone
