"""Object storage (``s3://``, ``gs://``): a bucket prefix is mirrored by a local scratch directory.

Stages read and write POSIX paths only. A root given as a URI (``cache.root``,
``run.out_dir``) is a local mirror under ``$POSDISTILL_SCRATCH`` (default
``~/.cache/posdistill/scratch``) that the run graph pulls before it decides whether a node
is done and pushes while and after the node computes. Inputs given as URIs (``data.source``,
``data.tokenizer``, ``teacher.model``, ``student.init``) are pulled once and read locally.

Object stores have no rename, so the guarantees are kept by ordering instead:
- an object becomes visible only when its upload completes (a single PUT, or a multipart
  upload that is completed at close); a process killed mid-upload leaves no object, so a
  partial shard is never listed;
- a node's completion files (``_done.json``, a cache's ``manifest.json``) are deleted first
  and uploaded last, after every other file of the node, so "done" on the bucket means
  every file it names is there;
- shards are uploaded one by one as they finish, so a killed job resumes from the bucket on
  any machine; the next run's checks (page CRCs, checkpoint markers) decide what is valid.

The filesystem layer is ``pyarrow.fs``: credentials and endpoints come from the standard
variables (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for S3-compatible servers; Google's
application-default credentials for ``gs://``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.paths import inside

SCHEMES = ("s3://", "gs://")
# Written last, in this order, and deleted first: their presence means "complete".
LAST_FILES = ("manifest.json", "_done.json")
_CHUNK = 16 << 20


def is_remote(ref: str | Path | None) -> bool:
    return isinstance(ref, str) and ref.startswith(SCHEMES)


def scratch_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posdistill" / "scratch"
    return Path(os.environ.get("POSDISTILL_SCRATCH", default))


def mirror_path(uri: str) -> Path:
    """The local directory that mirrors ``uri`` (``s3://b/k`` -> ``<scratch>/s3/b/k``)."""
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise UserError(f"'{uri}': not a bucket URI (s3://bucket/prefix)")
    return scratch_root().joinpath(scheme, *parts)


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri.rstrip("/"))
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError with the reason
        raise UserError(f"'{uri}': cannot open its filesystem ({str(err).splitlines()[0][:200]})") from None


def _error(uri: str, err: Exception) -> UserError:
    return UserError(f"'{uri}': {str(err).splitlines()[0][:300]}")


