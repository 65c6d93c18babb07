"""What a submitted job's ``working_dir`` contains: an allow-list, copied into a staging dir.

Uploading the project root with an exclude list ships whatever happens to be lying in the
tree — ``.env``, ``configs/secrets.env``, ``id_rsa``, ``.aws/credentials`` — to the cluster's
object store, where every job can read it. So nothing is uploaded unless :data:`UPLOAD_ALLOW`
names it, and even an allowed path is dropped when it is a dotfile, a dot-directory, a
symlink, bytecode, Parquet, or looks like a secret (:data:`SECRET_PATTERNS`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

UPLOAD_ALLOW: dict[str, tuple[str, ...]] = {
    "pipeline": ("*.py",),
    "stages": ("*.py",),
    "cluster": ("*.py", "*.yaml"),
    # The configs a job is pointed at, and the committed demo teacher (configs/teacher-tiny):
    # `posdistill submit cache configs/demo.yaml` reads it relative to the working dir.
    "configs": ("*.yaml", "*.yml", "*.json", "*.safetensors", "tokenizer.model", "vocab.txt", "merges.txt"),
    "pyproject.toml": (),
    "README.md": (),
}
"""Everything a job may receive: top-level entry -> file-name patterns allowed under it (a
top-level file needs none). The job only runs ``python -m pipeline.cli``, which needs the
three packages and the configs; tests, bench, runs/, caches and checkpoints stay home."""

SECRET_PATTERNS: tuple[str, ...] = ("*.env", "*secret*", "*credential*", "id_rsa*", "id_dsa*", "id_ecdsa*",
                                    "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "auth_token*")
"""File names never uploaded even under an allowed directory with an allowed suffix
(``configs/prod-credentials.json`` is still a credential)."""

_SKIP_DIRS = ("__pycache__", "runs", "checkpoints", "*.egg-info")
_SKIP_FILES = ("*.pyc", "*.parquet")


def _denied(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), p) for p in patterns)


def _file_allowed(path: Path, patterns: tuple[str, ...]) -> bool:
    """A regular file (not a symlink that could point anywhere), not hidden, not a secret,
    matching one of ``patterns`` (an empty tuple allows a top-level file as named)."""
    name = path.name
    if name.startswith(".") or path.is_symlink() or not path.is_file():
        return False
    if _denied(name, SECRET_PATTERNS) or _denied(name, _SKIP_FILES):
        return False
    return not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)


def _dir_allowed(name: str) -> bool:
    return not name.startswith(".") and not _denied(name, _SKIP_DIRS) and not _denied(name, SECRET_PATTERNS)


def _allowed_files(root: Path, entry: str, patterns: tuple[str, ...]) -> Iterator[Path]:
    """Files under ``root/entry`` that may be uploaded, relative to ``root``; symlinked
    directories are not followed."""
    top = root / entry
    if top.is_symlink():
        return
    if top.is_file():
        if _file_allowed(top, ()):
            yield Path(entry)
        return
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if _dir_allowed(d) and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _file_allowed(path, patterns):
                yield path.relative_to(root)


def staged_files(root: Path) -> list[Path]:
    """Every path (relative to ``root``) a job submitted from ``root`` uploads."""
    return [rel for entry, patterns in UPLOAD_ALLOW.items() for rel in _allowed_files(root, entry, patterns)]


def stage(root: Path, dest: Path) -> list[Path]:
    """Copy the allowed files of ``root`` into ``dest``; returns what was copied."""
    files = staged_files(root)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, dest / rel)
    return files


@contextlib.contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A temporary copy of ``root``'s allowed files, removed on exit (Ray has packed and
    uploaded it by the time ``submit_job`` returns)."""
    with tempfile.TemporaryDirectory(prefix="posdistill-upload-") as tmp:
        stage(root, Path(tmp))
        yield Path(tmp)
