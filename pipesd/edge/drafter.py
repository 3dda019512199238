"""The edge drafter: a llama.cpp model that guesses tokens after the ledger's sequence."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipesd._core import SpeculationLedger, VerdictDecision
from pipesd.llama_backend import LlamaCppModel
from pipesd.sampling import SamplingParams, SparseDist, greedy_with_confidence, truncated


@dataclass(frozen=True)
class DraftToken:
    token: int
    confidence: float  # the draft's probability of this token (what triggers look at)
    dist: SparseDist | None  # the truncated distribution it was sampled from (None: greedy)


#: Evaluations over which the drafter's slowdown (wall time over CPU time) is measured.
SLOWDOWN_WINDOW = 16


def new_timings() -> collections.deque[tuple[float, float]]:
    """An empty record of evaluation times for ``Drafter(timings=...)``."""
    return collections.deque(maxlen=SLOWDOWN_WINDOW)


class Drafter:
    """Drafts one token at a time after ``ledger.tokens``; keeps its KV cache in step with the
    ledger (it evaluates only the tokens it has not seen, and rolls back on a verdict).

    ``costs`` are measured once per model file (``pipesd.costs.cached_draft_costs``); what the
    drafter costs now is those times the slowdown it sees: wall time over CPU time of its
    recent evaluations (a CPU quota, as on a phone or an IoT device emulated with a cgroup, or
    a busy core shows as wall time the drafter did not compute). ``live_costs`` gives both.
    """

    def __init__(
        self,
        model: LlamaCppModel,
        params: SamplingParams,
        costs: tuple[float, float] = (0.0, 0.0),
        timings: collections.deque[tuple[float, float]] | None = None,
    ) -> None:
        """``costs``: measured seconds per drafted token and per prompt token of a prefill
        (``pipesd.costs.measure_draft``; zeros when unknown). ``timings``: the (wall, CPU)
        seconds of recent evaluations, shared by the drafters of one model (one per
        sequence), so that a sequence starts at the speed the last one saw."""
        self.model = model
        self.params = params
        self.costs = costs
        # The edge's random stream (spawn key 0); the cloud uses spawn key 1.
        self.rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(0,)))
        self.draft_s = 0.0  # seconds spent evaluating the draft model
        # Most entries a draft distribution may have (the cloud's limit; 0: none). Drafts are
        # sampled from the distribution cut to it, so the one sent is the one sampled from and
        # speculative sampling stays exact.
        self.max_dist = 0
        self.last_fed = 0  # tokens the last draft evaluated (more than 1: it caught up first)
        self._threads = max(1, model.n_threads)
        self._timings = timings if timings is not None else new_timings()

    def _evaluate(self, feed: list[int]) -> npt.NDArray[np.float32]:
        """The model's logits after ``feed``, timed for the slowdown."""
        w0, c0 = time.perf_counter(), time.process_time()
        logits = self.model.decode(feed, all_logits=False)
        self._timings.append((time.perf_counter() - w0, time.process_time() - c0))
        return logits

    @property
    def slowdown(self) -> float:
        """Wall time per CPU time of the recent evaluations (>= 1; 1 before any)."""
        wall = sum(w for w, _ in self._timings)
        cpu = sum(c for _, c in self._timings) / self._threads
        return max(1.0, wall / cpu) if cpu > 0 else 1.0

    @property
    def live_costs(self) -> tuple[float, float]:
        """(seconds per drafted token, per prompt token of a prefill) at the present speed."""
        k = self.slowdown
        return self.costs[0] * k, self.costs[1] * k

    def begin(self, ledger: SpeculationLedger) -> None:
        self.model.truncate(0)
        ledger.note_draft_kv(0)

    def draft(self, ledger: SpeculationLedger) -> DraftToken:
        """Drafts the token after the ledger's last token (committed or pending)."""
        t0 = time.perf_counter()
        feed = ledger.tokens_from(self.model.kv_len)
        if not feed:  # every token is cached but no logits are kept: re-evaluate the last one
            self.model.truncate(self.model.kv_len - 1)
            feed = ledger.tokens_from(self.model.kv_len)
        self.last_fed = len(feed)
        logits = self._evaluate(feed)[0]
        ledger.note_draft_kv(self.model.kv_len)
        if self.params.greedy:
            token, conf = greedy_with_confidence(logits)
            out = DraftToken(token, conf, None)
        else:
            dist = truncated(logits, self.params)
            if self.max_dist:
                dist = dist.top(self.max_dist)
            token = dist.sample(self.rng)
            out = DraftToken(token, dist.prob_of(token), dist)
        ledger.append_drafts([out.token])
        self.draft_s += time.perf_counter() - t0
        return out

    def prefill(self, ledger: SpeculationLedger, *, max_tokens: int | None = None) -> bool:
        """Evaluates the sequence but its last token (which the next ``draft`` feeds with the
        tokens after it): the prompt, while the target prefills it too. At most
        ``max_tokens`` per call, so the caller can look for the target's answer in between;
        returns True while more remain."""
        t0 = time.perf_counter()
        feed = ledger.tokens_from(self.model.kv_len)[:-1]
        rest = False
        if max_tokens is not None and len(feed) > max_tokens:
            feed, rest = feed[:max_tokens], True
        if feed:
            self._evaluate(feed)
            ledger.note_draft_kv(self.model.kv_len)
        self.draft_s += time.perf_counter() - t0
        return rest

    def guess(self, ledger: SpeculationLedger) -> DraftToken:
        """The draft's greedy guess of the token after the committed sequence, without
        drafting it (no pending draft is made): what it would have proposed."""
        t0 = time.perf_counter()
        feed = ledger.tokens_from(self.model.kv_len)
        if not feed:
            self.model.truncate(self.model.kv_len - 1)
            feed = ledger.tokens_from(self.model.kv_len)
        logits = self._evaluate(feed)[0]
        ledger.note_draft_kv(self.model.kv_len)
        token, conf = greedy_with_confidence(logits)
        self.draft_s += time.perf_counter() - t0
        return DraftToken(token, conf, None)

    def sync(self, ledger: SpeculationLedger) -> None:
        """Rolls the KV cache back to what the ledger still holds (after drafts were dropped)."""
        self.model.truncate(min(self.model.kv_len, ledger.draft_kv))

    def apply(self, decision: VerdictDecision) -> None:
        """Rolls the KV cache back as a verdict decided (nothing to re-evaluate)."""
        if decision.stale:
            return
        self.model.truncate(min(self.model.kv_len, decision.draft_keep))
