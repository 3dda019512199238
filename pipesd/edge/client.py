"""The edge's connection to a cloud server: a VerifyLink over the PipeSD wire protocol.

Frames travel through ``pipesd._core.FrameEndpoint`` (its own I/O thread and rings); this
side waits on the endpoint's wake descriptor. When the connection drops mid-generation the
link reconnects with exponential back-off and starts the sequence again from the committed
prefix, so no token is lost or repeated; after ``reconnect_timeout`` seconds without a
connection it gives up with a TransportError.
"""

from __future__ import annotations

import collections
import logging
import select
import struct
import time
from collections.abc import Sequence

from pipesd._core import (
    PROTOCOL_VERSION,
    Draft,
    EndpointOptions,
    ErrorCode,
    Frame,
    FrameEndpoint,
    FrameType,
    Hello,
    Prefill,
    WireDist,
    decode_costs,
    decode_error,
    decode_hello_ok,
    decode_verdict,
    encode_hello,
    encode_prefill,
    make_draft_frame,
)
from pipesd.cloud.verifier import Verdict
from pipesd.errors import (
    LinkLostError,
    ProtocolError,
    RemoteError,
    TokenizerMismatchError,
    TransportError,
)
from pipesd.netaddr import parse_hostport
from pipesd.sampling import SamplingParams, SparseDist

log = logging.getLogger("pipesd.edge")

#: Round trips kept across sequences (the policies take the smallest).
RECENT_RTTS = 8
#: How long the handshake waits for the PONG that measures the first round trip.
RTT_PROBE_TIMEOUT = 2.0