class Remote:
    """A bucket prefix and the local directory that mirrors it.

    A memo (``<scratch>/.sync/...``) records, per file, the local (size, mtime_ns) and the
    object's (size, mtime) as of the last transfer: a file is sent again only when its local
    stat changed, and fetched again only when the object (or the local copy) changed; no
    clock comparison between machines is involved."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.local = mirror_path(self.uri)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Remote({self.uri!r})"

    # ------------------------------------------------------------------ bookkeeping

    @property
    def _memo_file(self) -> Path:
        # Beside the mirror, not in it: the mirror holds exactly the bucket's files, so a
        # directory's content identity is the same on every machine.
        rel = self.local.relative_to(scratch_root())
        return scratch_root() / ".sync" / rel.parent / f"{rel.name}.json"

    def _memo(self) -> dict[str, list[int]]:
        try:
            return json.loads(self._memo_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, memo: dict[str, list[int]]) -> None:
        f = self._memo_file
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, f)

    def _entry(self, name: str, info: Any) -> list[int] | None:
        try:
            st = (self.local / name).stat()
        except FileNotFoundError:
            return None
        return [st.st_size, st.st_mtime_ns, info.size, info.mtime_ns or 0]

    def listing(self) -> dict[str, Any]:
        """Relative name -> FileInfo of every object under the prefix ({} when there is none)."""
        import pyarrow.fs as pafs

        fs, base = _fs(self.uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as err:
            raise _error(self.uri, err) from None
        return {i.path[len(base):].lstrip("/"): i for i in infos if i.type == pafs.FileType.File}

    def exists(self) -> bool:
        return bool(self.listing())

    # ------------------------------------------------------------------ transfers

    def pull(self) -> Path:
        """Make the mirror hold exactly the objects under the prefix; returns it. Local files
        with no object are removed (the bucket is the truth); hidden files stay."""
        with self._lock:
            fs, base = _fs(self.uri)
            listing = self.listing()
            memo = self._memo()
            for name, info in listing.items():
                entry = memo.get(name)
                if entry is not None and entry == self._entry(name, info):
                    continue
                self._download(fs, base, name, info)
                memo[name] = self._entry(name, info)
            if self.local.is_dir():
                for path in self.local.rglob("*"):
                    rel = path.relative_to(self.local)
                    if path.is_file() and not _hidden(rel) and rel.as_posix() not in listing:
                        path.unlink()
                        memo.pop(rel.as_posix(), None)
            memo = {n: e for n, e in memo.items() if n in listing}
            self._save(memo)
            return self.local

    def fetch(self, name: str) -> None:
        """Have ``name`` locally as the bucket holds it (another node may have written it)."""
        with self._lock:
            fs, base = _fs(self.uri)
            info = fs.get_file_info(f"{base}/{name}")
            memo = self._memo()
            local = self._entry(name, info)
            if not info.is_file:
                raise UserError(f"'{self.uri}/{name}': not on the bucket")
            if local is not None and local[0] == info.size and memo.get(name) in (None, local):
                memo[name] = local  # written here (or on a shared disk) and uploaded by its writer
            else:
                self._download(fs, base, name, info)
                memo[name] = self._entry(name, info)
            self._save(memo)

    def push(self, final: bool = True) -> int:
        """Upload the mirror's files whose local stat changed since their last transfer. With
        ``final``: the completion files are deleted from the bucket first and uploaded last,
        and objects with no local file are deleted, so a push cut short is never taken for
        complete. Without (a sync while the node computes): completion files stay local.
        Returns the number of files uploaded."""
        with self._lock:
            if not self.local.is_dir():
                return 0
            fs, base = _fs(self.uri)
            listing = self.listing()
            memo = self._memo()
            files = sorted(p.relative_to(self.local).as_posix() for p in self.local.rglob("*")
                           if p.is_file() and not _hidden(p.relative_to(self.local)))
            def stale(name: str) -> bool:
                info = listing.get(name)
                return info is None or memo.get(name) != self._entry(name, info)

            data = [n for n in files if n not in LAST_FILES and stale(n)]
            last = [n for n in LAST_FILES if n in files] if final else []
            gone = set(listing) - set(files) if final else set()
            if not data and not gone and not any(stale(n) for n in last):
                return 0
            if final:
                for name in reversed(LAST_FILES):
                    if name in listing:
                        self._delete(fs, base, name)
                        listing.pop(name)
                        memo.pop(name, None)
                gone -= set(LAST_FILES)
            sent = 0
            for batch in (data, sorted(gone), last):  # completion files after everything else
                for name in batch:
                    if batch is gone:
                        self._delete(fs, base, name)
                        memo.pop(name, None)
                    elif self._upload(fs, base, name):
                        memo[name] = self._entry(name, fs.get_file_info(f"{base}/{name}"))
                        sent += 1
                self._save(memo)
            return sent

    def upload_file(self, path: Path, name: str) -> None:
        """One file to ``<uri>/<name>`` (a worker publishing its shard); not recorded here."""
        fs, base = _fs(self.uri)
        self._upload(fs, base, name, src=path)

    def _download(self, fs: Any, base: str, name: str, info: Any) -> None:
        dst = inside(self.local, name, f"'{self.uri}': object key")  # a key with '..' writes nothing outside
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.pull-{os.getpid()}")
        try:
            with fs.open_input_stream(f"{base}/{name}") as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _error(f"{self.uri}/{name}", err) from None
        os.replace(tmp, dst)

    def _upload(self, fs: Any, base: str, name: str, src: Path | None = None) -> bool:
        try:
            with open(src or self.local / name, "rb") as f, fs.open_output_stream(f"{base}/{name}") as out:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
        except FileNotFoundError:
            return False  # removed locally while we pushed (a stray deleted, a file replaced)
        except OSError as err:
            raise _error(f"{self.uri}/{name}", err) from None
        return True

    def _delete(self, fs: Any, base: str, name: str) -> None:
        try:
            fs.delete_file(f"{base}/{name}")
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _error(f"{self.uri}/{name}", err) from None


def _hidden(rel: Path) -> bool:
    """Temp files, locks and memos (``.name``) never leave the machine."""
    return any(part.startswith(".") for part in rel.parts)


class Syncer:
    """Pushes a mirror every ``interval_s`` while a node computes (completion files excepted),
    so a killed job leaves its finished shards and checkpoints on the bucket."""

    def __init__(self, remote: Remote, interval_s: float = 30.0):
        self.remote = remote
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="posdistill-sync", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> "Syncer":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.remote.push(final=False)
            except BaseException as err:  # surfaced by the final push, which would fail the same way
                self.error = err

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def remote_for(local: str | Path) -> Remote | None:
    """The bucket prefix a scratch path mirrors (None for a path outside the scratch root)."""
    try:
        rel = Path(local).resolve().relative_to(scratch_root().resolve())
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 2 or parts[0] not in {s.split(":")[0] for s in SCHEMES}:
        return None
    return Remote(f"{parts[0]}://" + "/".join(parts[1:]))


_copies: dict[str, Path] = {}
_GLOB = set("*?[")


def local_copy(uri: str) -> Path:
    """A local copy of an input named by URI: one object, every object under a prefix, or a
    glob (``s3://b/docs/*.jsonl``: the prefix before the first pattern is pulled). Pulled once
    per process; the sync memo makes a second process's pull list the bucket and copy nothing."""
    if uri in _copies:
        return _copies[uri]
    scheme, rest = uri.split("://", 1)
    parts = rest.rstrip("/").split("/")
    cut = next((i for i, p in enumerate(parts) if _GLOB & set(p)), len(parts))
    prefix, pattern = f"{scheme}://" + "/".join(parts[:cut]), parts[cut:]
    import pyarrow.fs as pafs

    fs, base = _fs(prefix)
    try:
        info = fs.get_file_info(base)
    except OSError as err:
        raise _error(prefix, err) from None
    if info.type == pafs.FileType.File:  # one object: mirror its parent prefix, keep only it
        parent, name = prefix.rsplit("/", 1)
        remote = Remote(parent)
        remote.fetch(name)
        path = remote.local / name
    elif info.type == pafs.FileType.NotFound and not remote_listing_nonempty(prefix):
        raise UserError(f"'{uri}': no such object or prefix")
    else:
        path = Remote(prefix).pull().joinpath(*pattern)
    _copies[uri] = path
    return path


def remote_listing_nonempty(uri: str) -> bool:
    try:
        return bool(Remote(uri).listing())
    except UserError:
        return False
