"""Small builders shared by tests and benchmarks (tiny models, no downloads)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from stages.tokenizer import BYTE_VOCAB_SIZE


def make_tiny_llama(dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A random LlamaForCausalLM (vocab 260, hidden 64, 2 layers, 4 heads) plus the byte
    tokenizer, saved as a Hugging Face directory. ``overrides`` go to ``LlamaConfig``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from stages.tokenizer import BYTE_VOCAB_SIZE, build_byte_tokenizer

    params: dict[str, Any] = dict(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=257, eos_token_id=258, pad_token_id=256, tie_word_embeddings=False,
    )
    params.update(overrides)
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**params))
    out = Path(dir)
    model.save_pretrained(out)
    build_byte_tokenizer().save_pretrained(out)
    return out


def make_hub_snapshot(cache: str | Path, repo_id: str, files: str | Path | dict[str, bytes | str], *,
                      repo_type: str = "model", ref: str | None = "main", commit: str | None = None) -> str:
    """Files in a huggingface_hub cache, in its standard layout (what ``snapshot_download``
    leaves behind): ``<type>s--<org>--<name>/blobs/<sha256>``, ``snapshots/<commit>/<path>`` as
    relative symlinks to those blobs, and ``refs/<ref>`` holding the commit (no newline).
    ``files``: a directory to copy, or ``{path in repo: content}``. Returns the commit."""
    import hashlib
    import os

    if not isinstance(files, dict):
        root = Path(files)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    contents = {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(contents):
            h.update(name.encode() + b"\0" + hashlib.sha256(contents[name]).digest())
        commit = h.hexdigest()
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    for name, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        dest = snap / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    if ref is not None:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


# ----------------------------------------------------------------------------- stage runners
# Tests drive single stages with the specs the graph would give them (pipeline.resolve).


def phase_config(cfg: Any, phase: int | None) -> Any:
    """``train.phases[phase]`` of a config without students (None: the top-level pack)."""
    return None if phase is None else cfg.train.phases[phase]


def pack_spec_of(cfg: Any, phase: int | None = None) -> Any:
    from pipeline.resolve import pack_spec, phase_pack_spec

    return pack_spec(cfg) if phase is None else phase_pack_spec(cfg, cfg.train.phases[phase])


def build_pack(cfg: Any, phase: int | None = None) -> Path:
    from pipeline.resolve import layout
    from stages.pack import run_pack

    spec = pack_spec_of(cfg, phase)
    return run_pack(spec, layout(cfg).pack_dir(spec), verbose=False)


def cache_spec_of(cfg: Any, phase: int | None = None) -> Any:
    from pipeline.resolve import cache_spec

    return cache_spec(cfg, pack_spec_of(cfg, phase))


def cache_dir_of(cfg: Any, phase: int | None = None) -> Path:
    from pipeline.resolve import layout

    return layout(cfg).cache_dir(cache_spec_of(cfg, phase))


def build_cache(cfg: Any, phase: int | None = None, executor: Any = None, force: bool = False,
                verbose: bool = False, address: str | None = None) -> Path:
    """Pack, then cache with ``executor`` (default: the Ray executor on ``address`` or embedded)."""
    from cluster.executor import make_cache_executor
    from stages.cache.stage import run_cache

    spec = cache_spec_of(cfg, phase)
    executor = executor or make_cache_executor(spec.teacher, spec.cache, address)
    return run_cache(spec, build_pack(cfg, phase), cache_dir_of(cfg, phase), executor, force=force, verbose=verbose)


# ----------------------------------------------------------------------------- job uploads

PLANTED_SECRETS = (".env", "configs/secrets.env", "id_rsa", ".aws/credentials", "runs/x.parquet",
                   "configs/.hidden.yaml", "configs/prod-credentials.json", "configs/tls.pem",
                   "pipeline/.env", "stages/id_ed25519", "pipeline/__pycache__/cli.cpython-311.pyc",
                   "configs/runs/out.parquet")
PLANTED_MARKER = "configs/planted-marker.yaml"  # allowed: tells this tree's upload from others


def planted_tree(dest: Path) -> Path:
    """A copy of the repository's tracked files plus secrets and outputs that no job upload
    may contain (:data:`PLANTED_SECRETS`), a symlink to one of them, and an allowed marker."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    listing = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    tracked = subprocess.run(listing, capture_output=True, check=True, text=True).stdout.split("\0")
    for rel in filter(None, tracked):
        if (root / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest / rel)
    for rel in PLANTED_SECRETS:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text("SECRET=planted\n")
    (dest / "configs" / "link.yaml").symlink_to(dest / ".env")
    (dest / PLANTED_MARKER).write_text("marker: true\n")
    return dest


class InductionBody(nn.Module):
    """Exact induction, computed rather than learned: at each position predict the token that
    followed the most recent earlier occurrence of the longest suffix (up to ``max_n``) ending
    there. Hidden state = a scaled one-hot of that prediction, so ``lm_head`` = identity."""

    def __init__(self, vocab: int, max_n: int = 24):
        super().__init__()
        self.vocab, self.max_n = vocab, max_n
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def _predict(self, seq: list[int]) -> list[int]:
        last: list[dict[tuple, int]] = [dict() for _ in range(self.max_n + 1)]
        preds = []
        for t in range(len(seq)):
            pred = 0
            for n in range(min(self.max_n, t + 1), 0, -1):
                s = last[n].get(tuple(seq[t - n + 1:t + 1]))
                if s is not None:
                    pred = seq[s + 1]
                    break
            preds.append(pred)
            for n in range(1, min(self.max_n, t + 1) + 1):
                last[n][tuple(seq[t - n + 1:t + 1])] = t
        return preds

    def forward(self, input_ids, position_ids=None, use_cache=False, **kwargs):
        preds = torch.tensor([self._predict(row) for row in input_ids.tolist()])  # [B, T]
        return SimpleNamespace(last_hidden_state=10.0 * nn.functional.one_hot(preds, self.vocab).float())


class InductionLM(nn.Module):
    """A perfect copier with a body and an lm_head, scored like any causal LM."""

    def __init__(self, vocab: int = BYTE_VOCAB_SIZE):
        super().__init__()
        self.model = InductionBody(vocab)
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab))
