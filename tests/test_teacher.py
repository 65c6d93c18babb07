"""The teacher's inputs (positions, packed-document masks) and its chunked top-k / sampling."""

import pytest
import torch
from helpers import make_tiny_llama
from transformers import AutoModelForCausalLM

from pipeline.config import TeacherConfig
from pipeline.errors import UserError
from stages.teacher import TeacherScorer, load_teacher, model_inputs, teacher_identity


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    # A wider init than the default makes the distributions peaked enough to be interesting.
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), initializer_range=0.2)


def _load(path, impl):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_doc_masked_equals_each_document_alone(teacher_dir, impl):
    model = _load(teacher_dir, impl)
    L, starts = 48, [0, 7, 20, 21, 33]
    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(**model_inputs(ids, [starts, [0, 30]], "doc_masked")).logits
        bounds = starts + [L]
        alone = torch.cat([model(input_ids=ids[:1, a:b]).logits[0] for a, b in zip(bounds[:-1], bounds[1:])])
        alone2 = torch.cat([model(input_ids=ids[1:, a:b]).logits[0] for a, b in ((0, 30), (30, L))])
        crossed = model(**model_inputs(ids, [starts, [0, 30]], "cross_doc")).logits
        plain = model(input_ids=ids).logits
    assert torch.allclose(packed[0], alone, atol=1e-4)
    assert torch.allclose(packed[1], alone2, atol=1e-4)
    assert torch.allclose(crossed, plain, atol=1e-5)  # cross_doc is plain causal attention
    assert not torch.allclose(crossed[0], alone, atol=1e-2)  # and really differs from doc_masked


def test_model_inputs_positions():
    ids = torch.zeros(1, 10, dtype=torch.long)
    assert model_inputs(ids, [[0, 4]], "doc_masked")["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert model_inputs(ids, [[0, 4]], "cross_doc")["position_ids"].tolist() == [list(range(10))]
    with pytest.raises(UserError, match="pack.mode"):
        model_inputs(ids, [[0]], "bogus")


@pytest.mark.parametrize("mode", ["cross_doc", "doc_masked"])
def test_chunked_topk_equals_full_logits_topk(teacher_dir, mode):
    model = load_teacher(TeacherConfig(model=str(teacher_dir)))
    L, k, T = 50, 7, 1.5
    ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(1))
    starts = [[0, 11, 40], [0, 25]]
    scorer = TeacherScorer(model, kind="topk", k=k, samples=1, temperature=T, chunk_len=16)  # 16 does not divide 50
    scorer.check_head()
    got = scorer.score(ids, starts, mode)
    with torch.no_grad():
        full = torch.log_softmax(model(**model_inputs(ids, starts, mode)).logits.float() / T, -1)  # [B, L, V]
    ref = torch.topk(full, k, -1)
    assert got["ids"].dtype == torch.int32 and got["counts"] is None
    assert torch.allclose(got["logp"], ref.values, atol=1e-5)
    same = got["ids"] == ref.indices.int()
    # Ids are exact except where two log-probs tie (then either order is right).
    tie = torch.isclose(torch.gather(full, -1, got["ids"].long()), ref.values, atol=1e-6)
    assert bool((same | tie).all())


def test_sampled_draws_are_unbiased(teacher_dir):
    model = load_teacher(TeacherConfig(model=str(teacher_dir)))
    S, L, T = 4000, 6, 0.7
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(2))
    scorer = TeacherScorer(model, kind="sampled", k=1, samples=S, temperature=T, chunk_len=4, seed=3)
    with torch.no_grad():
        full = torch.log_softmax(model(**model_inputs(ids, [[0]], "cross_doc")).logits.float() / T, -1)[0]  # [L, V]
    freq = torch.zeros(L, full.shape[-1])
    draws = 0
    for w in range(5):  # five independent windows' worth of draws at the same positions
        got = scorer.score(ids, [[0]], "cross_doc", window_ids=[w])
        c = got["counts"][0].long()  # [L, S]
        assert int(c.sum(-1).min()) == S and int(c.sum(-1).max()) == S
        valid = c > 0
        # The stored log-prob of each drawn id is the teacher's.
        assert torch.allclose(got["logp"][0][valid], torch.gather(full, -1, got["ids"][0].long())[valid], atol=1e-5)
        freq.scatter_add_(-1, got["ids"][0].long(), c.float())
        draws += S
    p = full.exp()
    emp = freq / draws
    # Each frequency within 5 standard errors of its probability (deterministic seeds: no flakes).
    se = torch.sqrt(p * (1 - p) / draws) + 1e-4
    assert bool(((emp - p).abs() <= 5 * se).all())
    assert float((emp - p).abs().sum(-1).max()) < 0.1  # total variation per position
    # Same window id -> same draws (a retried shard reproduces itself).
    a = scorer.score(ids, [[0]], "cross_doc", window_ids=[9])
    b = scorer.score(ids, [[0]], "cross_doc", window_ids=[9])
    assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["counts"], b["counts"])


def test_teacher_identity_and_bad_paths(teacher_dir, tmp_path):
    ident = teacher_identity(TeacherConfig(model=str(teacher_dir)))
    assert any(f["name"] == "config.json" for f in ident["files"])
    assert any(f["name"].endswith(".safetensors") for f in ident["files"])
    assert not any(f["name"].startswith("tokenizer") for f in ident["files"])
    with pytest.raises(UserError, match="teacher.model"):
        teacher_identity(TeacherConfig(model=str(tmp_path)))
    with pytest.raises(UserError, match="teacher.model"):
        teacher_identity(TeacherConfig())
    other = make_tiny_llama(tmp_path / "rope", initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert teacher_identity(TeacherConfig(model=str(other))) != ident
    assert bool(torch.isfinite(load_teacher(TeacherConfig(model=str(teacher_dir), dtype="bfloat16")).lm_head.weight.float()).all())
