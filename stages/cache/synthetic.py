"""A synthetic generator of LLM-like next-token distributions over a large vocabulary.

Used by ``bench/cache_bytes.py`` (and the codec tests) to measure the cache codecs at a
realistic vocabulary size (128k) without a large teacher. What makes real top-k caches
compressible or not is modelled explicitly, so the numbers can be argued with:

* **Zipfian unigram prior.** Token frequency rank r has log-frequency ``-zipf * log r``
  (zipf = 1.1); every position's logits start from ``prior_weight`` (0.7) times that.
* **Ids only roughly in frequency order** (as in BPE vocabularies, where merge order tracks
  frequency loosely): ids are the ranks sorted after adding Gaussian noise of std
  ``id_noise`` (1.0) to log-rank, i.e. a token's id is typically within a factor e of its rank.
* **Topic.** Each segment of ``segment_len`` (512) positions has ``topic_size`` (300) topic
  tokens drawn from the unigram restricted to ranks >= 100, boosted by ``topic_boost`` (3.0).
* **Per-position variety.** I.i.d. Gaussian noise of std ``noise`` (1.5) on every logit.
* **Peaks.** With probability 0.7 one token (topic 50%, unigram 50%) gets a boost drawn
  from U(4, 12) and 2-5 further candidates a boost from U(2, 6): the top-1 probability then
  spreads over roughly 0.05-0.99 as in real LM outputs, with a long flat tail.

The top-k is taken from the exact full-vocabulary softmax (float64), so the generator also
yields the reference that decoded values are compared against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticLM:
    vocab: int = 128_000
    zipf: float = 1.1
    prior_weight: float = 0.7
    id_noise: float = 1.0
    segment_len: int = 512
    topic_size: int = 300
    topic_boost: float = 3.0
    noise: float = 1.5
    peak_prob: float = 0.7
    vocab_seed: int = 0  # fixes the "model" (its id order); the sample seed varies the text

    def topk(self, positions: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of ``positions`` synthetic distributions: ids int32 [N, k] and
        log-probs float64 [N, k], sorted by descending probability."""
        V = self.vocab
        ranks = np.arange(1, V + 1)
        log_freq = -self.zipf * np.log(ranks)
        # id_of_rank[r] = token id of the (r+1)-th most frequent token.
        vocab_rng = np.random.default_rng(self.vocab_seed)
        id_of_rank = np.argsort(np.log(ranks) + self.id_noise * vocab_rng.standard_normal(V)).astype(np.int64)
        rng = np.random.default_rng(seed + 1)
        prior = np.empty(V)
        prior[id_of_rank] = self.prior_weight * log_freq  # prior indexed by token id
        unigram = np.exp(log_freq - log_freq.max())
        unigram /= unigram.sum()
        content = unigram.copy()
        content[:100] = 0
        content /= content.sum()

        ids = np.empty((positions, k), dtype=np.int32)
        logp = np.empty((positions, k))
        topic = None
        for n in range(positions):
            if n % self.segment_len == 0:
                topic = id_of_rank[rng.choice(V, self.topic_size, replace=False, p=content)]
            z = prior + self.noise * rng.standard_normal(V)
            z[topic] += self.topic_boost
            if rng.random() < self.peak_prob:
                cand = np.concatenate([
                    topic[rng.integers(0, self.topic_size, 1)] if rng.random() < 0.5
                    else id_of_rank[rng.choice(V, 1, p=unigram)],
                    id_of_rank[rng.choice(V, rng.integers(2, 6), p=unigram)],
                ])
                z[cand[0]] += rng.uniform(4, 12)
                z[cand[1:]] += rng.uniform(2, 6, len(cand) - 1)
            z -= z.max()
            lse = np.log(np.exp(z).sum())
            top = np.argpartition(-z, k)[:k]
            top = top[np.argsort(-z[top], kind="stable")]
            ids[n] = top
            logp[n] = z[top] - lse
        return ids, logp
