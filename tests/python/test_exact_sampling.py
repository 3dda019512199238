"""Speculative sampling on a real small pair reproduces the target's distribution.

Target: smollm2-135m (llama.cpp backend). Draft: a copy with perturbed norms (llama.cpp).
Each run samples 2 new tokens with a window of 1 draft, so the first token comes either from an
accepted draft or from the residual after a rejection; its empirical distribution is compared
with the target's own next-token distribution by a chi-square test. llama.cpp's logits depend
on the batch shape, so the reference distribution is taken from the same shape the verify pass
uses (row 0 of a two-token pass; causal attention makes it independent of the second token). The same test, with the
residual deliberately replaced by p (a classic bug), must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipesd import Generator
from pipesd.sampling import SamplingParams, truncated

PROMPT = "The capital of France is"
RUNS = 600
SAMPLING = dict(temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def pair(mild_draft, smollm_path):
    with Generator(
        draft=str(mild_draft), target=str(smollm_path), target_backend="llama.cpp", draft_len=1,
        n_ctx=256, target_threads=1,
    ) as gen:  # fmt: skip
        yield gen


def _target_distribution(gen: Generator, prompt: list[int]) -> np.ndarray:
    t = gen.target
    t.truncate(0)
    t.decode(prompt[:-1], all_logits=False)
    row = t.decode([prompt[-1], prompt[-1]], all_logits=True)[0]
    t.truncate(0)
    return truncated(row, SamplingParams(**SAMPLING)).dense(row.shape[0])


def _chi_square(gen: Generator, *, biased: bool) -> tuple[float, float]:
    prompt = gen.tokenize(PROMPT)
    p = _target_distribution(gen, prompt)
    counts: dict[int, int] = {}
    accepted = submitted = 0
    import pipesd.api as api

    original = api.TargetSession.__init__

    def patched(self, target, params):  # the deliberately biased verifier
        original(self, target, params)
        self.residual_fn = lambda p_, q_: p_

    if biased:
        api.TargetSession.__init__ = patched
    try:
        for seed in range(RUNS):
            r = gen.generate(prompt, max_new_tokens=2, seed=seed, **SAMPLING)
            counts[r.tokens[0]] = counts.get(r.tokens[0], 0) + 1
            accepted += r.stats.accepted
            submitted += r.stats.submitted
    finally:
        api.TargetSession.__init__ = original
    # Bins: tokens expected at least 5 times; the rest pooled into one bin.
    expected = p * RUNS
    big = np.nonzero(expected >= 5)[0]
    obs = [counts.get(int(t), 0) for t in big]
    exp = list(expected[big])
    rest_obs = RUNS - sum(obs)
    rest_exp = RUNS - sum(exp)
    if rest_exp > 0:
        obs.append(rest_obs)
        exp.append(rest_exp)
    _, pvalue = stats.chisquare(obs, exp)
    return float(pvalue), accepted / max(submitted, 1)


def test_sampled_tokens_follow_target_distribution(pair) -> None:
    pvalue, acceptance = _chi_square(pair, biased=False)
    print(f"\nexact sampler: chi-square p-value {pvalue:.3g}, draft acceptance {acceptance:.2f}")
    assert 0.2 < acceptance < 0.95  # both the accept and the residual paths ran often
    assert pvalue > 1e-3


def test_biased_sampler_fails_the_same_test(pair) -> None:
    pvalue, _ = _chi_square(pair, biased=True)
    print(f"\nbiased sampler: chi-square p-value {pvalue:.3g}")
    assert pvalue < 1e-3


def test_seeded_runs_are_reproducible(pair) -> None:
    a = pair.generate("def add(a, b):", max_new_tokens=24, seed=7, temperature=0.8)
    b = pair.generate("def add(a, b):", max_new_tokens=24, seed=7, temperature=0.8)
    c = pair.generate("def add(a, b):", max_new_tokens=24, seed=8, temperature=0.8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
