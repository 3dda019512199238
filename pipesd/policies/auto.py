"""The ``auto`` policy: verify when it pays, by what a verification really costs.

After every draft it decides "verify now, or draft one more" by maximising the expected number
of committed tokens per second, and between windows it may decide not to speculate at all and
let the target decode alone. docs/policies.md states the rule; the symbols here are its:

    a_i    calibrated probability that draft i of the window is accepted (from its confidence)
    a_bar  predicted acceptance of a draft not made yet (moving average of recent a_i)
    P_i    a_1 * ... * a_i, P_0 = 1: all of the first i drafts accepted
    E(n)   P_0 + ... + P_n: tokens a window of n drafts commits (accepted ones + correction
           or bonus)
    V(m)   cost of one verification pass of m tokens (the target's measured curve)
    gamma  seconds to draft one token;  R  round trip;  S  sending the window's last batch
    W(n)   R + S + V(n + 1): from closing the window to its verdict
    F(n)   P_n * a_bar: the whole window accepted and the bonus equal to the first draft made
           during the wait, so that the drafts made during W survive
    H(n)   min(n * gamma, W(n) - gamma, (L - 1) * gamma): drafting of the next window hidden
           behind W (L = drafts allowed during the wait); 0 without a network (local target)
    T(n)   n * gamma + W(n) - F(n) * H(n): expected time of the cycle
    rate(n) = E(n) / T(n);   rate_alone = 1 / V(1) (the target decoding alone, streamed)

After the k-th draft, n* = argmax over n in [k, N_max] of rate(n), with a_i known for i <= k
and a_bar beyond: verify now iff n* = k. If even rate(n*) is below rate_alone, nothing is
drafted during this window's verification, and the next window's start decides anew. Costs
are not monotone in n (a staircase), so every n is evaluated, not just the next.

Between windows, with B tokens still to produce, speculating pays when c * behind + B /
rate_spec < B / rate_alone, where c * behind is the drafter catching up on the tokens it has
not seen (the prompt in local mode, the tokens decoded alone) and rate_spec is the rule
replayed over the last 64 guesses of the drafter along the sequence (from verdicts and
shadow guesses: each window's drafts up to the first rejected one): windows closed as the
rule closes them, committing what was really accepted, at T(n). a_bar follows the last few
drafts and its start (0.75) sits at break-even on the F16 target: as the test of whether to
speculate it sent 21% of the tokens to the target alone on replayed F16 traces and lost 11%
(bench/bench_replay.py, docs/policies.md). Before any guess is seen, a window is tried if
rate(n*) at a_bar + 0.15 would pay; with 1-15 guesses, rate(n*) at their acceptance (a_bar
counting as 4 of them, up to 16 once the calibration has judged 64 drafts) decides.
Otherwise the target decodes alone for a block of tokens and the rule is asked again; coming
back from the target alone needs a predicted gain of 10% (no flapping on noise), staying
with speculation only that it pays. Through a network the idle edge guesses each token
decoded alone with the drafter when a guess costs under 30% of the cloud's step, which keeps
it caught up and the trace fresh; otherwise one probe window refreshes them after each
block, provided speculation would pay at a_bar + 0.15, and the block doubles (8 .. 64
tokens) while probes keep confirming.

The pipeline is PipeSD's: the DP plans how the window is streamed and the edge drafts during
verification.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipesd.cloud.verifier import Verdict
from pipesd.costs import PassCostCurve
from pipesd.edge.drafter import DraftToken
from pipesd.policies.calibration import AcceptanceModel
from pipesd.policies.pipesd import PipeSDPolicy

#: The longest window the rule considers (the cloud calibrates passes of up to 32 tokens).
MAX_WINDOW = 31
#: Target-alone blocks: tokens decoded before the next probe window.
MIN_BLOCK, MAX_BLOCK = 8, 64
#: a_bar before any draft of the session was seen (no calibration file).
DEFAULT_ACCEPTANCE = 0.75
#: Leaving the target alone for speculation needs a predicted gain of this factor.
SWITCH_MARGIN = 1.1
#: A probe window is run only if speculation would pay at a_bar + OPTIMISM.
OPTIMISM = 0.15
#: The edge guesses alone tokens only while a guess costs less than this share of V(1).
#: Measured (Q4_K_M target, s1, bench/RESULTS.md): guesses at 0.7 of V(1) slowed the stream
#: 12% (edge CPU beside the link); below 0.3 (the F16 target) they are cheap.
SHADOW_FRACTION = 0.3
#: Guesses along the sequence kept for the replay, and the fewest the replay needs.
TRACE_LEN, TRACE_MIN = 64, 16
#: With fewer guesses than TRACE_MIN, a_bar weighs as PRIOR_GUESSES guesses beside the ones
#: seen, rising to TRACE_MIN as the calibration has judged up to LEARNT_DRAFTS drafts of the
#: pair (from earlier sequences or a file): a_bar then says what this pair accepts, not what
#: the bins' prior guesses.
PRIOR_GUESSES, LEARNT_DRAFTS = 4, 64
#: Decisions between windows kept in ``decision_log`` (per policy object; the bench makes one
#: per run).
LOG_LEN = 256


@dataclass(frozen=True)
class CycleModel:
    """What one speculation cycle costs: the pass curve and the edge's own costs."""

    pass_s: Callable[[int], float]  # V(m): seconds of a pass of m tokens
    gamma_s: float
    rtt_s: float = 0.0
    send_s: float = 0.0
    overlap: bool = False  # drafting continues during verification (a network link)
    wait_limit: int = 16


