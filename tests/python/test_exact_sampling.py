"""Speculative sampling on a real small pair reproduces the target's distribution.

Target: smollm2-135m (llama.cpp backend). Draft: a copy with perturbed norms (llama.cpp),
accepting about 40% of its drafts at temperature 1 over the full vocabulary. Each sample drafts
one token and verifies it, so the output token comes from an accepted draft or from the residual
after a rejection. Its empirical distribution over RUNS samples is compared with the target's
own next-token distribution by a chi-square test; the same test with the residual deliberately
replaced by p (a classic bug) must fail. The non-centrality of the biased sampler at this
prompt and size is about 64 over 25 bins, so it fails the 1e-3 level with ~98% probability,
while the exact sampler fails it with 0.1% probability.

The harness drives the real Drafter and TargetSession (the code Generator runs), prefilling once
and rolling both KV caches back to the prompt between samples.

llama.cpp's logits depend on the batch shape, so the reference distribution is taken from the
same shape the verify pass uses (row 0 of a two-token pass; causal attention makes it
independent of the second token).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipesd import Generator, SpeculationLedger
from pipesd.cloud.verifier import TargetSession
from pipesd.edge.drafter import Drafter
from pipesd.sampling import SamplingParams, truncated

PROMPT = "My favourite fruit is the"
RUNS = 800
PARAMS = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234)


@pytest.fixture(scope="module")
def pair(sampling_draft, smollm_path):
    with Generator(
        draft=str(sampling_draft), target=str(smollm_path), target_backend="llama.cpp",
        policy="vanilla", draft_len=1, n_ctx=256,
    ) as gen:  # fmt: skip
        yield gen


def _target_distribution(gen: Generator, prompt: list[int]) -> np.ndarray:
    t = gen.target
    t.truncate(0)
    t.decode(prompt[:-1], all_logits=False)
    row = t.decode([prompt[-1], prompt[-1]], all_logits=True)[0]
    t.truncate(0)
    return truncated(row, PARAMS).dense(row.shape[0])


def _sample_first_tokens(gen: Generator, prompt: list[int], *, biased: bool):
    session = TargetSession(gen.target, PARAMS)
    if biased:
        session.residual_fn = lambda p, q: p
    drafter = Drafter(gen.draft_model, PARAMS)
    session.prefill(prompt)
    edge = SpeculationLedger(256)
    counts: dict[int, int] = {}
    accepted = 0
    for _ in range(RUNS):
        # Both sides back at the prompt: the target holds all but its last token.
        session.ledger.begin(prompt)
        gen.target.truncate(len(prompt) - 1)
        session.ledger.note_target_kv(len(prompt) - 1)
        edge.begin(prompt)
        drafter.model.truncate(min(drafter.model.kv_len, len(prompt)))
        edge.note_draft_kv(drafter.model.kv_len)
        d = drafter.draft(edge)
        verdict = session.verify(len(prompt), [d.token], [d.dist])
        token = d.token if verdict.accepted == 1 else verdict.next_token
        counts[token] = counts.get(token, 0) + 1
        accepted += verdict.accepted
    return counts, accepted / RUNS


def _chi_square(gen: Generator, *, biased: bool) -> tuple[float, float]:
    prompt = gen.tokenize(PROMPT)
    p = _target_distribution(gen, prompt)
    counts, acceptance = _sample_first_tokens(gen, prompt, biased=biased)
    # Bins: tokens expected at least 5 times; the rest pooled into one bin.
    expected = p * RUNS
    big = np.nonzero(expected >= 5)[0]
    obs = [counts.get(int(t), 0) for t in big]
    exp = list(expected[big])
    if RUNS - sum(exp) > 0:
        obs.append(RUNS - sum(obs))
        exp.append(RUNS - sum(exp))
    _, pvalue = stats.chisquare(obs, exp)
    return float(pvalue), acceptance


def test_sampled_tokens_follow_target_distribution(pair) -> None:
    pvalue, acceptance = _chi_square(pair, biased=False)
    print(f"\nexact sampler: chi-square p-value {pvalue:.3g}, draft acceptance {acceptance:.2f}")
    assert 0.2 < acceptance < 0.8  # both the accept and the residual paths ran often
    assert pvalue > 1e-3


def test_biased_sampler_fails_the_same_test(pair) -> None:
    pvalue, _ = _chi_square(pair, biased=True)
    print(f"\nbiased sampler: chi-square p-value {pvalue:.3g}")
    assert pvalue < 1e-3


def test_generator_sampling_is_reproducible(pair) -> None:
    kw = dict(max_new_tokens=24, temperature=0.8)
    a = pair.generate("def add(a, b):", seed=7, **kw)
    b = pair.generate("def add(a, b):", seed=7, **kw)
    c = pair.generate("def add(a, b):", seed=8, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.stats.verifications > 0 and a.stats.rollbacks > 0
