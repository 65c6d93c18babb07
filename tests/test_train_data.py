"""Training inputs: packed-window sharding and exact resume, read-ahead state, SP slices,
and the student module with tiled MLP / gradient checkpointing."""

import copy

import pytest
import torch

from pipeline.config import KDConfig, parse_config
from stages.train.data import EpochStream, Prefetcher, batches, collate
from stages.windows import RankWindows


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from helpers import build_pack

    cfg = parse_config({"run": {"out_dir": str(tmp_path_factory.mktemp("pack")), "seed": 3},
                        "data": {"source": "synthetic", "synthetic": {"num_docs": 200}},
                        "pack": {"window_len": 64, "doc_len": [8, 32], "mode": "doc_masked"}})
    return build_pack(cfg)


def _ids(items):
    return [r["window_id"] for r in items]


def test_ranks_split_the_windows_and_epochs_reshuffle(packed):
    r0 = RankWindows(packed, dp_rank=0, dp_size=2, seed=0)
    r1 = RankWindows(packed, dp_rank=1, dp_size=2, seed=0)
    a, b = _ids(r0), _ids(r1)
    assert len(a) == len(b) > 0 and not set(a) & set(b)
    again = _ids(RankWindows(packed, dp_rank=0, dp_size=2, seed=0))
    other_epoch = _ids(RankWindows(packed, dp_rank=0, dp_size=2, seed=0, epoch=1))
    assert a == again and sorted(a + b) == sorted(other_epoch + _ids(
        RankWindows(packed, dp_rank=1, dp_size=2, seed=0, epoch=1)))


def test_stream_state_resumes_exactly_across_epochs(packed):
    make = lambda e: RankWindows(packed, dp_rank=0, dp_size=1, seed=0, epoch=e)  # noqa: E731
    n = len(make(0))
    full = EpochStream(make)
    reference = [next(full)["window_id"] for _ in range(n + 5)]
    s = EpochStream(make)
    first = [next(s)["window_id"] for _ in range(n - 2)]
    state = copy.deepcopy(s.state_dict())
    resumed = EpochStream(make)
    resumed.load_state_dict(state)
    assert first + [next(resumed)["window_id"] for _ in range(7)] == reference


def test_prefetcher_state_is_that_of_the_last_consumed_batch(packed):
    make = lambda e: RankWindows(packed, dp_rank=0, dp_size=1, seed=0, epoch=e)  # noqa: E731
    kw = dict(mode="doc_masked", window_len=64, sp=1, sp_rank=0, with_targets=False)
    pf = Prefetcher(batches(EpochStream(make), 2, **kw), depth=4)
    first = [next(pf) for _ in range(3)]
    state = copy.deepcopy(pf.state_dict())
    nxt = next(pf)
    pf.close()
    assert state["reader"]["consumed"] == 6  # 3 batches of 2, however far the thread read ahead
    s = EpochStream(make)
    s.load_state_dict(state)
    again = next(batches(s, 2, **kw))[0]
    assert torch.equal(again.input_ids, nxt.input_ids) and not torch.equal(first[-1].input_ids, nxt.input_ids)


def _row(L, m, seed):
    g = torch.Generator().manual_seed(seed)
    return {"window_id": seed, "input_ids": torch.randint(0, 250, (L,), generator=g, dtype=torch.int32),
            "doc_starts": torch.tensor([0, 10, 40], dtype=torch.int32),
            "ids": torch.randint(0, 250, (L * m,), generator=g, dtype=torch.int32),  # flat, as the cache stores it
            "logp": torch.randn(L * m, generator=g).half(),
            "counts": torch.randint(0, 3, (L * m,), generator=g, dtype=torch.int16)}


def test_sequence_parallel_slices_every_per_position_tensor():
    rows = [_row(64, 4, 0), _row(64, 4, 1)]
    full = collate(rows, "doc_masked", 64, sp=1, sp_rank=0, with_targets=True)
    parts = [collate(rows, "doc_masked", 64, sp=2, sp_rank=r, with_targets=True) for r in (0, 1)]
    for name in ("input_ids", "position_ids", "labels", "ids", "logp", "weights"):
        joined = torch.cat([getattr(p, name) for p in parts], dim=1)
        assert torch.equal(joined, getattr(full, name)), name
    assert full.labels[0, -1] == -100 and torch.equal(full.labels[:, :-1], full.input_ids[:, 1:])
    assert full.position_ids[0, 10] == 0 and full.position_ids[0, 39] == 29  # doc_masked positions restart
    assert parts[0].kd_norm == full.kd_norm == 2 * 64 and parts[1].ce_norm == 2 * 63
    w = full.weights
    assert torch.allclose(w.sum(-1)[w.sum(-1) > 0], torch.tensor(1.0))  # counts / S per position


def test_tiled_mlp_and_checkpointing_keep_loss_and_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.train.model import StudentWithLoss, enable_checkpointing, enable_tiled_mlp

    rows = [_row(64, 4, 2)]
    batch = collate(rows, "cross_doc", 64, sp=1, sp_rank=0, with_targets=True)
    kd = KDConfig(alpha=0.5)

    def run(tiled: bool, ckpt: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2))
        model.train()
        if tiled:
            assert enable_tiled_mlp(model) == 2
        if ckpt:
            enable_checkpointing(model)
        module = StudentWithLoss(model, tile=16)
        loss, _, _ = module(batch, kd)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref_loss, ref_grad = run(False, False)
    for tiled, ckpt in ((True, False), (False, True), (True, True)):
        loss, grad = run(tiled, ckpt)
        assert loss == pytest.approx(ref_loss, rel=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)


def test_periodic_documents_train_after_their_first_period():
    from stages.kd_loss import IGNORE
    from stages.train.data import collate, first_period

    bos = 257
    doc_a = [bos] + [5, 6, 7] * 4  # period 3, 13 tokens
    doc_b = [bos] + [9, 8, 7, 6, 5] * 2 + [9]  # period 5, 12 tokens
    ids = torch.tensor(doc_a + doc_b[:7], dtype=torch.int32)  # 20 tokens; doc_b continues later
    row = {"window_id": 0, "input_ids": ids, "doc_starts": [0, 13]}
    b = collate([row], "cross_doc", 20, 1, 0, with_targets=False, periodic=True)
    labels = b.labels[0].tolist()
    assert first_period(torch.tensor([1, 2, 1, 2, 1])) == 2 and first_period(torch.tensor([1, 2, 3])) == 3
    # doc_a: positions 0..3 predict BOS->5, 5->6, 6->7, 7->5 (the first period and one more) are ignored
    assert labels[:4] == [IGNORE] * 4 and labels[4:13] == ids[5:14].tolist()
    # doc_b: the window holds only its first 7 tokens (BOS + 6): period 5 found, 6 labels ignored, then 19 has no next
    assert labels[13:19] == [IGNORE] * 6 and labels[19] == IGNORE
    assert b.ce_norm == 9
    plain = collate([row], "cross_doc", 20, 1, 0, with_targets=False)
    assert plain.ce_norm == 19 and plain.labels[0, :19].tolist() == ids[1:].tolist()
