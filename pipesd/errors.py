"""The error hierarchy. Core (C++) errors and Python-side errors share one base, PipesdError.

Every error a user can cause (a missing model, a tokenizer mismatch, an over-long prompt)
is a PipesdError whose message is one clear line; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

from pipesd._core import (
    LedgerError,
    PipesdError,
    ProtocolError,
    ScheduleError,
    TransportError,
)


class ModelError(PipesdError):
    """A model name, file or download is unusable."""


class TokenizerMismatchError(PipesdError):
    """The draft and target models do not share a tokenizer."""


class PromptTooLongError(PipesdError):
    """The prompt (plus the tokens asked for) does not fit the context."""


class LinkLostError(TransportError):
    """The connection to the cloud ended; the edge may reconnect and resume."""


class RemoteError(PipesdError):
    """The cloud refused a request or failed (an ERROR frame); ``code`` names the error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"cloud error {code}: {message}")
        self.code = code


__all__ = [
    "LedgerError",
    "LinkLostError",
    "ModelError",
    "PipesdError",
    "PromptTooLongError",
    "ProtocolError",
    "RemoteError",
    "ScheduleError",
    "TokenizerMismatchError",
    "TransportError",
]
