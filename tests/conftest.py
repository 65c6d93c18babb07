"""Shared pytest setup. Keep it small: fixtures used by several test files only."""

import os
import sys
from pathlib import Path

import pytest

# No usage-stats calls home from the Ray instances tests start.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import ...`


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray (127.0.0.1, token auth on) for the whole session: each start costs seconds."""
    import ray

    from cluster.local import start_local

    if not ray.is_initialized():
        start_local(num_cpus=2)
    yield
    ray.shutdown()
