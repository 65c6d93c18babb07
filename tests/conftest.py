"""Shared pytest setup. Keep it small: fixtures used by several test files only."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# No usage-stats calls home from the Ray instances tests start.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from helpers import ...`

# The file-hash memo (pipeline.fingerprint) of this session and every process it starts lives in
# a throwaway directory, never in the user's ~/.cache.
_XDG_CACHE = tempfile.mkdtemp(prefix="posdistill-test-cache-")
os.environ["XDG_CACHE_HOME"] = _XDG_CACHE
atexit.register(shutil.rmtree, _XDG_CACHE, True)
# ...but DeepSpeed's JIT-built CPU ops stay where torch keeps them without that override, so
# a run does not rebuild them (~100 s) each session.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

# Fault-injection hooks (tests/hooks/sitecustomize.py) in every process the tests start, and in
# this one; production code never reads them.
_HOOKS = str(Path(__file__).resolve().parent / "hooks")
os.environ["POSDISTILL_TEST_HOOKS"] = "1"
# The checkout itself too: the hooks import the stages before a child's cwd joins sys.path, and
# must find this tree whatever an installed copy points at.
_REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([_HOOKS, _REPO, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

def _load_hooks() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("posdistill_test_hooks", Path(_HOOKS) / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # installs the hooks (POSDISTILL_TEST_HOOKS is set above)


_load_hooks()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray (127.0.0.1, token auth on) for the whole session: each start costs seconds."""
    import ray

    from cluster.local import start_local

    if not ray.is_initialized():
        start_local(num_cpus=2)
    yield
    ray.shutdown()
