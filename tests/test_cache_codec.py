"""Cache codecs: plain is exact up to float16, compact keeps ids exactly and values within its bound."""

import numpy as np
import pytest

from stages.cache.codec import SQRT_STEP, CompactCodec, PlainCodec, level_probs, varint_decode, varint_encode
from stages.cache.synthetic import SyntheticLM


@pytest.fixture(scope="module")
def synthetic():
    lm = SyntheticLM()
    first, _ = lm.topk(256, 64, seed=0)  # the "first row group" the rank map is learned from
    ids, logp = lm.topk(256, 64, seed=1)
    return first, ids, logp


def _kl_decoded_vs_exact(ids, logp, dec_ids, dec_logp):
    """Mean KL(decoded || exact) over top-k + tail bucket, per position (nats)."""
    p = np.exp(logp)
    q = np.zeros_like(p)
    for r in range(len(ids)):
        col = {int(i): j for j, i in enumerate(ids[r])}
        for j, i in enumerate(dec_ids[r]):
            q[r, col[int(i)]] = np.exp(float(dec_logp[r, j]))
    pt, qt = np.clip(1 - p.sum(1), 1e-300, None), np.clip(1 - q.sum(1), 0, None)
    kl = (q * np.log(q / p)).sum(1) + np.where(qt > 0, qt * np.log(np.maximum(qt, 1e-300) / pt), 0)
    return kl, p, q


def test_varint_roundtrip():
    v = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**31 - 1, 5], dtype=np.int64)
    assert varint_decode(varint_encode(v), len(v)).tolist() == v.tolist()
    assert len(varint_encode(np.arange(128))) == 128


def test_plain_roundtrip_is_exact_fp16():
    rng = np.random.default_rng(0)
    B, L, k = 3, 20, 5
    ids = rng.integers(0, 1000, (B, L, k)).astype(np.int32)
    logp = -rng.exponential(3, (B, L, k)).astype(np.float32)
    codec = PlainCodec("topk", 1000)
    table = codec.encode([0, 1, 2], rng.integers(0, 1000, (B, L)), [[0]] * B, ids, logp, None)
    assert table.schema.field("topk_ids").type.value_type.bit_width == 32
    assert str(table.schema.field("topk_logp").type.value_type) == "halffloat"
    out = list(codec.decode(table))
    for b in range(B):
        assert np.array_equal(out[b]["ids"], ids[b])
        assert np.array_equal(out[b]["logp"], logp[b].astype(np.float16))


def test_compact_topk_bytes_and_kl_on_128k_vocab(synthetic):
    first, ids, logp = synthetic
    codec = CompactCodec("topk", 128_000)
    codec.fit(first)
    payload = codec.encode_window(ids, logp, None)
    decoder = CompactCodec.from_footer("topk", codec.footer())
    out = decoder.decode_window(payload)
    assert out["ids"].dtype == np.int32 and out["logp"].dtype == np.float16 and out["counts"] is None
    for r in range(len(ids)):  # ids are lossless
        assert sorted(out["ids"][r].tolist()) == sorted(ids[r].tolist())
    assert (np.diff(out["logp"].astype(np.float32), axis=1) <= 0).all()  # descending, like plain
    kl, p, q = _kl_decoded_vs_exact(ids, logp, out["ids"], out["logp"])
    assert kl.mean() <= 1e-3, kl.mean()
    # The documented bound: |sqrt q - sqrt p| <= s/2 per entry (up to fp16 rounding), where not renormalised.
    unnorm = q.sum(1) <= 1
    err = np.abs(np.sqrt(q) - np.sqrt(p))[unnorm]
    assert err.max() <= SQRT_STEP / 2 * 1.05 + 1e-3 * np.sqrt(p[unnorm]).max()
    assert len(payload) / ids.size <= 1.5, len(payload) / ids.size  # issue target: <= 1.5 B/entry at k=64


def test_compact_sampled_roundtrip_exact_ids_and_counts():
    rng = np.random.default_rng(1)
    L, S, V = 40, 12, 5000
    ids = np.zeros((L, S), np.int32)
    counts = np.zeros((L, S), np.int16)
    for r in range(L):
        n = rng.integers(1, S + 1)
        ids[r, :n] = rng.choice(V, n, replace=False)
        counts[r, :n] = rng.integers(1, 4, n)
        ids[r, n:] = ids[r, 0]
    logp = np.log(rng.uniform(1e-4, 0.05, (L, S)))
    codec = CompactCodec("sampled", V)
    codec.fit(ids)
    out = CompactCodec.from_footer("sampled", codec.footer()).decode_window(codec.encode_window(ids, logp, counts))
    assert out["counts"].dtype == np.int16
    for r in range(L):
        want = sorted((int(i), int(c)) for i, c in zip(ids[r], counts[r]) if c > 0)
        got = sorted((int(i), int(c)) for i, c in zip(out["ids"][r], out["counts"][r]) if c > 0)
        assert got == want
        pad = out["counts"][r] == 0
        assert (out["ids"][r][pad] == out["ids"][r][0]).all()  # padding repeats the first slot


def test_levels_monotone():
    q = level_probs()
    assert (np.diff(q) > 0).all() and q[round(1 / SQRT_STEP)] == 1.0  # p = 1 is the top level used