def expected_tokens(probs: Sequence[float]) -> float:
    """E(n) for a window whose drafts are accepted with probabilities ``probs``."""
    total, p = 1.0, 1.0
    for a in probs:
        p *= a
        total += p
    return total


def cycle_time(n: int, p_full: float, model: CycleModel) -> float:
    """T(n): drafting n tokens, sending, verifying, less the drafting hidden behind W."""
    wait = model.rtt_s + model.send_s + model.pass_s(n + 1)
    draft = n * model.gamma_s
    if model.overlap:
        hidden = min(draft, max(0.0, wait - model.gamma_s), (model.wait_limit - 1) * model.gamma_s)
        draft -= p_full * max(0.0, hidden)
    return draft + wait


def window_rate(probs: Sequence[float], future: float, model: CycleModel) -> float:
    """rate(n) = E(n) / T(n) for the window of drafts ``probs`` (n = len(probs))."""
    n = len(probs)
    p_n = 1.0
    for a in probs:
        p_n *= a
    return expected_tokens(probs) / cycle_time(n, p_n * future, model)


def best_window(known: Sequence[float], future: float, model: CycleModel,
                max_window: int = MAX_WINDOW) -> tuple[int, float]:  # fmt: skip
    """(n*, rate(n*)) over n in [max(1, len(known)), max_window]: drafts beyond the known
    ones are predicted to be accepted with probability ``future``."""
    k = len(known)
    best_n, best_rate = 0, -1.0
    expected, p = 1.0, 1.0  # E and P_n, extended one draft at a time
    for n in range(1, max(max_window, k) + 1):
        p *= known[n - 1] if n <= k else future
        expected += p
        if n < k:
            continue
        rate = expected / cycle_time(n, p * future, model)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n, best_rate


