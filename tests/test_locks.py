"""The per-directory lock between real processes: a second holder is refused with one line
naming the first (pid, host, since), and the lock is free as soon as the first ends, even
by SIGKILL. The stages' own use of it: tests/test_cache_chaos.py (two cache jobs on one
cache) and tests/test_train_faults.py (two trains on one run directory)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.locks import exclusive

HOLD = """
import sys, time
from pathlib import Path
from pipeline.locks import exclusive
with exclusive(Path(sys.argv[1]), "test job"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("end", [signal.SIGTERM, signal.SIGKILL])
def test_second_holder_is_refused_naming_the_first_until_it_ends(tmp_path: Path, end: int):
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as err:
            with exclusive(tmp_path, "test job"):
                pass
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path}: another test job is writing here (pid {first.pid} on "
                              f"{socket.gethostname()} since 20")
        assert "\n" not in msg
    finally:
        first.send_signal(end)
        first.wait(timeout=30)
    with exclusive(tmp_path, "test job"):  # released by the kernel, whatever the end
        pass
    again = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == "held", again.stderr
