"""The decode loop: drafting on the edge, verification by the target, statistics.

The edge and the target each keep their own SpeculationLedger. The decoder talks to the
target through a ``VerifyLink``: ``LocalLink`` calls a target in this process, and
``pipesd.edge.client.CloudLink`` sends the same requests to a cloud server over TCP. Drafts
are streamed as they are made and a window is verified when the policy says so; while a
verdict is pending the decoder can keep drafting (``DraftPolicy.wait_drafts``).
"""

from __future__ import annotations

import codecs
import collections
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipesd._core import SpeculationLedger
from pipesd.cloud.verifier import TargetBackend, TargetSession, Verdict
from pipesd.edge.drafter import Drafter, DraftToken
from pipesd.errors import LinkLostError, PromptTooLongError, ProtocolError
from pipesd.llama_backend import LlamaCppModel
from pipesd.policies.base import DraftPolicy
from pipesd.sampling import SamplingParams, SparseDist

#: Prompt tokens the drafter evaluates between two looks for the cloud's first token: as many
#: as take about this long at its present speed (so the first token waits at most that), and
#: PREFILL_CHUNK while its speed is unknown.
PREFILL_SLICE_S = 0.1
PREFILL_CHUNK = 32
#: While the target decodes alone, the edge's catch-up per token takes at most this share of
#: one target step.
SHADOW_SHARE = 0.7
#: A drafter this much slower than its measured speed (a CPU quota: a phone, an IoT device)
#: goes idle before the first token is due, so that it has CPU time left to take it at once.
THROTTLED = 1.5


class FirstTokenClock:
    """When the first token of a sequence through a network is due, from the sequences
    before: the target's prefill time per prompt token (the cloud's own measure) and what
    the wait takes beyond the prefill (round trip, queueing). One per Generator.

    Measured (F16 target, s3: the 5G link, the edge limited to 1/5 of a core; time from the
    end of the target's prefill to the token's emission): a drafter busy with the prompt and
    with drafts until the token came took 87-387 ms to notice it, as each piece of its work
    (a draft: 175 ms at that speed) and the quota it had used ran out first; idle from two
    pieces before the token was due, 42-45 ms, as target-only (the link's round trip).
    """

    def __init__(self, keep: int = 8) -> None:
        self._per_token: collections.deque[float] = collections.deque(maxlen=keep)
        self._beyond: collections.deque[float] = collections.deque(maxlen=keep)

    def observe(self, prompt_len: int, wait_s: float, prefill_s: float) -> None:
        """A first token came ``wait_s`` after the PREFILL was sent; the target's prefill of
        ``prompt_len`` tokens took ``prefill_s`` of that."""
        if prompt_len > 0 and prefill_s > 0 and wait_s >= prefill_s:
            self._per_token.append(prefill_s / prompt_len)
            self._beyond.append(wait_s - prefill_s)

    def due_in(self, prompt_len: int) -> float | None:
        """Seconds from sending the PREFILL to its verdict, or None before any sequence."""
        if not self._per_token:
            return None
        return statistics.median(self._per_token) * prompt_len + min(self._beyond)


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
    wait_s: float = 0.0  # the edge waiting for verdicts
    wait_drafted: int = 0  # drafts made while a verdict was pending
    wait_kept: int = 0  # of those, drafts that survived the verdict
    batches: int = 0  # frames of drafts streamed before their window's verify request
    trigger_s: float = 0.0  # deciding when to verify (the policy's trigger)
    plan_s: float = 0.0  # planning batches (the DP solver and its monitor)
    alone_tokens: int = 0  # tokens the target decoded alone because the policy chose so
    shadow_s: float = 0.0  # the drafter guessing the tokens the target decoded alone
    reconnects: int = 0  # connections to the cloud re-established mid-generation
    bytes_up: int = 0  # bytes sent to the cloud (frames, headers included)
    bytes_down: int = 0  # bytes received from the cloud
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
        if self.alone_tokens:
            line += f", {self.alone_tokens} tokens by the target alone"
        if self.reconnects:
            line += f", reconnects {self.reconnects}"
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


