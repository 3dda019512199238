"""The edge drafter: a llama.cpp model that guesses tokens after the ledger's sequence."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipesd._core import SpeculationLedger, VerdictDecision
from pipesd.llama_backend import LlamaCppModel
from pipesd.sampling import SamplingParams, SparseDist, greedy_with_confidence, truncated


@dataclass(frozen=True)
class DraftToken:
    token: int
    confidence: float  # the draft's probability of this token (what triggers look at)
    dist: SparseDist | None  # the truncated distribution it was sampled from (None: greedy)


class Drafter:
    """Drafts one token at a time after ``ledger.tokens``; keeps its KV cache in step with the
    ledger (it evaluates only the tokens it has not seen, and rolls back on a verdict)."""

    def __init__(self, model: LlamaCppModel, params: SamplingParams) -> None:
        self.model = model
        self.params = params
        # The edge's random stream (spawn key 0); the cloud uses spawn key 1.
        self.rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(0,)))
        self.draft_s = 0.0  # seconds spent evaluating the draft model

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
        logits = self.model.decode(feed, all_logits=False)[0]
        ledger.note_draft_kv(self.model.kv_len)
        if self.params.greedy:
            token, conf = greedy_with_confidence(logits)
            out = DraftToken(token, conf, None)
        else:
            dist = truncated(logits, self.params)
            token = dist.sample(self.rng)
            out = DraftToken(token, dist.prob_of(token), dist)
        ledger.append_drafts([out.token])
        self.draft_s += time.perf_counter() - t0
        return out

    def sync(self, ledger: SpeculationLedger) -> None:
        """Rolls the KV cache back to what the ledger still holds (after drafts were dropped)."""
        self.model.truncate(min(self.model.kv_len, ledger.draft_kv))

    def apply(self, decision: VerdictDecision) -> None:
        """Rolls the KV cache back as a verdict decided (nothing to re-evaluate)."""
        if decision.stale:
            return
        self.model.truncate(min(self.model.kv_len, decision.draft_keep))
