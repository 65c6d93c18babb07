"""ShardReader: disjoint equal shares per rank, coverage, seeded epochs, exact resume, dtypes."""

import pytest
import torch
from helpers import make_tiny_llama

from pipeline.config import parse_config
from pipeline.errors import UserError
from stages.cache.manifest import MANIFEST_FILE
from stages.cache.reader import ShardReader
from cluster.executor import LocalExecutor
from helpers import build_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    teacher = make_tiny_llama(root / "teacher", hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg = parse_config({
        "run": {"out_dir": str(root / "run")},
        "data": {"synthetic": {"num_docs": 120}},
        "pack": {"window_len": 64, "doc_len": [16, 64]},
        "teacher": {"model": str(teacher)},
        "cache": {"k": 4, "windows_per_shard": 8, "windows_per_row_group": 2},
    })
    return build_cache(cfg, executor=LocalExecutor())


def ids(stream):
    return [item["window_id"] for item in stream]


def test_items_keep_stored_dtypes(cache):
    item = next(iter(ShardReader(cache, dp_rank=0, dp_size=1, seed=0)))
    assert isinstance(item["window_id"], int) and item["counts"] is None
    assert item["input_ids"].dtype == torch.int32 and item["input_ids"].shape == (64,)
    assert item["ids"].dtype == torch.int32 and item["ids"].shape == (64, 4)
    assert item["logp"].dtype == torch.float16 and item["doc_starts"].dtype == torch.int32
    assert int(item["doc_starts"][0]) == 0
    assert bool((item["logp"][:, :-1] >= item["logp"][:, 1:]).all())  # top-k order
    loaded = next(iter(torch.utils.data.DataLoader(ShardReader(cache, dp_rank=0, dp_size=1, seed=0),
                                                   batch_size=None, num_workers=2)))
    assert loaded["logp"].dtype == torch.float16 and loaded["ids"].dtype == torch.int32


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_ranks_get_disjoint_equal_shares_and_epochs_cover_everything(cache, dp_size):
    readers = [ShardReader(cache, dp_rank=r, dp_size=dp_size, seed=7) for r in range(dp_size)]
    total = readers[0].manifest["windows"]
    seen_over_epochs = set()
    for epoch in range(4):
        streams = []
        for r in readers:
            r.set_epoch(epoch)
            streams.append(ids(r))
        assert len({len(s) for s in streams}) == 1  # equal shares: ranks step in lockstep
        flat = [w for s in streams for w in s]
        assert len(flat) == len(set(flat))  # disjoint, and no window twice within a rank
        units, rows = len(readers[0].units), 2
        assert len(flat) >= total - (units % dp_size + 1) * rows  # only the remainder sits an epoch out
        seen_over_epochs |= set(flat)
    assert seen_over_epochs == set(range(total))
    if dp_size == 1:
        assert len(flat) == total


def test_epoch_permutation_is_seeded(cache):
    def stream(seed=1, epoch=0):
        return ids(ShardReader(cache, dp_rank=0, dp_size=2, seed=seed, epoch=epoch))

    # Same seed, epoch and rank (e.g. the ranks of one sequence-parallel group): same rows, same order.
    assert stream() == stream()
    assert stream(epoch=1) != stream() and stream(seed=2) != stream()
    a = ShardReader(cache, dp_rank=0, dp_size=2, seed=1)
    first = ids(a)
    assert a.epoch == 1 and ids(a) == stream(epoch=1) != first  # iterating to the end advances the epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(cache, workers):
    full = ids(ShardReader(cache, dp_rank=1, dp_size=2, seed=3).loader(workers))
    n = len(full)
    for cut in (0, 1, 5, n // 2 + 1, n - 1, n):
        r = ShardReader(cache, dp_rank=1, dp_size=2, seed=3)
        it = r.loader(workers)
        head = [next(it)["window_id"] for _ in range(cut)]
        state = r.state_dict()
        del it
        resumed = ShardReader(cache, dp_rank=1, dp_size=2, seed=3)
        resumed.load_state_dict(state)
        assert head + ids(resumed.loader(workers)) == full, cut
        assert resumed.epoch == 1
    # The next epoch is a fresh permutation, and a saved epoch-1 position resumes inside it.
    r = ShardReader(cache, dp_rank=1, dp_size=2, seed=3)
    ids(r.loader(workers))
    second = ids(r.loader(workers))
    assert sorted(second) != second or second != full
    r2 = ShardReader(cache, dp_rank=1, dp_size=2, seed=3)
    r2.load_state_dict({**r.state_dict(), "epoch": 1, "consumed": 3})
    assert ids(r2.loader(workers)) == second[3:]


def test_resume_refuses_other_worker_count_and_mismatched_state(cache):
    r = ShardReader(cache, dp_rank=0, dp_size=2, seed=0)
    it = r.loader(2)
    next(it), next(it), next(it)
    state = r.state_dict()
    del it
    other = ShardReader(cache, dp_rank=0, dp_size=2, seed=0)
    other.load_state_dict(state)
    with pytest.raises(UserError, match="same number of workers"):
        list(other.loader(0))
    with pytest.raises(UserError, match="seed"):
        ShardReader(cache, dp_rank=0, dp_size=2, seed=1).load_state_dict(state)


def test_incomplete_cache_and_wrong_fingerprint_refused(cache, tmp_path):
    with pytest.raises(UserError, match="fingerprint"):
        ShardReader(cache, dp_rank=0, dp_size=1, seed=0, expected_fingerprint="0" * 16)
    fake = tmp_path / "fake"
    fake.mkdir()
    with pytest.raises(UserError, match=MANIFEST_FILE):
        ShardReader(fake, dp_rank=0, dp_size=1, seed=0)
