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

    def decode_argmax(self, tokens: Sequence[int], *, all_rows: bool) -> npt.NDArray[np.int64]:
        """As ``decode``, each row's argmax only (greedy verification never needs more)."""
        ...

    def truncate(self, n: int) -> None: ...


def verify_greedy(logits: Logits, drafts: Sequence[int]) -> tuple[int, int]:
    """Returns (accepted, next_token). logits has one row per draft plus one."""
    return verify_greedy_top(np.argmax(logits, axis=1), drafts)


def verify_greedy_top(top: npt.NDArray[np.int64], drafts: Sequence[int]) -> tuple[int, int]:
    """The same from each row's argmax."""
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
    """The target side of one sequence: its KV cache, kept in step through a ledger.

    Drafts may arrive in pieces ahead of the request to verify them (``receive``), tagged with
    the edge's speculation epoch; ``verify_window`` then verifies every received draft up to a
    position. The epoch rules are those of docs/protocol.md: frames of an older epoch are
    dropped; a newer epoch drops the drafts held for older ones; and the session retires the
    current epoch itself as soon as it knows the edge will (a verdict that rejects drafts, or a
    draft that contradicts a token already committed), dropping that epoch's later drafts.
    """

    def __init__(self, target: TargetBackend, params: SamplingParams) -> None:
        self.target = target
        self.params = params
        self.ledger = SpeculationLedger(target.n_ctx)
        seed = params.seed if params.seed is not None else None
        # The cloud's random stream is independent of the edge's (different spawn key).
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        self.residual_fn = residual
        self.epoch = 0  # the newest edge epoch seen
        self.retired = False  # the current epoch's drafts are known to be discarded by the edge
        self.dists: list[SparseDist | None] = []  # one per pending draft
        self.dropped = 0  # draft tokens dropped as stale

    def prefill(self, prompt: Sequence[int], *, epoch: int = 0) -> Verdict:
        """Starts a sequence and produces its first output token.

        One forward pass over the whole prompt (logits of its last row only) is the
        verification of an empty window after the prompt: the returned verdict (``start`` =
        the prompt length, nothing drafted) commits the first token, which the edge can emit
        at once and draft from. The target then holds every committed token but that one, as
        after any verdict.
        """
        if not prompt:
            raise ProtocolError("PREFILL carries no tokens")
        if len(prompt) >= self.target.n_ctx:
            raise PromptTooLongError(
                f"prompt of {len(prompt)} tokens does not fit the target's context of "
                f"{self.target.n_ctx}"
            )
        t0 = time.perf_counter()
        self.ledger.begin(list(prompt))
        self.epoch, self.retired, self.dists = epoch, False, []
        self.target.truncate(0)
        window = self.ledger.submit(0)
        accepted, nxt = self._score(list(prompt), [], 0, all_rows=False)
        decision = self.ledger.apply_verdict(window.epoch, accepted, nxt)
        self.target.truncate(decision.target_keep)
        return Verdict(
            epoch=self.epoch,
            start=len(prompt),
            drafted=0,
            accepted=0,
            next_token=nxt,
            verify_s=time.perf_counter() - t0,
        )

    def _retire(self) -> None:
        self.ledger.discard_drafts()
        self.dists = []
        self.retired = True

    def enter_epoch(self, epoch: int) -> bool:
        """Moves to the edge's epoch; False when frames of ``epoch`` are to be dropped."""
        if epoch < self.epoch:
            return False
        if epoch > self.epoch:
            self.ledger.discard_drafts()
            self.dists = []
            self.epoch, self.retired = epoch, False
        return not self.retired

    def reset(self, epoch: int) -> bool:
        """The edge dropped every pending draft and is now at ``epoch``; False if stale."""
        if epoch < self.epoch:
            return False
        self.ledger.discard_drafts()
        self.dists = []
        self.epoch, self.retired = epoch, False
        return True

    def receive(
        self,
        epoch: int,
        start: int,
        tokens: Sequence[int],
        dists: Sequence[SparseDist] | None = None,
    ) -> bool:
        """Takes drafts placed at absolute positions ``start``...; False if they were dropped."""
        if self.ledger.committed_len == 0:
            raise ProtocolError("DRAFT before PREFILL")
        if dists is not None and len(dists) != len(tokens):
            raise ProtocolError(f"{len(tokens)} draft tokens came with {len(dists)} distributions")
        if not self.enter_epoch(epoch):
            self.dropped += len(tokens)
            return False
        if not tokens:
            return True
        ledger = self.ledger
        committed = ledger.committed_len
        end = committed + ledger.pending_count
        if start > end:
            raise ProtocolError(f"drafts start at position {start}, but {end} are known")
        if start < end and start >= committed:
            raise ProtocolError(f"drafts at position {start} repeat pending drafts (up to {end})")
        fresh: list[int] = []
        fresh_dists: list[SparseDist | None] = []
        if start < committed:
            # Drafted while a verdict was pending: valid only where they agree with what the
            # verdict committed (the edge's ledger applies the same rule).
            known = ledger.tokens_from(start)[: committed - start]
            overlap = min(len(tokens), len(known))
            if [int(t) for t in tokens[:overlap]] != known[:overlap]:
                self.dropped += len(tokens)
                self._retire()
                return False
            if start + len(tokens) > committed and end > committed:
                raise ProtocolError(f"drafts at position {start} repeat pending drafts")
        for i, t in enumerate(tokens):
            if start + i >= committed:
                fresh.append(int(t))
                fresh_dists.append(dists[i] if dists is not None else None)
        if fresh and ledger.append_drafts(fresh) != len(fresh):
            ledger.discard_drafts()
            self.dists = []
            raise PromptTooLongError(
                f"drafts up to position {start + len(tokens)} exceed the context of "
                f"{ledger.max_len}"
            )
        self.dists.extend(fresh_dists)
        return True

    def verify_window(self, end: int) -> Verdict:
        """Verifies the pending drafts before position ``end`` (at least the committed length)."""
        ledger = self.ledger
        count = end - ledger.committed_len
        if not 0 <= count <= ledger.pending_count:
            raise ProtocolError(
                f"cannot verify up to position {end}: {ledger.committed_len} committed and "
                f"{ledger.pending_count} pending"
            )
        if ledger.committed_len + count >= ledger.max_len:
            raise PromptTooLongError(
                f"the sequence reached the target's context of {ledger.max_len} tokens"
            )
        start = ledger.committed_len
        drafts = ledger.pending()[:count]
        window = ledger.submit(count)
        t0 = time.perf_counter()
        accepted, nxt = self._score([ledger.last_token, *drafts], drafts, count, all_rows=True)
        decision = ledger.apply_verdict(window.epoch, accepted, nxt)
        self.target.truncate(decision.target_keep)
        if decision.rolled_back:
            self.dists = []
            self.retired = True
        else:  # drafts beyond the window stay, except the first: it became the bonus token
            self.dists = self.dists[count + 1 :]
        return Verdict(
            epoch=self.epoch,
            start=start,
            drafted=count,
            accepted=accepted,
            next_token=nxt,
            verify_s=time.perf_counter() - t0,
        )

    def _score(
        self, tokens: list[int], drafts: Sequence[int], count: int, *, all_rows: bool
    ) -> tuple[int, int]:
        """Runs the target over ``tokens`` and judges the window: (accepted, next token)."""
        if self.params.greedy:
            top = self.target.decode_argmax(tokens, all_rows=all_rows)
            self.ledger.note_target_kv(self.target.kv_len)
            return verify_greedy_top(top, drafts)
        logits = self.target.decode(tokens, all_logits=all_rows)
        self.ledger.note_target_kv(self.target.kv_len)
        return self._judge(logits, drafts, count)

    def _judge(self, logits: Logits, drafts: Sequence[int], count: int) -> tuple[int, int]:
        """(accepted, next token) of a window of ``count`` drafts scored by ``logits``."""
        if self.params.greedy:
            return verify_greedy(logits, drafts)
        window_dists = self.dists[:count]
        if any(d is None for d in window_dists):
            raise ProtocolError("sampled verification needs the draft distributions")
        return verify_sampled(
            logits,
            drafts,
            [d for d in window_dists if d is not None],
            self.params,
            self.rng,
            residual_fn=self.residual_fn,
        )

    def verify(
        self,
        start: int,
        drafts: Sequence[int],
        dists: Sequence[SparseDist] | None = None,
    ) -> Verdict:
        """Verifies drafts placed at position ``start`` (must be the committed length)."""
        if start != self.ledger.committed_len:
            raise ProtocolError(
                f"drafts start at position {start}, but {self.ledger.committed_len} are committed"
            )
        # A caller that does not track epochs moves on to a fresh one after a rejection.
        self.receive(self.epoch + int(self.retired), start, drafts, dists)
        return self.verify_window(start + len(drafts))
