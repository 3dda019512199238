"""Exact verification of draft tokens by the target model.

Greedy: accept the longest prefix of drafts equal to the target's argmax; the first mismatch is
replaced by the target's token; when all match, the target's next token is a bonus.

Sampling (Leviathan et al. / Chen et al. speculative sampling): draft token x drawn from q is
accepted with probability min(1, p(x)/q(x)); on rejection the token is drawn from
norm(max(0, p - q)) over the full vocabulary; after a fully accepted window the bonus token is
drawn from p. The output is then distributed exactly as p. Here q is the draft's truncated
distribution, sent sparse by the edge, and p the target's distribution under the same
temperature / top-k / top-p processing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from pipesd._core import SpeculationLedger
from pipesd.errors import PromptTooLongError, ProtocolError
from pipesd.sampling import SamplingParams, SparseDist, sample_dense, truncated

Logits = npt.NDArray[np.float32]


class TargetBackend(Protocol):
    """What a target model offers the verifier: one sequence, explicit KV control."""

    @property
    def n_ctx(self) -> int: ...

    @property
    def kv_len(self) -> int: ...

    def decode(self, tokens: Sequence[int], *, all_logits: bool) -> Logits: ...

    def truncate(self, n: int) -> None: ...


def verify_greedy(logits: Logits, drafts: Sequence[int]) -> tuple[int, int]:
    """Returns (accepted, next_token). logits has one row per draft plus one."""
    top = np.argmax(logits, axis=1)
    accepted = 0
    while accepted < len(drafts) and int(top[accepted]) == int(drafts[accepted]):
        accepted += 1
    return accepted, int(top[accepted])


def residual(p: npt.NDArray[np.float64], q: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """max(0, p - q): where a rejected draft's replacement is drawn from (unnormalised)."""
    r = np.maximum(p - q, 0.0)
    if r.sum() <= 0.0:  # p == q to rounding; rejection then has probability ~0
        return p
    return r


def verify_sampled(
    logits: Logits,
    drafts: Sequence[int],
    draft_dists: Sequence[SparseDist],
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    residual_fn: Callable[
        [npt.NDArray[np.float64], npt.NDArray[np.float64]], npt.NDArray[np.float64]
    ] = residual,
) -> tuple[int, int]:
    """Exact speculative sampling. Returns (accepted, next_token)."""
    if len(draft_dists) != len(drafts):
        raise ProtocolError(
            f"{len(drafts)} draft tokens came with {len(draft_dists)} draft distributions"
        )
    vocab = logits.shape[1]
    for i, (x, q) in enumerate(zip(drafts, draft_dists, strict=True)):
        p = truncated(logits[i], params)
        p_x = p.prob_of(int(x))
        q_x = q.prob_of(int(x))
        if q_x <= 0.0:
            raise ProtocolError(f"draft token {x} has probability 0 in its own distribution")
        if rng.random() < min(1.0, p_x / q_x):
            continue
        return i, sample_dense(residual_fn(p.dense(vocab), q.dense(vocab)), rng)
    return len(drafts), truncated(logits[len(drafts)], params).sample(rng)


@dataclass(frozen=True)
class Verdict:
    """The target's answer to one verification window."""

    epoch: int
    start: int  # position of the first draft
    drafted: int  # drafts in the window
    accepted: int
    next_token: int
    verify_s: float


class TargetSession:
    """The target side of one sequence: its KV cache, kept in step through a ledger."""

    def __init__(self, target: TargetBackend, params: SamplingParams) -> None:
        self.target = target
        self.params = params
        self.ledger = SpeculationLedger(target.n_ctx)
        seed = params.seed if params.seed is not None else None
        # The cloud's random stream is independent of the edge's (different spawn key).
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        self.residual_fn = residual

    def prefill(self, prompt: Sequence[int]) -> float:
        """Starts a sequence; evaluates all prompt tokens but the last. Returns seconds."""
        if len(prompt) >= self.target.n_ctx:
            raise PromptTooLongError(
                f"prompt of {len(prompt)} tokens does not fit the target's context of "
                f"{self.target.n_ctx}"
            )
        t0 = time.perf_counter()
        self.ledger.begin(list(prompt))
        self.target.truncate(0)
        if len(prompt) > 1:
            self.target.decode(list(prompt[:-1]), all_logits=False)
        self.ledger.note_target_kv(self.target.kv_len)
        return time.perf_counter() - t0

    def verify(
        self,
        start: int,
        drafts: Sequence[int],
        dists: Sequence[SparseDist] | None = None,
    ) -> Verdict:
        """Verifies drafts placed at position ``start`` (must be the committed length)."""
        ledger = self.ledger
        if start != ledger.committed_len:
            raise ProtocolError(
                f"drafts start at position {start}, but {ledger.committed_len} are committed"
            )
        drafts = [int(t) for t in drafts]
        if ledger.append_drafts(drafts) != len(drafts):
            ledger.discard_drafts()
            raise PromptTooLongError(
                f"{len(drafts)} drafts at position {start} exceed the context of {ledger.max_len}"
            )
        window = ledger.submit(len(drafts))
        t0 = time.perf_counter()
        logits = self.target.decode([ledger.last_token, *drafts], all_logits=True)
        ledger.note_target_kv(self.target.kv_len)
        if self.params.greedy:
            accepted, nxt = verify_greedy(logits, drafts)
        else:
            if dists is None:
                raise ProtocolError("sampled verification needs the draft distributions")
            accepted, nxt = verify_sampled(
                logits, drafts, dists, self.params, self.rng, residual_fn=self.residual_fn
            )
        decision = ledger.apply_verdict(window.epoch, accepted, nxt)
        self.target.truncate(decision.target_keep)
        return Verdict(
            epoch=window.epoch,
            start=start,
            drafted=len(drafts),
            accepted=accepted,
            next_token=nxt,
            verify_s=time.perf_counter() - t0,
        )
