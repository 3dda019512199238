"""Decoding policies: when the edge stops drafting and asks the target to verify."""

from pipesd.policies.base import POLICIES, DraftPolicy, FixedLengthPolicy, make_policy

__all__ = ["POLICIES", "DraftPolicy", "FixedLengthPolicy", "make_policy"]
