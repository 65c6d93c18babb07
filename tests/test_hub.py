"""Hugging Face Hub ids (``org/name[@revision]``) for models, tokenizers and datasets, offline.

Every test builds a Hub cache in the standard layout under its tmp_path (``helpers.make_hub_snapshot``,
checked against huggingface_hub's own cache scanner) and sets ``HF_HUB_OFFLINE=1``: nothing here
touches the network, except one test that points ``HF_ENDPOINT`` at a closed local port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import make_hub_snapshot, make_tiny_llama
from pipeline import locate
from pipeline.config import parse_config
from pipeline.errors import UserError
from pipeline.locate import HubRef, hub_ref, local_path, pinned, ref_identity

REPO = Path(__file__).resolve().parents[1]
TEACHER, CORPUS = "org/tiny-teacher", "org/tiny-corpus"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny Llama directories with the byte tokenizer (different weights)."""
    root = tmp_path_factory.mktemp("teachers")
    return make_tiny_llama(root / "a", seed=0), make_tiny_llama(root / "b", seed=1)


def _corpus_files(n: int = 80, tag: str = "") -> dict[str, bytes | str]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"{tag}doc {i}: " + "abcdefghij"[i % 10] * (30 + i % 25) for i in range(n)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts[n // 2:]}), buf)
    return {"data/train-00000.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in texts[: n // 2]),
            "data/train-00001.parquet": buf.getvalue(),
            "README.md": "# a tiny corpus\n", "LICENSE.txt": "not a document\n", ".gitattributes": "*.parquet lfs\n"}


@pytest.fixture
def hub(tmp_path, monkeypatch, teachers):
    """An offline Hub cache holding org/tiny-teacher (main) and org/tiny-corpus (main)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # relative local paths are read from here
    locate._forget()
    commits = {TEACHER: make_hub_snapshot(cache, TEACHER, teachers[0]),
               CORPUS: make_hub_snapshot(cache, CORPUS, _corpus_files(), repo_type="dataset")}
    yield cache, commits
    locate._forget()


def _config(tmp_path: Path, **data) -> dict:
    return {"run": {"name": "hub", "out_dir": str(tmp_path / "out")},
            "data": {"source": CORPUS, "tokenizer": TEACHER, **data},
            "pack": {"window_len": 128, "doc_len": [16, 64], "shuffle_buffer": 16, "max_windows": 8},
            "teacher": {"model": TEACHER}, "cache": {"k": 8, "windows_per_shard": 4}}


# ----------------------------------------------------------------------------- reading a reference


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_ref("org/name") == HubRef("org/name", None)
    assert hub_ref("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert hub_ref("org/name@refs/convert/parquet") == HubRef("org/name", "refs/convert/parquet")
    assert hub_ref("meta-llama/Llama-3.2-1B") == HubRef("meta-llama/Llama-3.2-1B", None)
    for local in ["byte", "synthetic", "/abs/org/name", "./org/name", "~/org/name", "a/b/c", "data/*.jsonl",
                  "org--x/name", "org/na..me", "org/name.git", "s3://bucket/key", "gs://bucket/key", "org/",
                  "org/name@", "org/name@a b"]:
        assert hub_ref(local) is None, local
    # A dataset id never ends in a data file's suffix: a missing corpus/docs.jsonl keeps the file error.
    assert hub_ref("corpus/docs.jsonl", "dataset") is None
    # A local path that exists always wins.
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_ref("org/name") is None
    assert local_path("org/name", "teacher.model", "model") == Path("org/name")
    assert ref_identity("org/name", "teacher.model", "model") == {}


def test_the_test_cache_is_the_standard_layout(hub):
    from huggingface_hub import scan_cache_dir

    cache, commits = hub
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    repos = {(r.repo_type, r.repo_id): r for r in info.repos}
    assert {k for k in repos} == {("model", TEACHER), ("dataset", CORPUS)}
    (rev,) = repos[("model", TEACHER)].revisions
    assert rev.commit_hash == commits[TEACHER] and rev.refs == frozenset({"main"})


def test_a_hub_id_resolves_to_its_snapshot_and_commit(hub):
    cache, commits = hub
    path = local_path(TEACHER, "teacher.model", "model")
    assert path == cache / "models--org--tiny-teacher" / "snapshots" / commits[TEACHER]
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert ref_identity(TEACHER, "teacher.model", "model") == {"hub": TEACHER, "revision": commits[TEACHER]}
    assert pinned(TEACHER, "teacher.model", "model") == f"{TEACHER}@{commits[TEACHER]}"
    assert pinned("byte", "data.tokenizer", "tokenizer") == "byte"
    assert local_path(f"{TEACHER}@{commits[TEACHER]}", "teacher.model", "model") == path


# ----------------------------------------------------------------------------- the pipeline


def test_config_with_hub_ids_validates_packs_and_fingerprints(hub, tmp_path):
    from cluster.executor import LocalExecutor
    from pipeline.resolve import cache_spec, layout, pack_spec
    from stages.cache.stage import check_inputs, run_cache
    from stages.corpus import iter_documents, resolve_files
    from stages.pack import read_meta

    _, commits = hub
    raw = _config(tmp_path)
    cfg = parse_config(raw)
    files = resolve_files(CORPUS)
    assert [f.name for f in files] == ["train-00000.jsonl", "train-00001.parquet"]  # no LICENSE.txt, README
    docs = list(iter_documents(cfg.data, (16, 64), 0))
    assert len(docs) == 80 and docs[0].startswith("doc 0: ")

    pspec = pack_spec(cfg)
    ident = pspec.identity()
    assert ident["data"]["hub"] == CORPUS and ident["data"]["revision"] == commits[CORPUS]
    assert ident["tokenizer"]["hub"] == TEACHER and ident["tokenizer"]["revision"] == commits[TEACHER]
    cspec = cache_spec(cfg, pspec)
    assert cspec.identity()["teacher"]["revision"] == commits[TEACHER]
    assert check_inputs(cspec) == 260

    # posdistill pack, as a user runs it (a fresh process: the environment is all it gets).
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "pack", str(tmp_path / "c.yaml")], cwd=REPO,
                          env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pack_dir = layout(cfg).pack_dir(pspec)
    assert read_meta(pack_dir)["stats"]["windows"] == 8

    # The teacher's targets over it, in this process (no Ray): the worker loads the pinned commit.
    out = run_cache(cspec, pack_dir, layout(cfg).cache_dir(cspec), LocalExecutor(), verbose=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"] == f"{TEACHER}@{commits[TEACHER]}"
    assert manifest["identity"]["teacher"]["revision"] == commits[TEACHER]


def test_a_revision_resolves_another_snapshot_and_changes_the_fingerprint(hub, teachers, tmp_path):
    from pipeline.resolve import cache_spec, pack_spec

    cache, commits = hub
    second = make_hub_snapshot(cache, TEACHER, teachers[1], ref="v2")
    assert second != commits[TEACHER]
    assert local_path(f"{TEACHER}@v2", "teacher.model", "model").name == second
    assert local_path(f"{TEACHER}@{second}", "teacher.model", "model").name == second

    def cache_fp(model: str) -> tuple[str, dict]:
        raw = _config(tmp_path, source="synthetic", tokenizer="byte")
        raw["teacher"]["model"] = model
        cfg = parse_config(raw)
        spec = cache_spec(cfg, pack_spec(cfg))
        return spec.fingerprint(), spec.identity()["teacher"]

    main_fp, main_ident = cache_fp(TEACHER)
    v2_fp, v2_ident = cache_fp(f"{TEACHER}@v2")
    assert main_ident["revision"] == commits[TEACHER] and v2_ident["revision"] == second
    assert main_fp != v2_fp
    assert cache_fp(f"{TEACHER}@{second}")[0] == v2_fp  # the same commit by tag or by hash

    # main moves to the second commit: a new process (here: a cleared memo) resolves and
    # fingerprints the new commit, so the old cache is not reused.
    (cache / "models--org--tiny-teacher" / "refs" / "main").write_text(second)
    assert cache_fp(TEACHER)[0] == main_fp  # one process keeps the commit it resolved first
    locate._forget()
    assert cache_fp(TEACHER)[0] == v2_fp


def test_a_moved_dataset_revision_changes_the_pack_fingerprint(hub, tmp_path):
    from pipeline.resolve import pack_spec

    cache, commits = hub
    cfg = parse_config(_config(tmp_path))
    before = pack_spec(cfg).fingerprint()
    second = make_hub_snapshot(cache, CORPUS, _corpus_files(tag="new "), repo_type="dataset", ref="main")
    locate._forget()
    spec = pack_spec(cfg)
    assert spec.identity()["data"]["revision"] == second != commits[CORPUS]
    assert spec.fingerprint() != before


def test_student_init_and_eval_model_take_hub_ids(hub, tmp_path):
    from pipeline.resolve import train_specs
    from stages.evaluate.models import load_model
    from stages.student import build_student

    _, commits = hub
    raw = _config(tmp_path)
    raw["student"] = {"init": TEACHER}
    raw["train"] = {"phases": [{"window_len": 128, "steps": 1}]}
    (spec,) = train_specs(parse_config(raw))
    model, fresh = build_student(spec)
    assert not fresh and model.config.vocab_size == 260

    lm = load_model(f"{TEACHER}@{commits[TEACHER]}", device="cpu")
    assert lm.name == "tiny-teacher" and Path(lm.path).name == commits[TEACHER] and len(lm.tokenizer) == 260

    from stages.train.loop import pinned_spec

    pin = pinned_spec(spec)
    at = f"{TEACHER}@{commits[TEACHER]}"
    assert (pin.student.init, pin.tokenizer, pin.teacher_model) == (at, at, at)


def test_a_teacher_dir_not_made_yet_still_lends_the_tokenizer_vocabulary(hub, tmp_path):
    """``teacher.model: pending/teacher`` that a bootstrap will write reads as a Hub id until it
    exists; the student's vocabulary check falls back to the tokenizer, as for a missing directory."""
    from pipeline.resolve import train_specs
    from stages.student import student_config
    from stages.train.loop import pinned_spec

    raw = _config(tmp_path, source="synthetic", tokenizer="byte")
    raw["teacher"]["model"] = "pending/teacher"
    raw["student"] = {"config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}}
    raw["train"] = {"phases": [{"window_len": 128, "steps": 1}]}
    (spec,) = train_specs(parse_config(raw))
    mcfg, fresh = student_config(spec)
    assert fresh and mcfg.vocab_size == 260
    assert pinned_spec(spec).teacher_model == "pending/teacher"


# ----------------------------------------------------------------------------- what is fetched


def test_no_code_and_no_pickled_weights_are_fetched(hub, teachers):
    cache, _ = hub
    assert not [p for p in locate._patterns("model", False) if p.endswith((".py", ".bin", ".pt", ".pth"))]
    assert "*.py" in locate._patterns("model", True)  # only with the field's trust_remote_code
    assert not locate.hub_wanted("modeling_evil.py", "model") and locate.hub_wanted("modeling_x.py", "model", True)
    assert not locate.hub_wanted("pytorch_model.bin", "model")
    # A repository with pickled weights only is refused with a message that says why.
    files = {p.name: p.read_bytes() for p in teachers[0].iterdir() if p.suffix != ".safetensors"}
    files["pytorch_model.bin"] = b"pickle"
    make_hub_snapshot(cache, "org/pickled", files)
    with pytest.raises(UserError, match=r"^teacher\.model: 'org/pickled' .*only \*\.safetensors"):
        local_path("org/pickled", "teacher.model", "model")
    # trust_remote_code stays off wherever a model or tokenizer is loaded.
    for path in [*(REPO / "stages").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]:
        for line in path.read_text().splitlines():
            assert "trust_remote_code=True" not in line.replace(" ", ""), (path, line)


def test_an_index_names_the_weight_files(hub, teachers):
    cache, _ = hub
    files = {p.name: p.read_bytes() for p in teachers[0].iterdir()}
    files["model-00001-of-00001.safetensors"] = files.pop("model.safetensors")
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}})
    make_hub_snapshot(cache, "org/sharded", files)
    path = local_path("org/sharded", "teacher.model", "model")
    assert (path / "model-00001-of-00001.safetensors").is_file()


