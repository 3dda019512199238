"""The policy interface and the policies that need no network model.

A policy sees each drafted token (with its confidence) and decides whether the pending drafts
go to the target now. ``target-only`` and ``draft-only`` are references that decode with one
model alone; the decoder handles them without drafting or without verifying.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pipesd.cloud.verifier import Verdict
from pipesd.edge.drafter import DraftToken

#: Every policy name the decoder accepts, with a one-line description.
POLICIES: dict[str, str] = {
    "vanilla": "draft a fixed number of tokens, then verify and wait (stop-and-wait)",
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


class FixedLengthPolicy(DraftPolicy):
    """Verify after a fixed number of drafts."""

    name = "vanilla"

    def __init__(self, draft_len: int) -> None:
        if draft_len < 1:
            raise ValueError(f"draft length must be >= 1, got {draft_len}")
        self.draft_len = draft_len

    def should_verify(self, pending: int, last: DraftToken) -> bool:
        return pending >= self.draft_len


def make_policy(name: str, *, draft_len: int) -> DraftPolicy | None:
    """The policy object for a name; None for the single-model references."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    if name == "vanilla":
        return FixedLengthPolicy(draft_len)
    return None
