"""The one exception type a user sees: a message naming the field or file to fix."""

import errno
import os
import uuid
from pathlib import Path


class UserError(Exception):
    """Bad input that the user can fix. The CLI prints it on one line and exits 2."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised once whatever this process started has been stopped,
    so the CLI exits 128 + the signal number (130, 143). A KeyboardInterrupt, so that code
    which handles Ctrl-C handles it: Ray's waits turn one into their own KeyboardInterrupt
    (an exception of another type raised inside them becomes a SystemError)."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # signals the CLI's handler has seen, first first


def on_stop_signal(signum: int, _frame: object) -> None:
    """The CLI's SIGINT and SIGTERM handler: remember the signal, then unwind with
    :class:`Stopped` (``finally`` blocks shut the embedded Ray and the ranks down)."""
    _received.append(signum)
    raise Stopped(signum)


def stop_signal() -> int | None:
    """The first stop signal the CLI's handler has seen, if any."""
    return _received[0] if _received else None


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` if a stop signal has arrived. A handler's exception lands in
    whatever Python code runs next, which may be a library callback that swallows it (Ray
    runs Python from its C++ threads and finalizers); loops that drive long work call this,
    so a signal is obeyed even then."""
    if _received:
        raise Stopped(_received[0])


_STORAGE_HINTS = {
    errno.ENOSPC: "free space there, or point run.out_dir / cache.root at a larger volume",
    errno.EDQUOT: "the disk quota is used up: free space, or point run.out_dir / cache.root elsewhere",
    errno.EROFS: "run.out_dir and cache.root must be writable; only a finished cache may sit on read-only storage",
    errno.EACCES: "run.out_dir and cache.root must be writable by this user",
    errno.ENOTDIR: "a file stands where run.out_dir or cache.root needs a directory",
}


def storage_error(err: OSError, where: object = None) -> UserError | None:
    """One line for the storage faults a run can meet (disk full, read-only, no permission),
    naming the path; ``None`` for any other OSError, which stays a bug with a traceback."""
    hint = _STORAGE_HINTS.get(err.errno)
    if hint is None:
        return None
    return UserError(f"{err.filename or where or 'the output directory'}: {os.strerror(err.errno)} ({hint})")


PROBE_BYTES = 1 << 20  # a volume that cannot take 1 MiB more is full for any checkpoint or shard


def write_failure(err: BaseException, where: str | Path) -> UserError | None:
    """One line for a write that failed because the storage did, also when the exception lost
    the errno on its way (``torch.save``'s RuntimeError, safetensors' SafetensorError): an
    OSError with a storage errno speaks for itself; for anything else a probe write of
    :data:`PROBE_BYTES` next to ``where`` tells whether the volume is full or read-only now.
    None: not the storage (a bug keeps its traceback); a UserError or a signal is never recast."""
    if isinstance(err, (UserError, Stopped)):
        return None
    if isinstance(err, OSError) and (user := storage_error(err, where)) is not None:
        return user
    probe = _probe(Path(where))
    return None if probe is None else storage_error(OSError(probe, os.strerror(probe)), where)


def _probe(where: Path) -> int | None:
    """The storage errno a fresh write of :data:`PROBE_BYTES` beside ``where`` meets, or None."""
    base = next((p for p in [where, *where.parents] if p.is_dir()), None)
    if base is None:
        return None
    probe = base / f".posdistill-space-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # hidden: never synced
    try:
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno if e.errno in _STORAGE_HINTS else None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None
