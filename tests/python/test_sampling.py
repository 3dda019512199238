"""Exact speculative sampling on synthetic distributions, and the truncation rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipesd.cloud.verifier import verify_greedy, verify_sampled
from pipesd.sampling import SamplingParams, SparseDist, truncated

V = 12
PARAMS = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)


def _logits(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(V) * 1.5).astype(np.float32)


def _first_token_counts(residual_fn=None, n: int = 20000, seed: int = 0, q_entries: int = 0):
    """Samples the first output token of a window of 2 drafts, n times. ``q_entries``: the
    draft distribution cut to that many entries, as an edge under a cloud's --max-dist does."""
    rng = np.random.default_rng(seed)
    target_logits = np.stack([_logits(np.random.default_rng(10 + i)) for i in range(3)])
    draft_logits = _logits(np.random.default_rng(99))
    q = truncated(draft_logits, PARAMS)
    if q_entries:
        q = q.top(q_entries)
    p = truncated(target_logits[0], PARAMS).dense(V)
    counts = np.zeros(V)
    kwargs = {} if residual_fn is None else {"residual_fn": residual_fn}
    for _ in range(n):
        d1 = q.sample(rng)
        d2 = q.sample(rng)
        accepted, nxt = verify_sampled(target_logits, [d1, d2], [q, q], PARAMS, rng, **kwargs)
        counts[d1 if accepted >= 1 else nxt] += 1
    return counts, p


def test_speculative_sampling_matches_target_distribution() -> None:
    counts, p = _first_token_counts()
    _, pvalue = stats.chisquare(counts, p * counts.sum())
    assert pvalue > 1e-3, f"chi-square p-value {pvalue:.2e}: speculative sampling is biased"


def test_a_cut_draft_distribution_keeps_sampling_exact() -> None:
    # The edge samples from q cut to its 3 most likely entries and sends that q: the output
    # still follows the target's distribution (only acceptance changes).
    counts, p = _first_token_counts(q_entries=3)
    _, pvalue = stats.chisquare(counts, p * counts.sum())
    assert pvalue > 1e-3, f"chi-square p-value {pvalue:.2e}: a cut q biased the output"


def test_sparse_dist_top_keeps_the_most_likely() -> None:
    d = SparseDist(np.array([4, 9, 1, 7]), np.array([0.1, 0.4, 0.3, 0.2]))
    top = d.top(2)
    assert top.ids.tolist() == [9, 1]
    assert np.allclose(top.probs, [0.4 / 0.7, 0.3 / 0.7])
    assert d.top(4) is d


def test_biased_sampler_is_detected() -> None:
    # A classic bug: on rejection, resample from p instead of norm(max(0, p - q)).
    counts, p = _first_token_counts(residual_fn=lambda p, q: p)
    _, pvalue = stats.chisquare(counts, p * counts.sum())
    assert pvalue < 1e-6, f"a biased sampler passed the test (p-value {pvalue:.2e})"


def test_greedy_verification_rules() -> None:
    logits = np.full((4, V), -1.0, dtype=np.float32)
    for row, tok in enumerate([3, 5, 7, 9]):
        logits[row, tok] = 1.0
    assert verify_greedy(logits, [3, 5, 7]) == (3, 9)  # all accepted, bonus from the last row
    assert verify_greedy(logits, [3, 4, 7]) == (1, 5)  # first mismatch replaced
    assert verify_greedy(logits[:1], []) == (0, 3)  # no drafts: one target step


def test_truncation_top_k_top_p() -> None:
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    d = truncated(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0))
    assert list(d.ids) == [0, 1, 2]
    assert d.probs == pytest.approx([0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85])
    d = truncated(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8))
    assert list(d.ids) == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.85
    d = truncated(logits, SamplingParams(temperature=0.01, top_k=0, top_p=1.0))
    assert d.probs[0] > 0.999
    # Without top-k, top-p over a large vocabulary with a flat tail needs the full sort.
    big = np.zeros(20000)
    d = truncated(big, SamplingParams(temperature=1.0, top_k=0, top_p=0.5))
    assert d.ids.size in (10000, 10001)  # the smallest set reaching 0.5, up to rounding
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)


def test_sparse_dist_sampling_follows_probs() -> None:
    d = SparseDist(np.array([4, 8, 15]), np.array([0.2, 0.3, 0.5]))
    rng = np.random.default_rng(1)
    draws = np.array([d.sample(rng) for _ in range(20000)])
    freq = [(draws == t).mean() for t in (4, 8, 15)]
    assert freq == pytest.approx([0.2, 0.3, 0.5], abs=0.015)
