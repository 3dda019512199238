"""The policy interface and the policies that need no network model.

A policy sees each drafted token (with its confidence) and decides whether the pending drafts
go to the target now. ``target-only`` and ``draft-only`` are references that decode with one
model alone; the decoder handles them without drafting or without verifying.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pipesd.cloud.verifier import Verdict
from pipesd.edge.drafter import DraftToken

#: Every policy name the decoder accepts, with a one-line description.
POLICIES: dict[str, str] = {
    "auto": "verify when it pays: windows chosen from the measured verification cost curve, "
    "link and draft costs and calibrated acceptance; the target decodes alone when "
    "speculation cannot pay (the default)",
    "pipesd": "dual-threshold trigger, DP-planned token-batch pipeline, drafting during "
    "verification",
    "pipesd-no-pipeline": "PipeSD's trigger; the window goes out at once and the edge waits",
    "pipesd-fixed-trigger": "PipeSD's pipeline with a fixed draft length (--draft-len)",
    "pipesd-token-trigger": "PipeSD with only the single-token threshold R2",
    "pipesd-seq-trigger": "PipeSD with only the cumulative threshold R1",
    "vanilla": "draft a fixed number of tokens, then verify and wait (stop-and-wait)",
    "hsl": "verify when one draft's confidence falls below a threshold (0.99 code, 0.7 math)",
    "edgellm": "cumulative-confidence threshold adapted after every verdict; drafts during "
    "verification",
    "picospec": "fixed draft length; the next round is drafted while this one is verified",
    "specpp": "keep drafting while the estimated probability that all drafts are accepted "
    "stays above a threshold",
    "target-only": "the target model alone, one token per forward pass (the reference)",
    "draft-only": "the draft model alone, no verification (its text differs)",
}


class DraftPolicy(ABC):
    """Decides when pending drafts are sent for verification."""

    name = "base"
    #: How many drafts to make (and stream) while a verdict is pending; 0 = stop and wait.
    #: Drafts made during the wait survive only a fully accepted window whose bonus token
    #: equals the first of them.
    wait_drafts = 0

    def begin(self) -> None:
        """Called once at the start of a sequence."""

    @abstractmethod
    def should_verify(self, pending: int, last: DraftToken) -> bool:
        """True when the ``pending`` drafts (``last`` the newest) go to the target now."""

    def on_verdict(self, verdict: Verdict) -> None:
        """Called after each verdict (adaptive policies update themselves here)."""

    def on_rollback(self) -> None:
        """Drafts were thrown away: the speculation restarts after the committed prefix."""

    def should_send(self, pending: int) -> bool:
        """After drafting the window's ``pending``-th token and not triggering: stream the
        unsent drafts now as one batch? (Otherwise they go with the verify request.)"""
        return False

    def on_draft_time(self, seconds: float) -> None:
        """How long the newest draft token took."""

    def on_rtt(self, seconds: float) -> None:
        """A round trip of a small frame to the cloud."""

    def on_draft_costs(self, draft_s: float, prefill_s: float) -> None:
        """The drafter's present seconds per drafted token and per prompt token (its measured
        costs times the slowdown it sees now: ``Drafter.live_costs``)."""

    def on_window_timing(self, verdict: Verdict, last_batch: int, send_to_verdict_s: float) -> None:
        """A verified window: its last batch's size and the time from sending it to the
        verdict."""

    def bind(self, *, pass_costs: Callable[[], list[float]], overlap: bool,
             draft_s: float = 0.0, draft_prefill_s: float = 0.0) -> None:  # fmt: skip
        """At the start of a stream: ``pass_costs()`` gives the target's current cost of a
        pass of 1, 2, ... tokens in seconds (empty when unknown); ``overlap``: drafting goes
        on while a verdict is pending (a network link); ``draft_s`` and ``draft_prefill_s``:
        the drafter's measured seconds per drafted token and per prompt token (0: unknown)."""

    def on_submit(self, count: int) -> None:
        """The first ``count`` pending drafts were sent for verification."""

    def on_pass(self, size: int, seconds: float) -> None:
        """A pass of ``size`` tokens that the target ran without a window of this policy
        (the target decoding alone) took ``seconds``."""

    def wants_shadow(self) -> bool:
        """While the target decodes alone: should the idle edge guess each next token with
        the drafter (``on_shadow`` then reports whether the guess was right)?"""
        return False

    def on_shadow(self, confidence: float, accepted: bool) -> None:
        """A guess the drafter made while the target decoded alone: its confidence and
        whether the target produced that token."""

    def decode_alone(self, *, budget: int, behind: int) -> int:
        """Between windows, with no drafts pending: how many tokens the target should decode
        alone before the policy is asked again (0: speculate). ``budget``: tokens still to
        produce; ``behind``: tokens the drafter must evaluate before it can draft again."""
        return 0


class FixedLengthPolicy(DraftPolicy):
    """Verify after a fixed number of drafts."""

    name = "vanilla"

    def __init__(self, draft_len: int) -> None:
        if draft_len < 1:
            raise ValueError(f"draft length must be >= 1, got {draft_len}")
        self.draft_len = draft_len

    def should_verify(self, pending: int, last: DraftToken) -> bool:
        return pending >= self.draft_len


def make_policy(name: str, *, draft_len: int, thresholds: Any = None,
                task: str = "code", acceptance: Any = None) -> DraftPolicy | None:  # fmt: skip
    """The policy object for a name; None for the single-model references.

    ``thresholds``: a ``pipesd.policies.pipesd.Thresholds`` for the PipeSD family. ``task``
    (``code`` or ``math``) picks HSL's threshold. ``acceptance``: an
    ``AcceptanceModel`` that ``auto`` starts from.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    if draft_len < 1:
        raise ValueError(f"draft length must be >= 1, got {draft_len}")
    if name == "vanilla":
        return FixedLengthPolicy(draft_len)
    if name in ("hsl", "edgellm", "picospec", "specpp"):
        from pipesd.policies import baselines

        if name == "hsl":
            return baselines.HSLPolicy(baselines.task_defaults(task)["hsl_threshold"])
        if name == "edgellm":
            return baselines.EdgeLLMPolicy()
        if name == "picospec":
            return baselines.PicoSpecPolicy(draft_len)
        return baselines.SpecPPPolicy()
    if name == "auto":
        from pipesd.policies.auto import AutoPolicy

        return AutoPolicy(acceptance=acceptance)
    if name.startswith("pipesd"):
        from pipesd.policies.pipesd import make_pipesd_policy

        return make_pipesd_policy(name, thresholds=thresholds, draft_len=draft_len)
    return None
