"""Where a model, tokenizer or dataset named in the config lives on this machine.

Every field that names one (``teacher.model``, ``data.tokenizer``, ``data.source``,
``student.init``, ``eval --model``) goes through :func:`local_path`, which reads the
reference in this order:

1. an existing local path, used as is: a path that exists always wins over a Hub id reading;
2. ``s3://`` / ``gs://`` URIs go to :func:`_object_store_copy` (``pipeline/storage.py``);
3. a Hugging Face Hub id, ``org/name`` or ``org/name@revision`` (a branch, tag or commit),
   fetched with ``huggingface_hub.snapshot_download`` into the standard Hub cache
   (``HF_HUB_CACHE``, else ``$HF_HOME/hub``); ``HF_TOKEN`` is the token for private or gated
   repositories, and with ``HF_HUB_OFFLINE=1`` only the cache is read. The environment is
   read at each call (not when ``huggingface_hub`` was imported);
4. anything else is left to the caller, whose "no such file or directory" message stays.

Only what the pipeline reads is fetched, and never code or pickles:

- ``model``: ``config.json``, ``generation_config.json``, the tokenizer files, the safetensors
  index and the ``*.safetensors`` weights it names (else ``model.safetensors``). Pickled
  ``.bin`` / ``.pt`` weights are never downloaded (unpickling can run code): a repository
  without safetensors weights is refused with a message saying so. ``*.py`` (remote code) is
  fetched only when the field's ``trust_remote_code`` is true (it is false by default);
- ``config``: ``config.json`` alone (vocabulary checks and ``posdistill plan``);
- ``tokenizer``: the tokenizer files and ``config.json``;
- ``dataset``: the ``.parquet``, ``.jsonl`` and ``.txt`` files of a dataset repository
  (licences and requirements files excepted), read like a local directory of them.

A Hub reference resolves to one commit per process (the first lookup's; later lookups with
other file patterns are pinned to it), and :func:`ref_identity` puts that 40-hex commit in the
fingerprints, so a cache built from one commit is never reused for another.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UserError

Kind = Literal["model", "config", "tokenizer", "dataset"]

# The files that make a tokenizer (what its identity hashes; what makes a directory one).
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json", "chat_template.jinja"})
MODEL_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors.index.json"})
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DATA_SUFFIXES = (".jsonl", ".parquet", ".txt")
_DATA_IGNORE = ("LICENSE*", "*/LICENSE*", "requirements*.txt", "*/requirements*.txt", ".*", "*/.*")
OBJECT_STORE_SCHEMES = ("s3://", "gs://")

# huggingface_hub.utils.validate_repo_id's rules, with the org part required; a revision is a
# branch, tag or commit (branches may hold '/').
_NAME = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_RE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^\s@]+))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None  # None: the default branch ("main")

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def hub_ref(ref: str | os.PathLike | None, kind: Kind = "model") -> HubRef | None:
    """``ref`` read as a Hub id, or None when it is an existing local path, a URI, or cannot be
    one (several '/', a leading '/', '.', '~', glob characters; for datasets also a name
    ending in a data file's suffix, so a missing ``corpus/docs.jsonl`` keeps the file error)."""
    if ref is None:
        return None
    text = str(ref)
    if "://" in text or text.startswith(("/", ".", "~")) or any(c in text for c in "*?[]\\"):
        return None
    m = _HUB_RE.match(text)
    if m is None:
        return None
    repo = m.group("repo")
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if kind == "dataset" and repo.lower().endswith((*DATA_SUFFIXES, ".json", ".csv", ".arrow")):
        return None
    if Path(text).exists():
        return None
    return HubRef(repo, m.group("rev"))


def is_remote(ref: str | os.PathLike | None, kind: Kind = "model") -> bool:
    """A Hub id or an object-store URI (something :func:`local_path` fetches)."""
    return ref is not None and (str(ref).startswith(OBJECT_STORE_SCHEMES) or hub_ref(ref, kind) is not None)


def local_path(ref: str | os.PathLike, field: str, kind: Kind, *, remote_code: bool = False) -> Path:
    """A local path holding what ``ref`` names (see the module docstring). A local path is
    returned as is, existing or not: its caller's own message says what is missing."""
    text = str(ref)
    if Path(text).exists():
        return Path(text)
    if text.startswith(OBJECT_STORE_SCHEMES):
        return _object_store_copy(text, field, kind)
    h = hub_ref(text, kind)
    if h is None:
        return Path(text)
    return _snapshot(h, text, field, kind, remote_code)


def ref_identity(ref: str | os.PathLike | None, field: str, kind: Kind) -> dict[str, Any]:
    """``{"hub": repo_id, "revision": <40-hex commit>}`` for a Hub id ({} for a local path), so a
    fingerprint changes when the revision moves."""
    if ref is None:
        return {}
    h = hub_ref(ref, kind)
    if h is None:
        if str(ref).startswith(OBJECT_STORE_SCHEMES):
            local_path(ref, field, kind)
            return {"uri": str(ref)}
        return {}
    return {"hub": h.repo_id, "revision": _snapshot(h, str(ref), field, kind, False).name}


def content_identity(ref: str | os.PathLike, field: str, kind: Kind = "model") -> Any:
    """``dir_identity`` of what ``ref`` names. A local directory's is exactly ``dir_identity``;
    a Hub id's keeps the files ``kind`` reads and adds its repository and commit."""
    from pipeline.fingerprint import dir_identity

    path = local_path(ref, field, kind)
    if hub_ref(ref, kind) is None:
        return dir_identity(path)
    files = [f for f in dir_identity(path) if hub_wanted(f["name"], kind)]
    return {"files": files, **ref_identity(ref, field, kind)}


def pinned(ref: str | None, field: str, kind: Kind) -> str | None:
    """``org/name@<commit>`` for a Hub id (resolved here), else ``ref``: what to hand another
    process (a cache actor, a training rank) so it loads exactly the commit this one hashed."""
    if ref is None:
        return None
    h = hub_ref(ref, kind)
    if h is None:
        return ref
    return f"{h.repo_id}@{_snapshot(h, ref, field, kind, False).name}"


def hub_wanted(relpath: str, kind: Kind, remote_code: bool = False) -> bool:
    """Whether a file of a Hub snapshot belongs to what ``kind`` reads (a snapshot may hold
    more: files another tool downloaded into the same cache)."""
    if kind == "dataset":
        return relpath.endswith(DATA_SUFFIXES) and not any(fnmatch.fnmatch(relpath, p) for p in _DATA_IGNORE)
    if kind == "tokenizer":
        return relpath in TOKENIZER_FILES or relpath == "config.json"
    if kind == "config":
        return relpath == "config.json"
    return (relpath in MODEL_FILES or relpath in TOKENIZER_FILES
            or ("/" not in relpath and relpath.endswith(".safetensors")) or (remote_code and relpath.endswith(".py")))


def _object_store_copy(ref: str, field: str, kind: Kind) -> Path:
    """A local copy of an ``s3://`` / ``gs://`` object or prefix (``pipeline/storage.py``)."""
    from pipeline.storage import local_copy

    try:
        return local_copy(ref)
    except UserError as err:
        raise UserError(f"{field}: {err}") from None


# ----------------------------------------------------------------------------- the Hub


_TRUE = {"1", "on", "yes", "true"}
_lock = threading.Lock()
_commits: dict[tuple[str, ...], str] = {}  # (repo_type, repo_id, revision, cache, endpoint) -> commit


def _forget() -> None:
    """Drop the per-process revision -> commit memo (tests that move a branch)."""
    with _lock:
        _commits.clear()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as the environment says now."""
    return any((os.environ.get(k) or "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> Path:
    """huggingface_hub's cache directory, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _patterns(kind: Kind, remote_code: bool) -> list[str]:
    if kind == "dataset":
        return [f"*{s}" for s in DATA_SUFFIXES]
    if kind == "config":
        return ["config.json"]
    if kind == "tokenizer":
        return sorted(TOKENIZER_FILES | {"config.json"})
    return sorted(MODEL_FILES | TOKENIZER_FILES) + (["*.py"] if remote_code else [])


def _snapshot(h: HubRef, ref: str, field: str, kind: Kind, remote_code: bool) -> Path:
    repo_type = "dataset" if kind == "dataset" else "model"
    cache = hub_cache()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    key = (repo_type, h.repo_id, h.revision or "main", str(cache), endpoint or "")
    with _lock:
        commit = _commits.get(key)
    revision = commit or h.revision or "main"
    ignore = list(_DATA_IGNORE) if kind == "dataset" else None
    folder = _download(h, ref, field, repo_type, revision, _patterns(kind, remote_code), ignore, cache, endpoint)
    if not _COMMIT_RE.match(folder.name):
        raise UserError(f"{field}: '{ref}' resolved to {folder}, which is not a Hub snapshot (a commit directory)")
    if kind == "model":
        weights = _weight_files(folder, ref, field)
        _download(h, ref, field, repo_type, folder.name, weights, None, cache, endpoint)
        missing = [w for w in weights if not (folder / w).is_file()]
        if missing:
            where = "the Hugging Face cache" if offline() else "the repository"
            raise UserError(f"{field}: '{ref}' (commit {folder.name[:12]}) has no {', '.join(missing[:4])} in {where}; "
                            "only *.safetensors weights are fetched from the Hub (pickled .bin weights can run code "
                            "when loaded): convert them, or download the model yourself and give its directory")
    with _lock:
        _commits.setdefault(key, folder.name)
    return folder


def _weight_files(folder: Path, ref: str, field: str) -> list[str]:
    """The safetensors files transformers loads: those the index names, else model.safetensors."""
    index = folder / SAFE_INDEX
    if not index.is_file():
        return [SAFE_WEIGHTS]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{field}: '{ref}': {SAFE_INDEX} is not a safetensors index ({err})") from None
    bad = [n for n in names if not isinstance(n, str) or n.startswith("/") or ".." in n.split("/")]
    if bad:
        raise UserError(f"{field}: '{ref}': {SAFE_INDEX} names weight files outside the repository: {bad[:2]}")
    return names


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _download(h: HubRef, ref: str, field: str, repo_type: str, revision: str, allow: list[str],
              ignore: list[str] | None, cache: Path, endpoint: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors
    is_offline = offline()
    head = f"{field}: '{ref}'"
    not_cached = f"{head} is not a local path, is not in the Hugging Face cache ({cache}) and cannot be downloaded"
    try:
        return Path(snapshot_download(
            h.repo_id, repo_type=repo_type, revision=revision, cache_dir=cache, endpoint=endpoint,
            local_files_only=is_offline, allow_patterns=allow, ignore_patterns=ignore, token=None))
    except hf_errors.GatedRepoError:
        raise UserError(f"{head} is a gated {repo_type} repository: accept its terms on the Hub and set HF_TOKEN "
                        "to a token of that account") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"{head} is not a local path, and the Hugging Face Hub has no {repo_type} repository "
                        f"'{h.repo_id}' (or it is private or gated: set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{head}: the Hugging Face repository '{h.repo_id}' has no revision '{revision}'") from None
    except getattr(hf_errors, "IncompleteSnapshotError", ()) as err:
        raise UserError(f"{head}: the cached snapshot is incomplete and cannot be completed here: "
                        f"{_first_line(err)}") from None
    except hf_errors.LocalEntryNotFoundError as err:
        cause = err.__cause__ or err.__context__
        if is_offline:
            raise UserError(f"{not_cached}: HF_HUB_OFFLINE=1 (download it once with network access, "
                            "or give a local directory)") from None
        reason = _first_line(cause) if cause is not None else _first_line(err)
        raise UserError(f"{not_cached}: the Hub cannot be reached ({reason})") from None
    except hf_errors.HfHubHTTPError as err:
        raise UserError(f"{head}: the Hugging Face Hub refused the download ({_first_line(err)})") from None
    except hf_errors.HFValidationError as err:
        raise UserError(f"{head} is not a valid Hugging Face Hub id ({_first_line(err)})") from None
    except OSError as err:
        from pipeline.errors import storage_error

        user = storage_error(err, where=cache)
        if user is None:
            raise UserError(f"{not_cached}: {_first_line(err)}") from None
        raise user from None