# ----------------------------------------------------------------------------- errors


def test_a_missing_id_is_one_line_naming_the_field(hub):
    cache, _ = hub
    for field, kind in [("teacher.model", "model"), ("data.tokenizer", "tokenizer"), ("data.source", "dataset")]:
        with pytest.raises(UserError) as err:
            local_path("org/missing@v9", field, kind)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"{field}: 'org/missing@v9' is not a local path, is not in the Hugging Face cache ")
        assert str(cache) in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(UserError, match=r"^teacher\.model: 'org/tiny-teacher@nope' .*HF_HUB_OFFLINE=1"):
        local_path(f"{TEACHER}@nope", "teacher.model", "model")  # the repo is cached, not that revision


def test_a_missing_id_via_the_cli_exits_2_with_one_line(hub, tmp_path):
    raw = _config(tmp_path, tokenizer="org/no-such-tokenizer")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "pack", str(tmp_path / "c.yaml")], cwd=REPO,
                          env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "data.tokenizer: 'org/no-such-tokenizer'" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert not (tmp_path / "out" / "pack").exists() or not any((tmp_path / "out" / "pack").iterdir())


def test_unreachable_hub_falls_back_to_the_cache_or_says_so(hub, monkeypatch):
    """Not offline, but the Hub cannot be reached (a closed port): a cached id still resolves;
    an uncached one is one line saying the Hub cannot be reached."""
    _, commits = hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert local_path(TEACHER, "teacher.model", "config").name == commits[TEACHER]
    with pytest.raises(UserError, match=r"^data\.source: 'org/missing' is not a local path, .*cannot be reached"):
        local_path("org/missing", "data.source", "dataset")


