"""PipeSD: cloud-edge speculative decoding whose output is exactly the target model's."""

from pipesd._core import SpeculationLedger, VerdictDecision, VerifyWindow
from pipesd.api import Generator, TokenStream
from pipesd.decoding import GenerationResult, GenerationStats, TokenEvent
from pipesd.errors import (
    LedgerError,
    ModelError,
    PipesdError,
    PromptTooLongError,
    ProtocolError,
    ScheduleError,
    TokenizerMismatchError,
    TransportError,
)
from pipesd.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "LedgerError",
    "ModelError",
    "PipesdError",
    "PromptTooLongError",
    "ProtocolError",
    "SamplingParams",
    "ScheduleError",
    "SpeculationLedger",
    "TokenEvent",
    "TokenStream",
    "TokenizerMismatchError",
    "TransportError",
    "VerdictDecision",
    "VerifyWindow",
    "__version__",
]
