"""The decode loop: drafting on the edge, verification by the target, statistics.

The edge and the target each keep their own SpeculationLedger, as they do when they run in
separate processes; in local mode the verifier is called directly instead of over a socket.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipesd._core import SpeculationLedger
from pipesd.cloud.verifier import TargetSession
from pipesd.edge.drafter import Drafter
from pipesd.errors import PromptTooLongError
from pipesd.llama_backend import LlamaCppModel
from pipesd.policies.base import DraftPolicy
from pipesd.sampling import SparseDist


@dataclass(frozen=True)
class TokenEvent:
    """One output token and the text it completes (may be empty mid-character).

    When the output ends inside a multi-byte character, one last event with ``token == -1``
    carries the replacement text for those trailing bytes; it adds no token.
    """

    token: int
    text: str


@dataclass
class GenerationStats:
    """What one generation cost and how speculation went. Times are wall-clock seconds."""

    policy: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    ttft_s: float = 0.0  # until the first output token was known
    prefill_s: float = 0.0
    draft_s: float = 0.0  # evaluating the draft model
    verify_s: float = 0.0  # target forward passes during verification
    drafted: int = 0  # draft tokens made
    submitted: int = 0  # draft tokens sent for verification
    accepted: int = 0  # draft tokens the target accepted
    verifications: int = 0
    rollbacks: int = 0  # verdicts that threw drafts away
    wasted_drafts: int = 0  # draft tokens thrown away
    stop_reason: str = ""  # "eos" or "length"

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.wall_s / self.new_tokens if self.new_tokens else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.submitted if self.submitted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per verification."""
        return self.accepted / self.verifications if self.verifications else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            tokens_per_s=self.tokens_per_s,
            ms_per_token=self.ms_per_token,
            acceptance_rate=self.acceptance_rate,
            mean_accepted=self.mean_accepted,
        )
        return d

    def summary(self) -> str:
        line = (
            f"[{self.policy}] {self.new_tokens} tokens in {self.wall_s:.2f} s: "
            f"{self.tokens_per_s:.2f} tok/s, {self.ms_per_token:.1f} ms/token, "
            f"TTFT {1000 * self.ttft_s:.0f} ms"
        )
        if self.verifications and self.policy not in ("target-only", "draft-only"):
            line += (
                f", acceptance {100 * self.acceptance_rate:.1f}%, "
                f"{self.verifications} verifications, "
                f"mean accepted {self.mean_accepted:.2f}, rollbacks {self.rollbacks}"
            )
        return line


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: GenerationStats
    prompt_tokens: list[int] = field(default_factory=list)


class _TextStream:
    """Turns token bytes into text as soon as whole characters are available."""

    def __init__(self, model: LlamaCppModel) -> None:
        self.model = model
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.model.detokenize([token]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class LocalDecoder:
    """Speculative decoding with both models in this process."""

    def __init__(
        self,
        *,
        tokenizer: LlamaCppModel,
        drafter: Drafter | None,
        target: TargetSession | None,
        policy_name: str,
        policy: DraftPolicy | None,
    ) -> None:
        if policy_name != "draft-only" and target is None:
            raise ValueError(f"policy {policy_name} needs a target model")
        if policy_name != "target-only" and drafter is None:
            raise ValueError(f"policy {policy_name} needs a draft model")
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.target = target
        self.policy_name = policy_name
        self.policy = policy
        self.eog = tokenizer.eog_tokens
        self.n_ctx = min(
            m for m in (
                drafter.model.n_ctx if drafter else None,
                target.target.n_ctx if target else None,
            ) if m is not None
        )  # fmt: skip

    def stream(
        self, prompt: Sequence[int], *, max_new_tokens: int, stats: GenerationStats
    ) -> Iterator[TokenEvent]:
        """Yields output tokens in order until an end-of-generation token or the budget."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + max_new_tokens > self.n_ctx:
            raise PromptTooLongError(
                f"prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens exceeds "
                f"the context of {self.n_ctx} (use a shorter prompt, fewer tokens or --ctx)"
            )
        stats.prompt_tokens = len(prompt)
        text = _TextStream(self.tokenizer)
        t0 = time.perf_counter()
        ledger = SpeculationLedger(self.n_ctx)
        ledger.begin(list(prompt))
        if self.target is not None:
            stats.prefill_s = self.target.prefill(prompt)
        if self.drafter is not None:
            self.drafter.begin(ledger)
            self.drafter.draft_s = 0.0
        if self.policy is not None:
            self.policy.begin()
        emitted = len(prompt)
        produced = 0
        while True:
            self._round(ledger, stats, budget=max_new_tokens - produced)
            committed = ledger.committed_len
            new = ledger.tokens_from(emitted)[: committed - emitted]
            stop = False
            for tok in new:
                if produced == 0:
                    stats.ttft_s = time.perf_counter() - t0
                produced += 1
                yield TokenEvent(tok, text.push(tok))
                if tok in self.eog:
                    stats.stop_reason, stop = "eos", True
                    break
                if produced >= max_new_tokens:
                    stats.stop_reason, stop = "length", True
                    break
            emitted = committed
            if stop:
                break
        tail = text.flush()
        if tail:
            yield TokenEvent(-1, tail)
        stats.new_tokens = produced
        stats.wall_s = time.perf_counter() - t0
        if self.drafter is not None:
            stats.draft_s = self.drafter.draft_s

    def _round(self, ledger: SpeculationLedger, stats: GenerationStats, *, budget: int) -> None:
        """One draft-then-verify round (stop-and-wait), or one step of a reference policy."""
        if self.policy_name == "draft-only":
            assert self.drafter is not None
            self.drafter.draft(ledger)
            stats.drafted += 1
            ledger.commit_drafts(1)
            return
        assert self.target is not None
        drafts: list[int] = []
        dists: list[SparseDist] = []
        if self.policy is not None:
            assert self.drafter is not None
            # k drafts yield up to k + 1 tokens: never draft past the budget.
            room = min(budget - 1, self.n_ctx - ledger.committed_len - 1)
            while len(drafts) < room:
                d = self.drafter.draft(ledger)
                drafts.append(d.token)
                if d.dist is not None:
                    dists.append(d.dist)
                stats.drafted += 1
                if d.token in self.eog or self.policy.should_verify(len(drafts), d):
                    break
        window = ledger.submit(len(drafts))
        verdict = self.target.verify(
            window.start, drafts, None if self.target.params.greedy else dists
        )
        decision = ledger.apply_verdict(window.epoch, verdict.accepted, verdict.next_token)
        if self.drafter is not None and self.policy is not None:
            self.drafter.apply(decision)
        stats.verify_s += verdict.verify_s
        if self.policy is not None:
            stats.verifications += 1
            stats.submitted += len(drafts)
            stats.accepted += verdict.accepted
            stats.wasted_drafts += decision.discarded
            stats.rollbacks += int(decision.rolled_back)
            self.policy.on_verdict(verdict)
