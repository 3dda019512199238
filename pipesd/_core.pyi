"""Type stubs for the compiled core, pipesd._core."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

class PipesdError(RuntimeError): ...
class LedgerError(PipesdError): ...
class ProtocolError(PipesdError): ...
class TransportError(PipesdError): ...
class ScheduleError(PipesdError): ...

class VerifyWindow:
    """Drafts submitted for one verification: positions [start, start + count)."""

    @property
    def epoch(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def count(self) -> int: ...

class VerdictDecision:
    """What a verdict means for both sides; lengths are absolute token positions."""

    @property
    def stale(self) -> bool: ...
    @property
    def accepted(self) -> int: ...
    @property
    def next_token(self) -> int: ...
    @property
    def bonus(self) -> bool: ...
    @property
    def committed_len(self) -> int: ...
    @property
    def draft_keep(self) -> int: ...
    @property
    def target_keep(self) -> int: ...
    @property
    def discarded(self) -> int: ...
    @property
    def kept_beyond(self) -> int: ...
    @property
    def rolled_back(self) -> bool: ...
    @property
    def epoch(self) -> int: ...

class SpeculationLedger:
    """Committed prefix, pending drafts, epochs and rollback decisions for one sequence."""

    def __init__(self, max_len: int) -> None: ...
    def begin(self, prompt: list[int]) -> None: ...
    def append_drafts(self, drafts: list[int]) -> int: ...
    def mark_sent(self, n: int) -> None: ...
    def submit(self, count: int) -> VerifyWindow: ...
    def apply_verdict(self, epoch: int, accepted: int, next_token: int) -> VerdictDecision: ...
    def commit_drafts(self, n: int) -> None: ...
    def discard_drafts(self) -> int: ...
    def note_draft_kv(self, length: int) -> None: ...
    def note_target_kv(self, length: int) -> None: ...
    @property
    def max_len(self) -> int: ...
    @property
    def committed_len(self) -> int: ...
    @property
    def pending_count(self) -> int: ...
    @property
    def sent_count(self) -> int: ...
    @property
    def unsent_count(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def in_flight(self) -> bool: ...
    @property
    def window(self) -> VerifyWindow: ...
    @property
    def draft_kv(self) -> int: ...
    @property
    def target_kv(self) -> int: ...
    @property
    def last_token(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    def committed(self) -> list[int]: ...
    def pending(self) -> list[int]: ...
    def tokens_from(self, start: int) -> list[int]: ...

# ----------------------------------------------------------------- wire format (docs/protocol.md)

PROTOCOL_VERSION: int
DEFAULT_MAX_PAYLOAD: int
MAX_PING_PAYLOAD: int
FLAG_VERIFY: int
FLAG_HAS_DIST: int

class FrameType:
    HELLO: FrameType
    HELLO_OK: FrameType
    PREFILL: FrameType
    DRAFT: FrameType
    VERDICT: FrameType
    RESET: FrameType
    BYE: FrameType
    ERROR: FrameType
    PING: FrameType
    PONG: FrameType
    COSTS: FrameType
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class ErrorCode:
    BAD_FRAME: ErrorCode
    BAD_VERSION: ErrorCode
    AUTH_FAILED: ErrorCode
    TOKENIZER_MISMATCH: ErrorCode
    UNKNOWN_SESSION: ErrorCode
    STALE_EPOCH: ErrorCode
    TOO_LONG: ErrorCode
    INTERNAL: ErrorCode
    BUSY: ErrorCode
    TIMEOUT: ErrorCode
    OVERLOADED: ErrorCode
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class Frame:
    def __init__(
        self,
        type: FrameType,
        session: int = 0,
        epoch: int = 0,
        payload: bytes = b"",
        flags: int = 0,
    ) -> None: ...
    @property
    def type(self) -> FrameType: ...
    @property
    def flags(self) -> int: ...
    @property
    def session(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def payload(self) -> bytes: ...
    def encode(self) -> bytes: ...

class FrameParser:
    def __init__(self, max_payload: int = ...) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def next(self) -> Frame | None: ...
    @property
    def buffered(self) -> int: ...

class Hello:
    #: Opaque bytes on the wire; read back as bytes (set from str or bytes).
    @property
    def auth_token(self) -> bytes: ...
    @auth_token.setter
    def auth_token(self, value: str | bytes) -> None: ...
    vocab_size: int
    tokenizer_hash: str
    min_version: int
    max_version: int
    def __init__(
        self, auth_token: str | bytes = "", vocab_size: int = 0, tokenizer_hash: str = ""
    ) -> None: ...

class HelloOk:
    session: int
    model_fingerprint: str
    max_ctx: int
    #: The most drafts one verification may cover (0: no limit announced).
    max_window: int
    #: The most entries one draft distribution may have (0: no limit announced).
    max_dist: int
    #: The cloud's cost of one verification pass by size: [i] is a pass of i + 1 tokens, in ms.
    verify_ms: list[float]
    def __init__(
        self,
        session: int = 0,
        model_fingerprint: str = "",
        max_ctx: int = 0,
        verify_ms: list[float] = ...,
        max_window: int = 0,
        max_dist: int = 0,
    ) -> None: ...

class Prefill:
    tokens: list[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(
        self,
        tokens: list[int] = ...,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = -1,
    ) -> None: ...

class WireDist:
    ids: list[int]
    probs: list[float]
    def __init__(self, ids: list[int], probs: list[float]) -> None: ...
    def ids_array(self) -> npt.NDArray[np.int32]: ...
    def probs_array(self) -> npt.NDArray[np.float32]: ...

class Draft:
    start: int
    tokens: list[int]
    dists: list[WireDist]
    def __init__(
        self, start: int = 0, tokens: list[int] = ..., dists: list[WireDist] = ...
    ) -> None: ...

class WireVerdict:
    start: int
    drafted: int
    accepted: int
    next_token: int
    verify_ms: float
    def __init__(
        self,
        start: int = 0,
        drafted: int = 0,
        accepted: int = 0,
        next_token: int = 0,
        verify_ms: float = 0.0,
    ) -> None: ...

class WireError:
    code: int
    message: str
    def __init__(self, code: ErrorCode, message: str) -> None: ...

def encode_hello(x: Hello) -> bytes: ...
def decode_hello(payload: bytes) -> Hello: ...
def encode_hello_ok(x: HelloOk) -> bytes: ...
def decode_hello_ok(payload: bytes) -> HelloOk: ...
def encode_prefill(x: Prefill) -> bytes: ...
def decode_prefill(payload: bytes) -> Prefill: ...
def encode_draft(x: Draft) -> bytes: ...
def decode_draft(payload: bytes, has_dist: bool) -> Draft: ...
def make_draft_frame(session: int, epoch: int, draft: Draft, verify: bool) -> Frame: ...
def encode_verdict(x: WireVerdict) -> bytes: ...
def decode_verdict(payload: bytes) -> WireVerdict: ...
def encode_costs(verify_ms: list[float]) -> bytes: ...
def decode_costs(payload: bytes) -> list[float]: ...
def encode_error(x: WireError) -> bytes: ...
def decode_error(payload: bytes) -> WireError: ...

class ByteBudget:
    """Bytes that the rings of many endpoints may hold together."""

    def __init__(self, limit: int) -> None: ...
    @property
    def used(self) -> int: ...
    @property
    def limit(self) -> int: ...

class EndpointOptions:
    send_ring: int
    recv_ring: int
    max_payload: int
    connect_timeout_ms: int
    #: Bytes queued in each ring at most (an empty ring takes any one frame).
    send_bytes: int
    recv_bytes: int
    shared_budget: ByteBudget | None
    def __init__(
        self,
        send_ring: int = 1024,
        recv_ring: int = 1024,
        max_payload: int = ...,
        connect_timeout_ms: int = 5000,
        send_bytes: int = ...,
        recv_bytes: int = ...,
        shared_budget: ByteBudget | None = None,
    ) -> None: ...

class FrameEndpoint:
    """A TCP connection carrying frames, served by its own I/O thread."""

    @staticmethod
    def connect(host: str, port: int, options: EndpointOptions = ...) -> FrameEndpoint: ...
    @staticmethod
    def adopt(fd: int, options: EndpointOptions = ...) -> FrameEndpoint: ...
    def send(self, frame: Frame) -> bool: ...
    def try_recv(self) -> Frame | None: ...
    @property
    def wake_fd(self) -> int: ...
    def drain_wake(self) -> None: ...
    def flush(self, timeout_ms: int) -> bool: ...
    def close_after_flush(self, timeout_ms: int) -> None:
        """Stops reading, sends what is queued (at most timeout_ms), then closes; no wait."""
    @property
    def send_queued_bytes(self) -> int: ...
    @property
    def recv_queued_bytes(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def close_reason(self) -> str: ...
    @property
    def error(self) -> str: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

class FrameListener:
    """A listening TCP socket that yields endpoints."""

    @staticmethod
    def listen(host: str, port: int, backlog: int = 16) -> FrameListener: ...
    @property
    def port(self) -> int: ...
    @property
    def fd(self) -> int: ...
    def accept(
        self, options: EndpointOptions = ..., timeout_ms: int = 0
    ) -> FrameEndpoint | None: ...

# -------------------------------------------------- batch scheduler (PipeSD DP, arXiv 2605.13319)

MAX_SCHEDULE_TOKENS: int
"""The largest window the solvers accept (65536 tokens)."""

class BatchPlan:
    """Where to cut a window of draft tokens into batches, and when the last batch is through.

    Cost model: token j (1-based) is drafted at ready(j); a batch of b tokens occupies the link
    for alpha + beta * b; a batch leaves once its last token is drafted and the link is free
    (free at time 0). Among equal makespans (relative tolerance 1e-12) the solver prefers the
    fewest batches, then the largest last batch; every boundary of the plan is reached as early
    as any batching of that prefix could reach it.
    """

    @property
    def batch_ends(self) -> list[int]:
        """Cumulative token counts at the end of each batch; the last is the window size."""
    @property
    def makespan(self) -> float:
        """When the last batch has crossed the link, in the units of alpha, beta and ready."""
    @property
    def batch_sizes(self) -> list[int]:
        """Tokens in each batch."""
    @property
    def num_batches(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...

def solve_batch_schedule(alpha: float, beta: float, ready: Sequence[float]) -> BatchPlan:
    """The optimal batching of a window whose token j finishes drafting at ready[j-1].

    alpha (per-batch send cost) and beta (per-token send cost) must be finite and >= 0; ready
    must hold 1 to MAX_SCHEDULE_TOKENS finite, non-negative, non-decreasing times. Raises
    ScheduleError otherwise. O(n^2) at worst; the GIL is released while it runs.
    """

def solve_batch_schedule_constant(alpha: float, beta: float, gamma: float, n: int) -> BatchPlan:
    """The optimal batching of n tokens drafted at a constant gamma per token (ready(j) = gamma*j).

    Same result as solve_batch_schedule with those ready times. Raises ScheduleError for a
    negative or non-finite cost, or n outside 1..MAX_SCHEDULE_TOKENS.
    """

def plan_makespan(
    alpha: float, beta: float, ready: Sequence[float], batch_ends: Sequence[int]
) -> float:
    """Simulates a given batching under the same cost model and returns its makespan.

    batch_ends must be strictly increasing, start above 0 and end at len(ready). For a plan a
    solver returned with the same arguments this equals plan.makespan exactly.
    """
