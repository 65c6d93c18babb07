"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto's standalone
server (``python -m moto.server``), a separate process speaking HTTP, reached through
pyarrow.fs exactly as a bucket on AWS or any S3-compatible store is (``AWS_ENDPOINT_URL``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "posdistill-test",
           "AWS_SECRET_ACCESS_KEY": "posdistill-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, "moto server exited at start"
            assert time.monotonic() < deadline, "moto server did not listen within 30 s"
            time.sleep(0.2)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_server, monkeypatch, tmp_path) -> str:
    """A fresh bucket (``s3://<name>``) with the server's variables in this process's
    environment (so CLI subprocesses inherit them) and a scratch root under tmp_path."""
    import pyarrow.fs as pafs

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("POSDISTILL_SCRATCH", str(tmp_path / "scratch"))
    name = f"b-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"], scheme="http",
                           access_key=s3_server["AWS_ACCESS_KEY_ID"], secret_key=s3_server["AWS_SECRET_ACCESS_KEY"],
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(name)
    return f"s3://{name}"


def put_tree(local: os.PathLike, uri: str) -> None:
    """Upload a local directory tree to ``uri`` (test inputs: a corpus, a teacher)."""
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