def test_hf_token_is_sent_and_a_repo_the_hub_lacks_is_one_line(hub, monkeypatch):
    """A stand-in Hub on 127.0.0.1 that knows no repository: the request carries HF_TOKEN (read
    when the call is made), and the answer becomes one line naming the field and the id."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str | None]] = []

    class NoRepos(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("authorization")))
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoRepos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("HF_TOKEN", "hf_posdistill_test_token")
        with pytest.raises(UserError) as err:
            local_path("org/private-teacher", "teacher.model", "model")
    finally:
        server.shutdown()
        server.server_close()
    msg = str(err.value)
    assert msg.startswith("teacher.model: 'org/private-teacher' is not a local path, and the Hugging Face Hub has no "
                          "model repository 'org/private-teacher'") and "HF_TOKEN" in msg and "\n" not in msg
    assert seen and seen[0][0].startswith("/api/models/org/private-teacher")
    assert seen[0][1] == "Bearer hf_posdistill_test_token"


def test_a_dataset_repo_without_data_files_is_refused(hub):
    cache, _ = hub
    make_hub_snapshot(cache, "org/empty", {"README.md": "nothing\n", "LICENSE.txt": "x\n"}, repo_type="dataset")
    from stages.corpus import resolve_files

    with pytest.raises(UserError, match=r"^data\.source: the Hugging Face dataset 'org/empty' .*no \.jsonl"):
        resolve_files("org/empty")


def test_local_paths_keep_their_messages(hub):
    from stages.corpus import resolve_files
    from stages.tokenizer import load_tokenizer

    with pytest.raises(UserError, match=r"^data\.source: no \.jsonl/\.parquet/\.txt files or saved dataset at "):
        resolve_files("corpus/docs.jsonl")
    with pytest.raises(UserError, match=r"^data\.tokenizer: 'no/such/tokenizer' is neither 'byte' nor"):
        load_tokenizer("no/such/tokenizer")