def replay_rate(
    trace: Sequence[tuple[float, bool]],
    prob: Callable[[float], float],
    future: float,
    model: CycleModel,
    max_window: int = MAX_WINDOW,
) -> float | None:
    """rate_spec: tokens per second the rule would have committed over ``trace``, the
    drafter's guesses at successive positions of the sequence (confidence, right or not).

    A window from position i sees the guesses i, i + 1, ... (draft j + 1 of a window is the
    guess after j accepted ones); the rule closes it as it would live, it commits the guesses
    right in a row plus one, and costs T(n), its drafting hidden when the guess after the
    window is right as well. None if the trace holds less than one window."""
    i, tokens, seconds = 0, 0, 0.0
    size = len(trace)
    while i < size:
        probs: list[float] = []
        for k in range(i, size):
            probs.append(prob(trace[k][0]))
            if best_window(probs, future, model, max_window)[0] <= len(probs):
                break
        n = len(probs)
        right = 0
        while right < n and trace[i + right][1]:
            right += 1
        if right == size - i:
            break  # the window runs to the trace's end: its outcome is not known
        full = right == n and trace[i + n][1]
        tokens += right + 1
        seconds += cycle_time(n, 1.0 if full else 0.0, model)
        i += right + 1
    return tokens / seconds if seconds > 0 else None


def alone_rate(model: CycleModel) -> float:
    """Tokens per second of the target decoding alone (one pass of one token each)."""
    v1 = model.pass_s(1)
    return 1.0 / v1 if v1 > 0 else 0.0