class CloudLink:
    """One session with a ``pipesd cloud`` server.

    Args:
        address: ``HOST:PORT`` of the cloud (or of a link emulator in front of it).
        vocab_size, tokenizer_hash: the draft tokenizer, checked by the cloud at HELLO.
        auth_token: the cloud's shared secret, if it requires one.
        connect_timeout: seconds for one connection attempt and its HELLO exchange.
        reconnect_timeout: how long a lost connection is retried before giving up.
        reply_timeout: a verdict later than this counts as a lost connection.
        pipeline_depth: target-only requests kept outstanding (the cloud then decodes token
            after token without waiting a round trip for the next request).
    """

    def __init__(
        self,
        address: str,
        *,
        vocab_size: int,
        tokenizer_hash: str,
        auth_token: str = "",
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 30.0,
        reply_timeout: float = 300.0,
        pipeline_depth: int = 4,
    ) -> None:
        self.address = address
        self.host, self.port = parse_hostport(address, what="--cloud")
        self.vocab_size = vocab_size
        self.tokenizer_hash = tokenizer_hash
        self.auth_token = auth_token
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.reply_timeout = reply_timeout
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, got {pipeline_depth}")
        self.pipeline_depth = pipeline_depth
        self.ep: FrameEndpoint | None = None
        self.session = 0
        self.model_fingerprint = ""
        self.max_ctx = 0
        self.max_window = 0  # the cloud's limits (HELLO_OK); 0: none announced
        self.max_dist = 0
        self.verify_ms: list[float] = []  # the cloud's pass-cost table (HELLO_OK, COSTS)
        self.costs_updates = 0  # COSTS frames received
        self.params: SamplingParams | None = None
        self.reconnects = 0
        self._bytes = [0, 0]  # up, down of connections already closed
        self._rtts: list[float] = []
        # The last round trips measured on this link, kept across sequences: a sequence's
        # first decision needs the round trip before any of its own windows measured one.
        self._recent_rtts: collections.deque[float] = collections.deque(maxlen=RECENT_RTTS)
        self._pongs = 0  # PONGs received on this link, ever
        # Each sequence's ledger counts epochs from its start; on the wire they must never
        # decrease within a session (the cloud drops frames of older epochs), so every
        # sequence is shifted past the highest epoch already used.
        self._epoch_base = 0
        self._wire_epoch = 0
        self._seq_wire = 0  # the current sequence's first wire epoch
        self.connect()

    @property
    def max_inflight(self) -> int:
        return self.pipeline_depth

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Connects and says HELLO. A connection that is lost during the handshake, or a HELLO
        left unanswered, is tried again with back-off for up to ``reconnect_timeout``; a cloud
        that cannot be reached at all (TransportError) or that refuses (RemoteError) fails at
        once."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                self._connect_once()
                return
            except LinkLostError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.info("%s; trying again", e)
            time.sleep(min(delay, left))
            delay = min(2 * delay, 1.0)

    def _connect_once(self) -> None:
        """Connects and says HELLO once; raises TransportError / RemoteError on failure."""
        self._drop()
        opts = EndpointOptions(connect_timeout_ms=int(1000 * self.connect_timeout))
        try:
            ep = FrameEndpoint.connect(self.host, self.port, opts)
        except TransportError as e:
            raise TransportError(f"cannot reach the cloud at {self.address}: {e}") from None
        self.ep = ep
        hello = Hello(self.auth_token, self.vocab_size, self.tokenizer_hash)
        hello.min_version = hello.max_version = PROTOCOL_VERSION
        self._send(Frame(FrameType.HELLO, 0, 0, encode_hello(hello)))
        deadline = time.monotonic() + self.connect_timeout
        while True:
            frame = self._next_frame(deadline)
            if frame is None:
                self._drop()
                raise LinkLostError(
                    f"the cloud at {self.address} did not answer HELLO within "
                    f"{self.connect_timeout:g} s"
                )
            if frame.type == FrameType.HELLO_OK:
                ok = decode_hello_ok(frame.payload)
                self.session = ok.session
                self.model_fingerprint = ok.model_fingerprint
                self.max_ctx = ok.max_ctx
                self.max_window = ok.max_window
                self.max_dist = ok.max_dist
                self.verify_ms = list(ok.verify_ms)
                log.debug("session %d with %s (%s)", ok.session, self.address, ok.model_fingerprint)
                self._measure_rtt()
                return
            self._unexpected(frame, "HELLO_OK")

    def recover(self, committed: Sequence[int], epoch: int) -> None:
        """Reconnects with back-off and restarts the sequence from ``committed``."""
        if self.params is None:
            raise ProtocolError("recover before any sequence was started")
        deadline = time.monotonic() + self.reconnect_timeout
        delay, attempts = 0.05, 0
        last: Exception | None = None
        while True:
            attempts += 1
            try:
                self._connect_once()
                self.start(committed, self.params, epoch)
                self.reconnects += 1
                log.info("reconnected to %s after %d attempt(s)", self.address, attempts)
                return
            except (LinkLostError, TransportError) as e:
                last = e
            left = deadline - time.monotonic()
            if left <= 0:
                self._drop()
                raise TransportError(
                    f"lost the cloud at {self.address} and could not reconnect within "
                    f"{self.reconnect_timeout:g} s ({attempts} attempts): {last}"
                )
            time.sleep(min(delay, left))
            delay = min(2 * delay, 1.0)

    def close(self) -> None:
        """Ends the session politely (BYE) and closes the connection."""
        if self.ep is not None and not self.ep.closed:
            self.ep.send(Frame(FrameType.BYE, self.session, 0, b""))
            self.ep.flush(200)
        self._drop()

    def _drop(self) -> None:
        if self.ep is not None:
            st = self.ep.stats()
            self._bytes[0] += st["bytes_sent"]
            self._bytes[1] += st["bytes_received"]
            self.ep.close()
            self.ep = None

    def traffic(self) -> tuple[int, int]:
        up, down = self._bytes
        if self.ep is not None:
            st = self.ep.stats()
            up, down = up + st["bytes_sent"], down + st["bytes_received"]
        return up, down

    def probe(self) -> None:
        """Sends a PING carrying its send time; its PONG yields a round trip."""
        stamp = struct.pack("<d", time.perf_counter())
        self._send(Frame(FrameType.PING, self.session, 0, stamp))

    def take_rtts(self) -> list[float]:
        out, self._rtts = self._rtts, []
        return out

    def recent_rtts(self) -> list[float]:
        """The last round trips measured on this link (also before this sequence)."""
        return list(self._recent_rtts)

    def _measure_rtt(self) -> None:
        """One PING after the handshake, so that the round trip is known before the first
        sequence decides anything. A cloud that leaves it unanswered for
        ``RTT_PROBE_TIMEOUT`` only leaves the round trip unknown."""
        before = self._pongs
        self.probe()
        deadline = time.monotonic() + RTT_PROBE_TIMEOUT
        while self._pongs == before and time.monotonic() < deadline:
            frame = self._next_frame(min(deadline, time.monotonic() + 0.002))
            if frame is not None:
                self._unexpected(frame, "PONG")

    def pass_costs(self) -> list[float]:
        """The cloud's cost of a pass of 1, 2, ... tokens, in seconds (empty: not measured)."""
        return [v / 1000.0 for v in self.verify_ms]

    # -------------------------------------------------------------------- sequence
    @property
    def n_ctx(self) -> int:
        return self.max_ctx

    def _to_wire(self, epoch: int) -> int:
        wire = epoch + self._epoch_base
        self._wire_epoch = max(self._wire_epoch, wire)
        return wire

    def start(self, prompt: Sequence[int], params: SamplingParams, epoch: int) -> float:
        if self.ep is None or self.ep.closed:
            # The cloud ended the session while it was idle (its --idle-timeout), or the
            # connection broke between two sequences: open a new one for this sequence.
            self.connect()
        self.params = params
        self._epoch_base = self._wire_epoch + 1 - epoch
        msg = Prefill(
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=-1 if params.seed is None else params.seed,
            tokens=[int(t) for t in prompt],
        )
        self._seq_wire = self._to_wire(epoch)
        self._send(Frame(FrameType.PREFILL, self.session, self._seq_wire,
                         encode_prefill(msg)))  # fmt: skip
        return 0.0

    def send(
        self,
        epoch: int,
        start: int,
        tokens: Sequence[int],
        dists: Sequence[SparseDist] | None,
        *,
        verify: bool,
    ) -> None:
        wire: list[WireDist] = []
        if dists is not None:
            wire = [WireDist(d.ids.tolist(), d.probs.tolist()) for d in dists]
        draft = Draft(start, [int(t) for t in tokens], wire)
        self._send(make_draft_frame(self.session, self._to_wire(epoch), draft, verify))

    def wait(self, timeout: float | None) -> Verdict | None:
        """The next VERDICT; None if none came within ``timeout`` (None: the reply timeout)."""
        limit = self.reply_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            frame = self._next_frame(deadline)
            if frame is None:
                if timeout is not None:
                    return None
                self._drop()
                raise LinkLostError(f"no verdict from {self.address} within {limit:g} s")
            if frame.type == FrameType.VERDICT:
                if frame.epoch < self._seq_wire:
                    # An answer to a request of an earlier sequence that was still outstanding
                    # when it ended (target-only keeps requests ahead): not for this one.
                    continue
                v = decode_verdict(frame.payload)
                return Verdict(
                    epoch=frame.epoch - self._epoch_base,
                    start=v.start,
                    drafted=v.drafted,
                    accepted=v.accepted,
                    next_token=v.next_token,
                    verify_s=v.verify_ms / 1000.0,
                )
            self._unexpected(frame, "VERDICT")

    # --------------------------------------------------------------------- frames
    def _send(self, frame: Frame) -> None:
        ep = self.ep
        if ep is None:
            raise LinkLostError(f"not connected to {self.address}")
        deadline = time.monotonic() + self.reply_timeout
        while not ep.send(frame):  # the send ring is full: the network is the bottleneck
            if ep.closed:
                self._lost(ep)
            if time.monotonic() > deadline:
                self._drop()
                raise LinkLostError(f"the connection to {self.address} stopped draining")
            time.sleep(0.0005)

    def _next_frame(self, deadline: float) -> Frame | None:
        """The next frame, answering PINGs and skipping notices; None at the deadline."""
        ep = self.ep
        if ep is None:
            raise LinkLostError(f"not connected to {self.address}")
        while True:
            frame = ep.try_recv()
            if frame is not None:
                if frame.type == FrameType.PING:
                    ep.send(Frame(FrameType.PONG, self.session, frame.epoch, frame.payload))
                    continue
                if frame.type == FrameType.PONG:
                    if len(frame.payload) == 8:
                        rtt = time.perf_counter() - struct.unpack("<d", frame.payload)[0]
                        self._rtts.append(rtt)
                        self._recent_rtts.append(rtt)
                        self._pongs += 1
                    continue
                if frame.type == FrameType.COSTS:
                    self.verify_ms = decode_costs(frame.payload)
                    self.costs_updates += 1
                    continue
                if frame.type == FrameType.ERROR:
                    err = decode_error(frame.payload)
                    if err.code == int(ErrorCode.STALE_EPOCH.value):
                        log.debug("cloud dropped stale frames: %s", err.message)
                        continue
                    if err.code in (int(ErrorCode.TIMEOUT.value), int(ErrorCode.OVERLOADED.value)):
                        # The cloud closed the session for a limit, not for what it asked:
                        # a new connection resumes from the committed prefix.
                        self._drop()
                        raise LinkLostError(f"the cloud at {self.address} closed the session: "
                                            f"{_code_name(err.code)}: {err.message}")  # fmt: skip
                return frame
            if ep.closed:
                self._lost(ep)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            select.select([ep.wake_fd], [], [], left)
            ep.drain_wake()

    def _lost(self, ep: FrameEndpoint) -> None:
        reason = ep.error or ep.close_reason
        self._drop()
        if "unsupported protocol version" in reason:
            # Not a network fault: reconnecting cannot help.
            raise ProtocolError(
                f"the cloud at {self.address} speaks another protocol version ({reason}); "
                "run the same PipeSD release on edge and cloud"
            )
        raise LinkLostError(f"connection to the cloud at {self.address} lost: {reason}")

    def _unexpected(self, frame: Frame, wanted: str) -> None:
        if frame.type == FrameType.ERROR:
            err = decode_error(frame.payload)
            self._drop()
            name = _code_name(err.code)
            if name == "TOKENIZER_MISMATCH":
                raise TokenizerMismatchError(f"the cloud refused the draft: {err.message}")
            raise RemoteError(name, err.message)
        if frame.type == FrameType.BYE:
            self._drop()
            raise LinkLostError(f"the cloud at {self.address} ended the session")
        self._drop()
        raise ProtocolError(f"expected {wanted} from the cloud, got {frame.type.name}")


def _code_name(code: int) -> str:
    members: dict[str, ErrorCode] = getattr(ErrorCode, "__members__", {})
    for name, c in members.items():
        if int(c.value) == code:
            return name
    return f"code {code}"
