"""One job at a time per output directory: an advisory lock file inside it that names its holder.

Two ``train`` runs in one run directory (or two cache jobs on one cache) would write the same
checkpoints and shards at once. The job that writes a directory holds ``flock`` on its
``.lock`` file for as long as it writes; the kernel releases it when the process ends however
it ends (``kill -9`` included), so a lock is never stale and never needs deleting. The file
records who holds it (pid, host, since when), so a second job refuses with one line naming
the holder. The file is hidden: a bucket mirror never pushes it. Its descriptor is not
inherited (Python opens it close-on-exec), so the holder's children never keep it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

LOCK_FILE = ".lock"


def holder(directory: Path) -> str:
    """Who holds (or last held) the lock of ``directory``, in words."""
    try:
        info = json.loads((Path(directory) / LOCK_FILE).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["since"])))
        return f"pid {int(info['pid'])} on {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


@contextlib.contextmanager
def exclusive(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the block (``directory`` must exist); a second holder
    gets a UserError naming the first: ``what`` says which kind of job writes it."""
    directory = Path(directory)
    fd = os.open(directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{directory}: another {what} is writing here ({holder(directory)}); wait for it "
                            "to finish or stop it, then run again") from None
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        yield
    finally:
        os.close(fd)