class VerifyLink(Protocol):
    """The target as the edge sees it: a sequence, streamed drafts and verdicts."""

    @property
    def n_ctx(self) -> int:
        """The longest sequence the target accepts."""

    def start(self, prompt: Sequence[int], params: SamplingParams, epoch: int) -> float:
        """Starts a sequence (prefill); returns the seconds it took where known, else 0.

        The prefill also verifies an empty window after the prompt: its verdict, which
        commits the first output token, comes through ``wait`` like any other."""

    def send(
        self,
        epoch: int,
        start: int,
        tokens: Sequence[int],
        dists: Sequence[SparseDist] | None,
        *,
        verify: bool,
    ) -> None:
        """Streams drafts at positions ``start``...; ``verify`` closes the window there."""

    def wait(self, timeout: float | None) -> Verdict | None:
        """The verdict of the window in flight, or None if it did not come within timeout."""

    def recover(self, committed: Sequence[int], epoch: int) -> None:
        """Re-establishes the sequence from the committed prefix after LinkLostError."""

    def traffic(self) -> tuple[int, int]:
        """Bytes (up, down) moved so far."""

    def probe(self) -> None:
        """Measures a round trip of a small frame (answered through ``take_rtts``)."""

    def take_rtts(self) -> list[float]:
        """Round trips (seconds) measured since the last call."""

    def recent_rtts(self) -> list[float]:
        """The last round trips measured on this link, before this sequence too."""

    @property
    def max_inflight(self) -> int:
        """How many verify requests may be outstanding at once (1: one at a time)."""

    @property
    def max_window(self) -> int:
        """The most drafts one verification may cover; 0: no limit. Drafts not yet verified
        may be at most twice as many."""

    @property
    def max_dist(self) -> int:
        """The most entries one draft distribution may have; 0: no limit."""

    def pass_costs(self) -> list[float]:
        """The target's cost of one pass of 1, 2, ... tokens in seconds (empty: unknown)."""


class LocalLink:
    """A target in this process: a window is verified the moment it is sent.

    ``pass_costs``: the target's calibrated pass-cost table (``pipesd.costs``), if measured.
    """

    def __init__(self, target: TargetBackend, pass_costs: list[float] | None = None) -> None:
        self.target = target
        self.session: TargetSession | None = None
        self._verdict: Verdict | None = None
        self._costs = list(pass_costs or [])

    @property
    def n_ctx(self) -> int:
        return self.target.n_ctx

    def start(self, prompt: Sequence[int], params: SamplingParams, epoch: int) -> float:
        self.session = TargetSession(self.target, params)
        self._verdict = self.session.prefill(prompt, epoch=epoch)
        return self._verdict.verify_s

    def send(
        self,
        epoch: int,
        start: int,
        tokens: Sequence[int],
        dists: Sequence[SparseDist] | None,
        *,
        verify: bool,
    ) -> None:
        assert self.session is not None, "send before start"
        if self.session.receive(epoch, start, tokens, dists) and verify:
            self._verdict = self.session.verify_window(start + len(tokens))

    def wait(self, timeout: float | None) -> Verdict | None:
        verdict, self._verdict = self._verdict, None
        return verdict

    def recover(self, committed: Sequence[int], epoch: int) -> None:
        raise AssertionError("a local target never loses its connection")

    def traffic(self) -> tuple[int, int]:
        return 0, 0

    def probe(self) -> None:
        pass

    def take_rtts(self) -> list[float]:
        return []

    def recent_rtts(self) -> list[float]:
        return []

    @property
    def max_inflight(self) -> int:
        return 1

    max_window = 0  # a local target verifies windows of any length
    max_dist = 0

    def pass_costs(self) -> list[float]:
        return self._costs