class AutoPolicy(PipeSDPolicy):
    """Cost-aware speculation over PipeSD's pipeline (module docstring: the rule).

    Args:
        acceptance: the calibration to start from, learnt in place from every verdict and
            guess (a Generator passes its own, so what one sequence learnt serves the next;
            pass a copy to keep one unchanged). None: a fresh one.
        fallback_len: drafts per window while the pass curve is still unknown.
    """

    def __init__(
        self,
        *,
        acceptance: AcceptanceModel | None = None,
        max_window: int = MAX_WINDOW,
        fallback_len: int = 4,
        wait_drafts: int = 16,
        ewma: float = 0.1,
    ) -> None:
        self._leaving = False  # speculation stops at the next verdict
        self._wait_limit = wait_drafts
        super().__init__(name="auto", trigger="fixed", fixed_len=fallback_len,
                         max_window=max_window, wait_drafts=wait_drafts)  # fmt: skip
        self.acceptance = acceptance if acceptance is not None else AcceptanceModel()
        self.curve = PassCostCurve()
        self.fallback_len = fallback_len
        self.ewma = ewma
        rate = self.acceptance.mean_rate()
        self.future = rate if rate is not None else DEFAULT_ACCEPTANCE
        self._link_costs: Callable[[], list[float]] = list
        self._link_table: list[float] = []
        self.overlap = False
        self.draft_s = 0.0  # measured at load: gamma until the monitor has its own
        self.draft_prefill_s = 0.0  # seconds per token the drafter catches up
        self._conf: list[float] = []  # confidences of the window being drafted, by position
        self._probs: list[float] = []
        self._submitted: list[float] | None = None  # confidences of the window in flight
        self.block = MIN_BLOCK
        self._probe_next = False
        self._shadowed = False
        # The drafter's guesses along the sequence: (confidence, right), from verdicts and
        # shadow guesses, for the replay that says whether speculation pays.
        self.trace: collections.deque[tuple[float, bool]] = collections.deque(maxlen=TRACE_LEN)
        self.alone_blocks = 0  # blocks decoded by the target alone (statistics)
        self._alone_last = False  # the last decision between windows left the target alone
        self.decisions = 0
        # What each decision between windows saw and chose (for reading a run afterwards).
        self.decision_log: list[dict[str, object]] = []

    # ----------------------------------------------------------------- wiring
    def bind(self, *, pass_costs: Callable[[], list[float]], overlap: bool,
             draft_s: float = 0.0, draft_prefill_s: float = 0.0) -> None:  # fmt: skip
        self._link_costs = pass_costs
        self.overlap = overlap
        self.draft_s, self.draft_prefill_s = draft_s, draft_prefill_s
        if self.monitor.gamma_s == 0.0 and draft_s > 0:
            # The moving average starts from the measured cost rather than from the first
            # draft's time alone.
            self.monitor.gamma_s = draft_s
        self._refresh_costs()

    def on_draft_costs(self, draft_s: float, prefill_s: float) -> None:
        if draft_s > 0:
            self.draft_s = draft_s
        if prefill_s > 0:
            self.draft_prefill_s = prefill_s

    def _refresh_costs(self) -> None:
        table = self._link_costs()
        if table != self._link_table:
            self._link_table = list(table)
            self.curve.set_prior(table)

    def cycle_model(self) -> CycleModel | None:
        """The current cost estimates, or None while the pass curve is unknown."""
        self._refresh_costs()
        if not self.curve.known:
            return None
        mon = self.monitor
        rtt = min(mon.rtt_s) if (self.overlap and mon.rtt_s) else 0.0
        send = (mon.alpha_s + mon.beta_s) if self.overlap else 0.0
        return CycleModel(
            pass_s=self.curve.cost,
            gamma_s=max(mon.gamma_s or self.draft_s, 1e-4),
            rtt_s=rtt,
            send_s=send,
            overlap=self.overlap,
            wait_limit=max(1, self.wait_drafts),
        )

    # ---------------------------------------------------------------- trigger
    def begin(self) -> None:
        super().begin()
        self._conf, self._probs, self._submitted = [], [], None

    def should_verify(self, pending: int, last: DraftToken) -> bool:
        a = self.acceptance.prob(last.confidence)
        del self._conf[pending - 1 :], self._probs[pending - 1 :]
        self._conf.append(last.confidence)
        self._probs.append(a)
        self.future = (1 - self.ewma) * self.future + self.ewma * a
        if pending >= self.max_window:
            return True
        model = self.cycle_model()
        if model is None:
            return pending >= self.fallback_len
        self.decisions += 1
        n_best, rate = best_window(self._probs[:pending], self.future, model, self.max_window)
        # If these drafts say no window beats the target alone, nothing is drafted during the
        # window's verification and the next window's start decides anew. The window still
        # ends where the rule says: closing it early loses more than it saves (a window in a
        # hard stretch is short anyway).
        self._leaving = rate < alone_rate(model)
        return n_best <= pending

    @property
    def wait_drafts(self) -> int:  # type: ignore[override]
        return 0 if self._leaving else self._wait_limit

    @wait_drafts.setter
    def wait_drafts(self, value: int) -> None:
        self._wait_limit = value

    def on_submit(self, count: int) -> None:
        self._submitted = self._conf[:count]
        self._conf, self._probs = [], []

    def on_verdict(self, verdict: Verdict) -> None:
        super().on_verdict(verdict)
        self.curve.observe(verdict.drafted + 1, verdict.verify_s)
        window = self._submitted if self._submitted is not None else []
        self.acceptance.update(window[: verdict.drafted], verdict.accepted)
        judged = min(verdict.accepted + 1, verdict.drafted, len(window))
        self.trace.extend((c, i < verdict.accepted) for i, c in enumerate(window[:judged]))
        self._submitted = None

    def on_rollback(self) -> None:
        super().on_rollback()
        self._conf, self._probs = [], []

    def on_pass(self, size: int, seconds: float) -> None:
        self.curve.observe(size, seconds)

    # -------------------------------------------------------------- no speculation
    def wants_shadow(self) -> bool:
        model = self.cycle_model()
        return model is not None and model.gamma_s < SHADOW_FRACTION * model.pass_s(1)

    def on_shadow(self, confidence: float, accepted: bool) -> None:
        self.acceptance.observe(confidence, accepted)
        self.trace.append((confidence, accepted))
        a = self.acceptance.prob(confidence)
        self.future = (1 - self.ewma) * self.future + self.ewma * a
        self._shadowed = True

    def hopeful_rate(self, model: CycleModel) -> float:
        """rate(n*) at an optimistic a_bar: could a window pay at all?"""
        return best_window([], min(0.99, self.future + OPTIMISM), model, self.max_window)[1]

    def prior_weight(self) -> float:
        """How many guesses a_bar counts as beside this sequence's own."""
        learnt = min(1.0, self.acceptance.observations / LEARNT_DRAFTS)
        return PRIOR_GUESSES + (TRACE_MIN - PRIOR_GUESSES) * learnt

    def evidence_rate(self, model: CycleModel) -> float:
        """rate(n*) at the acceptance the guesses of this sequence show so far, a_bar counting
        as ``prior_weight()`` guesses beside them."""
        hits = sum(1 for _, right in self.trace if right)
        w = self.prior_weight()
        a = (w * self.future + hits) / (w + len(self.trace))
        return best_window([], min(0.99, a), model, self.max_window)[1]

    def speculation_rate(self, model: CycleModel) -> float:
        """rate_spec: the rule replayed over the trace. While too little is seen to replay:
        before any guess, the hopeful rate (a window is tried if it could pay: it costs at most
        one cycle); after, the rate at the acceptance the guesses show (a probe that went badly
        ends speculation at once instead of after TRACE_MIN guesses)."""
        if len(self.trace) >= TRACE_MIN:
            spec = replay_rate(self.trace, self.acceptance.prob, self.future, model,
                               self.max_window)  # fmt: skip
            if spec is not None:
                return spec
        if self.trace:
            return self.evidence_rate(model)
        return self.hopeful_rate(model)

    def decode_alone(self, *, budget: int, behind: int) -> int:
        self._leaving = False
        model = self.cycle_model()
        if budget == 1 and model is not None:
            # No draft fits (k drafts yield up to k + 1 tokens), and drafting would first cost
            # the drafter's catch-up on every token it has not seen.
            return 1
        if model is None or budget < 1:
            return 0
        if self.curve.measured(1) is None:
            # V(1) was never measured (no calibration): one token decoded alone measures it,
            # where the estimate from larger passes would make the target alone look as dear.
            return 1
        alone = alone_rate(model)
        # Resuming speculation first costs the drafter's catch-up over what it has not seen.
        catch_up = behind * self.draft_prefill_s

        def pays(spec: float) -> bool:
            # Back from the target alone only by a margin, so that noise cannot flap it;
            # staying with speculation needs only that it pays.
            margin = SWITCH_MARGIN if self._alone_last else 1.0
            return spec > 0 and catch_up + budget / spec < budget / alone / margin

        spec = self.speculation_rate(model)
        if len(self.decision_log) < LOG_LEN:
            self.decision_log.append({
                "budget": budget, "behind": behind, "guesses": len(self.trace),
                "right": sum(1 for _, right in self.trace if right), "a_bar": self.future,
                "rate_spec": spec, "rate_hope": self.hopeful_rate(model), "rate_alone": alone,
                "gamma_ms": 1000 * model.gamma_s, "rtt_ms": 1000 * model.rtt_s,
                "pass_ms": [1000 * model.pass_s(m) for m in range(1, 9)],
                "level": self.curve.level(), "alone_blocks": self.alone_blocks,
            })  # fmt: skip
        if pays(spec):
            self.block, self._probe_next, self._alone_last = MIN_BLOCK, False, False
            return 0
        shadowed, self._shadowed = self._shadowed, False
        if shadowed:  # the estimates stayed fresh while the target decoded alone
            self.block, self._probe_next = MIN_BLOCK, False
        elif self._probe_next:
            # One window refreshes the estimates, unless even an optimistic acceptance would
            # not make speculation pay (then a probe could only cost time).
            self._probe_next = False
            if pays(self.hopeful_rate(model)):
                self._alone_last = False
                return 0
        tokens = min(self.block, budget)
        if not shadowed:
            self.block = min(2 * self.block, MAX_BLOCK)
            self._probe_next = True
        self.alone_blocks += 1
        self._alone_last = True
        return tokens