class SpecDecoder:
    """Speculative decoding: a drafter on this side, the target behind a VerifyLink."""

    def __init__(
        self,
        *,
        tokenizer: LlamaCppModel,
        drafter: Drafter | None,
        link: VerifyLink | None,
        params: SamplingParams,
        policy_name: str,
        policy: DraftPolicy | None,
        trace: list[tuple[str, float, float]] | None = None,
        first_clock: FirstTokenClock | None = None,
    ) -> None:
        """``first_clock``: when first tokens came before (kept across sequences by the
        caller; a new one if None). ``trace``: if given, the decoder appends timeline events
        to it, as (kind, t, value) with t on ``time.perf_counter``: ("draft", start, end),
        ("send", t, tokens), ("verify", t, tokens) (a send closing a window) and ("verdict",
        t, cloud verify seconds)."""
        if policy_name != "draft-only" and link is None:
            raise ValueError(f"policy {policy_name} needs a target model")
        if policy_name != "target-only" and drafter is None:
            raise ValueError(f"policy {policy_name} needs a draft model")
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.link = link
        self.params = params
        self.policy_name = policy_name
        self.policy = policy
        self.eog = tokenizer.eog_tokens
        self.n_ctx = min(
            m for m in (
                drafter.model.n_ctx if drafter else None,
                link.n_ctx if link else None,
            ) if m is not None
        )  # fmt: skip
        self._dists: list[SparseDist | None] = []  # one per pending draft
        self._last: DraftToken | None = None  # the newest pending draft
        self._wait_fired = False  # the trigger fired on a draft made during the wait
        self.trace = trace
        self._wait_made = 0  # drafts made while the last verdict was pending
        self._inflight = 0  # target-only: requests for the next tokens not yet answered
        self._first_pending = False  # the prefill's verdict (the first token) is awaited
        self._prefill_unanswered = False  # target-only streaming: the next verdict is its
        self._alone_left = 0  # tokens the policy wants decoded by the target alone
        self._drain = False  # the policy chose to speculate once the requests in flight land
        self._guess: DraftToken | None = None  # the drafter's guess of the next alone token
        self.first_clock = first_clock if first_clock is not None else FirstTokenClock()
        self._t_prefill = 0.0  # when the last PREFILL was sent
        self._prompt_len = 0  # the tokens it prefills
        if drafter is not None and link is not None:
            drafter.max_dist = link.max_dist

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
        self._dists, self._last, self._inflight = [], None, 0
        self._first_pending = False
        traffic0 = self.link.traffic() if self.link is not None else (0, 0)
        if self.drafter is not None:
            self.drafter.begin(ledger)
            self.drafter.draft_s = 0.0
        if self.link is not None:
            self._start(ledger, list(prompt), stats)
        if self.policy is not None:
            if self.link is not None:
                draft_s, draft_prefill_s = self.drafter.live_costs if self.drafter else (0.0, 0.0)
                self.policy.bind(pass_costs=self.link.pass_costs,
                                 overlap=self.link.max_inflight > 1, draft_s=draft_s,
                                 draft_prefill_s=draft_prefill_s)  # fmt: skip
                # The round trip is known before this sequence's first window measures it.
                self.link.take_rtts()
                for rtt in self.link.recent_rtts():
                    self.policy.on_rtt(rtt)
            self.policy.begin()
        self._alone_left, self._guess, self._drain = 0, None, False
        if self._first_pending and self.policy is not None:
            self._start_alone(max_new_tokens)
        emitted = len(prompt)
        produced = 0
        try:
            while True:
                self._round_or_recover(ledger, stats, budget=max_new_tokens - produced)
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
        finally:
            if self.link is not None:
                up, down = self.link.traffic()
                stats.bytes_up, stats.bytes_down = up - traffic0[0], down - traffic0[1]
        tail = text.flush()
        if tail:
            yield TokenEvent(-1, tail)
        stats.new_tokens = produced
        stats.wall_s = time.perf_counter() - t0
        if self.drafter is not None:
            stats.draft_s = self.drafter.draft_s

    def _start(self, ledger: SpeculationLedger, prompt: list[int], stats: GenerationStats) -> float:
        assert self.link is not None
        self._t_prefill, self._prompt_len = time.perf_counter(), len(prompt)
        try:
            seconds = self.link.start(prompt, self.params, ledger.epoch)
        except LinkLostError:
            self._recover(ledger, stats)
            return 0.0
        self._prefill_in_flight()
        return seconds

    def _start_alone(self, budget: int) -> None:
        """Before the first token through a network: if the policy would have the target
        decode alone from the start, the prefill's verdict becomes the first of the target's
        streamed tokens (the next ones are asked for at once, as target-only does), and the
        drafter neither evaluates the prompt nor drafts while it waits."""
        assert self.link is not None and self.policy is not None
        if self.link.max_inflight <= 1:
            return  # locally the first token is there at once: the policy is asked after it
        # The drafter would evaluate the prompt while the target prefills: nothing behind.
        alone = self.policy.decode_alone(budget=budget - 1, behind=0)
        if alone > 0:
            self._first_pending = False
            self._inflight, self._prefill_unanswered = 1, True
            self._alone_left = alone

    def _prefill_in_flight(self) -> None:
        """A PREFILL was sent: its verdict (the next output token) is the one awaited next."""
        assert self.link is not None
        if self._streams_target():
            self._inflight = 1  # one of the target-only requests kept outstanding
            self._prefill_unanswered = True
        else:
            self._first_pending = True

    def _streams_target(self) -> bool:
        """Target-only through a link that keeps several requests outstanding."""
        return (
            self.policy_name == "target-only"
            and self.link is not None
            and self.link.max_inflight > 1
        )

    def _round_or_recover(
        self, ledger: SpeculationLedger, stats: GenerationStats, *, budget: int
    ) -> None:
        try:
            self._round(ledger, stats, budget=budget)
        except LinkLostError:
            self._recover(ledger, stats)
            if self._first_pending and self.policy is not None:
                self._start_alone(budget)  # the resumed prefill gives the next token

    def _recover(self, ledger: SpeculationLedger, stats: GenerationStats) -> None:
        """The connection dropped: forget every draft, resume from the committed prefix."""
        assert self.link is not None
        stats.wasted_drafts += ledger.discard_drafts()
        self._dists, self._last, self._wait_fired = [], None, False
        self._inflight = 0
        self._first_pending = False
        self._guess, self._alone_left, self._drain = None, 0, False
        if self.policy is not None:
            self.policy.on_rollback()
        if self.drafter is not None:
            self.drafter.sync(ledger)
        self._t_prefill, self._prompt_len = time.perf_counter(), ledger.committed_len
        self.link.recover(ledger.committed(), ledger.epoch)
        self._prefill_in_flight()
        stats.reconnects += 1

    def _draft_one(self, ledger: SpeculationLedger, stats: GenerationStats) -> DraftToken:
        assert self.drafter is not None
        t0 = time.perf_counter()
        d = self.drafter.draft(ledger)
        t1 = time.perf_counter()
        if self.trace is not None:
            self.trace.append(("draft", t0, t1))
        if self.policy is not None:
            if self.drafter.last_fed == 1:  # a catch-up is no draft time
                self.policy.on_draft_time(t1 - t0)
            self.policy.on_draft_costs(*self.drafter.live_costs)
        self._dists.append(d.dist)
        self._last = d
        stats.drafted += 1
        return d

    def _should_verify(self, pending: int, d: DraftToken, stats: GenerationStats) -> bool:
        assert self.policy is not None
        t0 = time.perf_counter()
        fire = d.token in self.eog or self.policy.should_verify(pending, d)
        stats.trigger_s += time.perf_counter() - t0
        return fire

    def _should_send(self, pending: int, stats: GenerationStats) -> bool:
        assert self.policy is not None
        t0 = time.perf_counter()
        send = self.policy.should_send(pending)
        stats.plan_s += time.perf_counter() - t0
        return send

    def _send_unsent(self, ledger: SpeculationLedger, upto: int, *, verify: bool) -> None:
        """Streams pending drafts [sent, upto) (the window ends at ``upto`` when verify)."""
        assert self.link is not None
        sent = min(ledger.sent_count, upto)
        tokens = ledger.pending()[sent:upto]
        dists = None if self.params.greedy else [d for d in self._dists[sent:upto] if d]
        start = ledger.committed_len + sent
        if verify:
            ledger.submit(upto)
        else:
            ledger.mark_sent(len(tokens))
        self.link.send(ledger.epoch, start, tokens, dists, verify=verify)
        if self.trace is not None:
            self.trace.append(("verify" if verify else "send", time.perf_counter(), len(tokens)))

    def _round(self, ledger: SpeculationLedger, stats: GenerationStats, *, budget: int) -> None:
        """Drafts until the policy triggers, verifies the window, applies the verdict."""
        if self.policy_name == "draft-only":
            self._draft_one(ledger, stats)
            ledger.commit_drafts(1)
            self._dists = []
            return
        assert self.link is not None
        if self._streams_target():
            self._target_only_step(ledger, stats, budget=budget)
            return
        if self._first_pending:
            self._first_token(ledger, stats)
            return
        # Between windows, or as the target's block alone runs out (its last requests still
        # in flight, so that another block streams on without a gap): the policy decides.
        ahead = budget - self._inflight  # tokens still to ask for
        if (
            self.policy is not None
            and self._alone_left == 0
            and not self._drain
            and ledger.pending_count == 0
            and ahead >= 1
        ):
            behind = 0
            if self.drafter is not None:
                end = ledger.committed_len + self._inflight
                behind = max(0, end - 1 - self.drafter.model.kv_len)
            self._alone_left = self.policy.decode_alone(budget=ahead, behind=behind)
            # Speculation starts once the requests in flight are answered.
            self._drain = self._alone_left == 0 and self._inflight > 0
        if self._alone_left > 0 or self._inflight > 0:
            self._target_only_step(ledger, stats, budget=budget, alone=True)
            return
        self._drain = False
        self.link.probe()  # between windows the cloud answers at once
        # k drafts yield up to k + 1 tokens: never draft past the budget or the context.
        room = max(0, min(budget - 1, self.n_ctx - ledger.committed_len - 1))
        if self.link.max_window:
            room = min(room, self.link.max_window)
        if self.policy is not None:
            pending = ledger.pending_count
            last = self._last
            # Drafts kept from the wait: the trigger already saw them while they were made.
            stop = pending > 0 and last is not None and (last.token in self.eog or self._wait_fired)
            while not stop and pending < room:
                d = self._draft_one(ledger, stats)
                pending += 1
                stop = self._should_verify(pending, d, stats)
                if not stop and pending < room and self._should_send(pending, stats):
                    self._send_unsent(ledger, ledger.pending_count, verify=False)
                    stats.batches += 1
        count = min(ledger.pending_count, room)
        last_batch = count - min(ledger.sent_count, count)
        if self.policy is not None:
            self.policy.on_submit(count)
        t_send = time.perf_counter()
        self._send_unsent(ledger, count, verify=True)
        self._close_window(ledger, stats, count=count, last_batch=last_batch, t_send=t_send)

    def _first_token(self, ledger: SpeculationLedger, stats: GenerationStats) -> None:
        """Awaits the prefill's verdict, the first output token. Through a network the drafter
        evaluates the prompt meanwhile, a chunk at a time so that the token is emitted as soon
        as it arrives (policies that draft during verification then guess ahead); locally the
        verdict is already there, and the drafter catches up at its first draft."""
        assert self.link is not None
        self._first_pending = False
        t_send = time.perf_counter()
        ledger.submit(0)
        verdict: Verdict | None = None
        idle_at = None
        if self.drafter is not None and self.link.max_inflight > 1:
            t0 = time.perf_counter()
            idle_at = self._first_idle_at()
            more, evaluated = True, False
            while more and (idle_at is None or time.perf_counter() < idle_at):
                verdict = self.link.wait(0.0)
                if verdict is not None:
                    break
                per_token = self.drafter.live_costs[1]
                chunk = max(2, int(PREFILL_SLICE_S / per_token)) if per_token > 0 else PREFILL_CHUNK
                more, evaluated = self.drafter.prefill(ledger, max_tokens=chunk), True
            if self.policy is not None:
                self.policy.on_draft_costs(*self.drafter.live_costs)
            if self.trace is not None and evaluated:
                self.trace.append(("draft", t0, time.perf_counter()))
        self._close_window(ledger, stats, count=0, last_batch=0, t_send=t_send, first=True,
                           verdict=verdict, idle_at=idle_at)  # fmt: skip

    def _close_window(
        self,
        ledger: SpeculationLedger,
        stats: GenerationStats,
        *,
        count: int,
        last_batch: int,
        t_send: float,
        first: bool = False,
        verdict: Verdict | None = None,
        idle_at: float | None = None,
    ) -> None:
        """Awaits the verdict of the window in flight (``count`` drafts; ``verdict`` if it has
        come already) and applies it. ``first``: the prefill's verdict, which is no
        verification the policy asked for; ``idle_at``: no drafting during the wait after
        this time."""
        assert self.link is not None
        if verdict is None:
            verdict = self._await_verdict(ledger, stats, idle_at=idle_at)
        t_verdict = time.perf_counter()
        if self.trace is not None:
            self.trace.append(("verdict", t_verdict, verdict.verify_s))
        decision = ledger.apply_verdict(verdict.epoch, verdict.accepted, verdict.next_token)
        if decision.stale:
            raise ProtocolError(
                f"the cloud answered epoch {verdict.epoch} at position {verdict.start}, "
                f"but the edge is at epoch {ledger.epoch}"
            )
        beyond = len(self._dists) - count
        if decision.rolled_back:
            self._dists, self._last, self._wait_fired = [], None, False
        else:  # the first draft beyond the window became the bonus token
            self._dists = self._dists[count + 1 :]
            if not self._dists:
                self._last, self._wait_fired = None, False
            # Of the drafts made during this wait, all but the one that became the bonus
            # (drafts kept from an earlier wait and left beyond a budget-cut window are not
            # counted again).
            stats.wait_kept += max(0, min(self._wait_made, beyond - 1))
        if self.drafter is not None:
            self.drafter.apply(decision)
        if first:
            self._first_came(verdict, t_verdict, stats)
        else:
            stats.verify_s += verdict.verify_s
        if self.policy is None:
            return
        stats.wasted_drafts += decision.discarded
        if first:
            if decision.rolled_back:
                self.policy.on_rollback()
            return
        stats.verifications += 1
        stats.submitted += count
        stats.accepted += verdict.accepted
        stats.rollbacks += int(decision.rolled_back)
        self.policy.on_verdict(verdict)  # first: it may learn from the rejected window
        if decision.rolled_back:
            self.policy.on_rollback()
        for rtt in self.link.take_rtts():
            self.policy.on_rtt(rtt)
        self.policy.on_window_timing(verdict, last_batch, t_verdict - t_send)

    def _target_only_step(
        self, ledger: SpeculationLedger, stats: GenerationStats, *, budget: int,
        alone: bool = False,
    ) -> None:  # fmt: skip
        """The target decodes one token by itself: target-only, or a policy's block alone.

        Requests for the next tokens (empty windows at successive positions) are kept
        outstanding, up to ``link.max_inflight`` and never past the budget or the context
        (nor, for a policy's block, past the tokens it asked for), so through a network the
        cloud starts each token as soon as it has the last one instead of waiting a round
        trip for the edge to ask. One token is committed per call. Answers to requests still
        outstanding when the sequence ends belong to its epoch, which the link drops later.
        """
        assert self.link is not None
        room = min(budget, self.n_ctx - ledger.committed_len)
        t0 = time.perf_counter()
        while self._inflight < min(self.link.max_inflight, room) and (
            not alone or self._alone_left > 0
        ):
            start = ledger.committed_len + self._inflight
            self.link.send(ledger.epoch, start, [], None, verify=True)
            self._inflight += 1
            if alone:
                self._alone_left -= 1
            if self.trace is not None:
                self.trace.append(("verify", time.perf_counter(), 0))
        if self._inflight == 0:  # the budget is spent: nothing left to ask for
            self._alone_left = 0
            return
        verdict = self.link.wait(None)
        stats.wait_s += time.perf_counter() - t0
        if verdict is None:  # pragma: no cover - wait(None) raises instead
            raise LinkLostError("no answer from the cloud")
        self._inflight -= 1
        if self.trace is not None:
            self.trace.append(("verdict", time.perf_counter(), verdict.verify_s))
        ledger.submit(0)
        decision = ledger.apply_verdict(verdict.epoch, verdict.accepted, verdict.next_token)
        if decision.stale or verdict.start != ledger.committed_len - 1:
            raise ProtocolError(
                f"the cloud answered position {verdict.start} of epoch {verdict.epoch}, but "
                f"the edge expected position {ledger.committed_len - 1} of epoch {ledger.epoch}"
            )
        first = self._prefill_unanswered  # the prefill's verdict: no pass of one token
        if first:
            self._prefill_unanswered = False
            self._first_came(verdict, time.perf_counter(), stats)
        else:
            stats.verify_s += verdict.verify_s
        if alone:
            stats.alone_tokens += int(not first)
            if self.policy is not None:
                if not first:
                    self.policy.on_pass(1, verdict.verify_s)
                self._shadow(ledger, verdict.next_token, stats)

    def _first_came(self, verdict: Verdict, t_verdict: float, stats: GenerationStats) -> None:
        """The prefill's verdict came: its time is the prefill's, and tells the clock."""
        stats.prefill_s = verdict.verify_s
        wait = t_verdict - self._t_prefill
        self.first_clock.observe(self._prompt_len, wait, verdict.verify_s)

    def _first_idle_at(self) -> float | None:
        """When a CPU-limited edge should stop its own work before the first token is due
        (None: it need not): two of its longest pieces of work (a draft, a prompt slice)
        ahead of the due time, so that the piece in progress ends and the quota it used
        refills before the token comes."""
        if self.drafter is None or self.drafter.slowdown < THROTTLED:
            return None
        due = self.first_clock.due_in(self._prompt_len)
        if due is None:
            return None
        piece = max(self.drafter.live_costs[0], PREFILL_SLICE_S)
        return self._t_prefill + due - 2 * piece

    def _shadow(self, ledger: SpeculationLedger, token: int, stats: GenerationStats) -> None:
        """While the target decodes alone through a network, the idle edge keeps its drafter
        in step and tells the policy whether it would have guessed each token (greedy only,
        and only while a guess takes less than the cloud's step, so it never slows the
        stream). Locally that work would not be free: the drafter catches up when drafting
        resumes."""
        assert self.link is not None and self.policy is not None
        guess, self._guess = self._guess, None
        if guess is not None:
            self.policy.on_shadow(guess.confidence, guess.token == token)
        if self.drafter is None or not self.params.greedy or self.link.max_inflight <= 1:
            return
        if self._alone_left == 0 and self._inflight == 0:
            return  # the block ends here: the next draft catches up anyway
        if not self.policy.wants_shadow():
            return
        t0 = time.perf_counter()
        behind = ledger.committed_len - 1 - self.drafter.model.kv_len
        costs, prefill_s = self.link.pass_costs(), self.drafter.live_costs[1]
        step = PREFILL_CHUNK
        if costs and costs[0] > 0 and prefill_s > 0:
            step = max(1, int(SHADOW_SHARE * costs[0] / prefill_s))
        if behind > step:
            # Catch up first (the prompt's rest, if the first token came before the drafter
            # had evaluated it), a few tokens per step so that the stream never waits.
            self.drafter.prefill(ledger, max_tokens=step)
        else:
            # The guess evaluates the few tokens it is behind with the last one. (Catching up
            # alone would leave it one token behind again at the next step, for good.)
            self._guess = self.drafter.guess(ledger)
        stats.shadow_s += time.perf_counter() - t0

    def _await_verdict(
        self, ledger: SpeculationLedger, stats: GenerationStats, *, idle_at: float | None = None
    ) -> Verdict:
        """Waits for the verdict; drafts and streams more meanwhile if the policy says so
        (not after ``idle_at``, if given)."""
        assert self.link is not None
        t0 = time.perf_counter()
        limit = self.policy.wait_drafts if self.policy is not None else 0
        window = ledger.window.count
        made = self._wait_made = 0
        self._wait_fired = False
        held_max = 2 * self.link.max_window  # drafts the target holds unverified (0: any)
        try:
            while True:
                waiting = (
                    made < limit
                    and not self._wait_fired
                    and ledger.committed_len + ledger.pending_count < self.n_ctx - 1
                    and (self._last is None or self._last.token not in self.eog)
                    and (held_max == 0 or ledger.pending_count < held_max)
                    and (idle_at is None or time.perf_counter() < idle_at)
                )
                verdict = self.link.wait(0.0 if waiting else None)
                if verdict is not None:
                    return verdict
                if waiting:
                    d = self._draft_one(ledger, stats)
                    made += 1
                    self._wait_made = made
                    stats.wait_drafted += 1
                    self._send_unsent(ledger, ledger.pending_count, verify=False)
                    # If kept, the first becomes the bonus token; the next window starts after.
                    position = ledger.pending_count - window - 1
                    if position >= 1 and self._should_verify(position, d, stats):
                        self._wait_fired = True
        finally:
            stats.wait_s += time.perf_counter() - t0
