"""The cloud server: verifies drafts for many edge sessions over the PipeSD wire protocol.

One uvloop event loop accepts connections and serves every session; each connection is one
session with its own target KV cache (docs/protocol.md gives the frames and their rules).
Forward passes run on one worker thread, so the loop stays responsive while the target
computes, and sessions take turns on the model. A session that breaks the protocol gets an
ERROR frame and its connection closes; no other session notices.

Nothing a client sends can make the server hold unbounded memory or stall the loop: every
connection's rings are bounded in frames and bytes and all of them share one byte budget
(``ServerLimits``); nothing on the loop blocks (a client that stops reading is closed, an
ending connection flushes in its own I/O thread); connections that do not say HELLO in time,
sessions idle too long, and connections beyond the cap of those waiting for HELLO are closed;
windows, pending drafts and draft distributions are capped, and the caps are announced in
HELLO_OK. README "Limits" lists each limit and its option.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import itertools
import logging
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipesd import models
from pipesd._core import (
    FLAG_HAS_DIST,
    FLAG_VERIFY,
    PROTOCOL_VERSION,
    ByteBudget,
    EndpointOptions,
    ErrorCode,
    Frame,
    FrameEndpoint,
    FrameType,
    HelloOk,
    WireError,
    WireVerdict,
    decode_draft,
    decode_error,
    decode_hello,
    decode_prefill,
    encode_costs,
    encode_error,
    encode_hello_ok,
    encode_verdict,
)
from pipesd.cloud.targets import TorchTarget, load_target, pick_backend
from pipesd.cloud.verifier import TargetBackend, TargetSession, Verdict
from pipesd.costs import PassCostCurve, cached_calibration, tables_differ
from pipesd.errors import PipesdError, PromptTooLongError, ProtocolError, TransportError
from pipesd.llama_backend import LlamaCppModel, tokenizer_fingerprint
from pipesd.netaddr import parse_hostport
from pipesd.sampling import SamplingParams, SparseDist

log = logging.getLogger("pipesd.cloud")

T = TypeVar("T")

#: Frames a session reads ahead of the one it handles, to see whether the edge has already
#: started its next sequence (bounded: a flood stays in the endpoint's own ring).
READ_AHEAD = 64


class SessionError(Exception):
    """Ends a session with an ERROR frame of ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerGone(Exception):
    """The edge closed the connection; what it asked for is dropped."""


MiB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    """What one client may cost the server. README "Limits" documents each and its option.

    max_window: drafts one verification may cover (announced in HELLO_OK; the edge keeps its
        windows within it); a session may hold at most twice as many drafts not yet verified.
    max_dist: entries in one draft distribution (announced; the edge samples its drafts from
        distributions cut to that many entries, which keeps sampling exact).
    hello_timeout: seconds a new connection has to complete HELLO.
    idle_timeout: seconds a session may send nothing while the cloud owes it nothing.
    max_pending: connections not yet past HELLO; one more closes the oldest of them.
    memory: bytes queued in all connections' rings together; past it the server stops reading
        until sessions catch up (TCP then pushes back on the edges).
    conn_send_bytes / conn_recv_bytes: bytes queued for / from one connection; a client whose
        unread replies exceed conn_send_bytes is closed.
    """

    max_window: int = 64
    max_dist: int = 4096
    hello_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_pending: int = 64
    memory: int = 256 * MiB
    conn_send_bytes: int = 1 * MiB
    conn_recv_bytes: int = 8 * MiB

    def __post_init__(self) -> None:
        for name in ("max_window", "max_dist", "max_pending", "memory", "conn_send_bytes",
                     "conn_recv_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("hello_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")

    def max_payload(self, n_ctx: int) -> int:
        """The largest frame payload an edge needs: a full window with its distributions, or a
        prompt filling the context (with room for the fixed fields)."""
        window = 12 + self.max_window * (4 + 4 + 8 * self.max_dist)
        return max(64 * 1024, window, 24 + 4 * n_ctx) + 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TargetPool:
    """Target instances with their own KV caches over one set of weights (or one mmap).

    Thread-safe: contexts are opened on the server's opener thread while the worker thread
    runs passes and returns released contexts.
    """

    def __init__(
        self, path: Path, *, backend: str, device: str, n_ctx: int, threads: int | None
    ) -> None:
        self.path, self.backend, self.device = path, backend, device
        self.n_ctx, self.threads = n_ctx, threads
        self.first = load_target(path, backend=backend, device=device, n_ctx=n_ctx, threads=threads)
        self.idle: list[TargetBackend] = [self.first]
        self._lock = threading.Lock()

    def acquire(self) -> TargetBackend:
        with self._lock:
            if self.idle:
                return self.idle.pop()
        if isinstance(self.first, TorchTarget):
            return self.first.fork()
        return load_target(
            self.path, backend=self.backend, device=self.device, n_ctx=self.n_ctx,
            threads=self.threads,
        )  # fmt: skip

    def release(self, target: TargetBackend) -> None:
        target.truncate(0)
        with self._lock:
            self.idle.append(target)

    def close(self) -> None:
        with self._lock:
            idle, self.idle = self.idle, []
        for t in idle:
            if isinstance(t, LlamaCppModel):
                t.close()


class CloudServer:
    """``pipesd cloud``: loads the target once and serves sessions until stopped.

    Args:
        target: a registry name, GGUF path or Hugging Face directory.
        listen: ``HOST:PORT``; port 0 picks a free port (see ``port`` once started).
        auth_token: the shared secret every HELLO must carry; required off loopback.
        max_sessions: sessions served at once; one more is refused with BUSY.
    """

    def __init__(
        self,
        target: str = models.DEFAULT_TARGET,
        *,
        backend: str = "auto",
        device: str = "cpu",
        n_ctx: int = 4096,
        threads: int | None = 1,
        listen: str = "127.0.0.1:7070",
        auth_token: str | None = None,
        max_sessions: int = 8,
        calibrate: bool = True,
        limits: ServerLimits | None = None,
    ) -> None:
        self.host, self.port = parse_hostport(listen, what="--listen")
        if not is_loopback(self.host) and not auth_token:
            raise ValueError(
                f"listening on {self.host} (not loopback) needs an auth token: "
                "pass --auth-token-file"
            )
        if max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {max_sessions}")
        self._sock = self._listen()  # a busy port is reported before the model loads
        try:
            self._load(target, backend, device, n_ctx, threads)
            self.costs = PassCostCurve()
            if calibrate:
                self.costs.set_prior(
                    cached_calibration(
                        self.pool.first, self.vocab_size, path=models.resolve(target),
                        backend=self.backend, device=device, threads=threads,
                    )
                )  # fmt: skip
        except BaseException:
            self._sock.close()
            raise
        self.auth_token = auth_token.encode() if auth_token else None
        self.max_sessions = max_sessions
        self.limits = limits or ServerLimits()
        self.budget = ByteBudget(self.limits.memory)
        self.max_payload = self.limits.max_payload(n_ctx)
        self.sessions: dict[int, Session] = {}
        self.waiting_hello: OrderedDict[int, Session] = OrderedDict()
        self._accept_backoff = 0.0  # seconds; > 0 while accepting is paused (out of fds)
        self._ids = itertools.count(1)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipesd-target")
        # Opening a target context takes a while (a model load for llama.cpp): it runs on its
        # own thread, so a new session does not wait behind every queued pass, nor they on it.
        self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipesd-open")
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _load(self, target: str, backend: str, device: str, n_ctx: int,
              threads: int | None) -> None:  # fmt: skip
        from pipesd.api import token_texts_of  # the tokenizer check shared with local mode

        self.target_name = target
        path = models.resolve(target)
        self.backend = pick_backend(backend, device, path)
        texts = token_texts_of(path)
        self.vocab_size = len(texts)
        self.tokenizer_hash = tokenizer_fingerprint(texts)
        self.pool = TargetPool(path, backend=self.backend, device=device, n_ctx=n_ctx,
                               threads=threads)  # fmt: skip
        self.fingerprint = f"{path.name}:{self.backend}:{device}:{self.tokenizer_hash[:16]}"
        self.n_ctx = n_ctx

    # ------------------------------------------------------------------- running
    def run(self, ready: Callable[[CloudServer], None] | None = None) -> None:
        """Serves on a uvloop event loop until SIGINT/SIGTERM or ``stop()``."""
        import uvloop

        uvloop.run(self.serve(ready))

    async def serve(self, ready: Callable[[CloudServer], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        sock = self._sock
        self.port = sock.getsockname()[1]
        loop.add_reader(sock.fileno(), self._accept, sock)
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Only possible in the main thread; a server embedded in another thread is stopped
            # with stop() instead.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._stop.set)
        if ready is not None:
            ready(self)
        try:
            await self._stop.wait()
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
            for s in list(self.sessions.values()) + list(self.waiting_hello.values()):
                s.end("server shutting down", bye=True)
            await asyncio.sleep(0)
            self._opener.shutdown(wait=True)
            self._compute.shutdown(wait=True)
            for s in list(Session.lingering):
                s._finish()
            self.pool.close()

    def stop(self) -> None:
        """Stops ``serve`` (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def _listen(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)  # fmt: skip
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve listen address {self.host}: {e}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            sock.close()
            raise PipesdError(f"cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def endpoint_options(self) -> EndpointOptions:
        lim = self.limits
        return EndpointOptions(
            send_ring=256, recv_ring=256, max_payload=self.max_payload,
            send_bytes=lim.conn_send_bytes, recv_bytes=lim.conn_recv_bytes,
            shared_budget=self.budget,
        )  # fmt: skip

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(sock, e.strerror or str(e))
                else:
                    log.warning("accept failed: %s", e.strerror)
                return
            peer = f"{addr[0]}:{addr[1]}"
            conn.setblocking(True)
            try:
                ep = FrameEndpoint.adopt(conn.detach(), self.endpoint_options())
            except TransportError as e:  # no descriptor or thread left for it: it is closed
                self._pause_accept(sock, str(e), peer=peer)
                return
            self._accept_backoff = 0.0
            if len(self.waiting_hello) >= self.limits.max_pending:
                oldest = next(iter(self.waiting_hello.values()))
                oldest.fail(
                    ErrorCode.OVERLOADED,
                    f"{len(self.waiting_hello)} connections are waiting for HELLO (the limit, "
                    "--max-pending); closed the oldest",
                )
            session = Session(self, next(self._ids), ep, peer)
            self.waiting_hello[session.sid] = session
            asyncio.get_running_loop().create_task(session.run())

    def _pause_accept(self, sock: socket.socket, why: str, *, peer: str = "") -> None:
        """Out of descriptors (or threads): stop accepting for a while instead of spinning."""
        loop = asyncio.get_running_loop()
        backoff = min(2 * self._accept_backoff, 1.0) if self._accept_backoff else 0.05
        if self._accept_backoff == 0.0:
            log.warning("cannot accept %s: %s; pausing new connections", peer or "a connection",
                        why)  # fmt: skip
        self._accept_backoff = backoff
        loop.remove_reader(sock.fileno())

        def resume() -> None:
            if self._stop is not None and not self._stop.is_set():
                loop.add_reader(sock.fileno(), self._accept, sock)
                self._accept(sock)

        loop.call_later(backoff, resume)

    def release_target(self, target: TargetBackend) -> None:
        """Returns a session's target to the pool, on the worker thread: a forward pass of
        that session may still be running there, and must finish before the cache is reset."""
        try:
            self._compute.submit(self.pool.release, target)
        except RuntimeError:  # the worker is shut down: nothing runs on the target any more
            self.pool.release(target)

    def cost_table_ms(self) -> list[float]:
        """The pass-cost table as it travels: ms for passes of 1, 2, ... tokens, 0 for a size
        not measured (empty: none)."""
        return [1000.0 * v for v in self.costs.estimates()]

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a forward pass on the target's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, fn, *args)

    async def open_target(self) -> TargetBackend:
        """A target context for a new session: an idle one, or one opened on the opener
        thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._opener, self.pool.acquire)

    def hello_ok(self, sid: int, costs: list[float]) -> HelloOk:
        lim = self.limits
        return HelloOk(sid, self.fingerprint, self.n_ctx, costs, max_window=lim.max_window,
                       max_dist=lim.max_dist)  # fmt: skip


class Session:
    """One connection: HELLO, then sequences of PREFILL / DRAFT / RESET, then BYE.

    Nothing here blocks the loop. Replies that do not fit the connection's send ring mean the
    edge stopped reading: the connection is closed. An ending connection writes its last
    frames (ERROR, BYE) from its own I/O thread (``close_after_flush``) and is closed for good
    once that is done (``lingering`` keeps it until then).
    """

    #: Ended sessions whose connection is still writing its last frames.
    lingering: set[Session] = set()

    def __init__(self, server: CloudServer, sid: int, ep: FrameEndpoint, peer: str) -> None:
        self.server, self.sid, self.ep, self.peer = server, sid, ep, peer
        self.target: TargetBackend | None = None
        self.seq: TargetSession | None = None
        self.greeted = False
        self.closed = False
        self.busy = False  # a forward pass of this session is queued or running
        self.work = ""  # what that pass is (PREFILL, verification, HELLO)
        self.work_started = False  # it is running (set on the worker thread)
        self.verifies = 0
        self.stale_frames = 0
        self.costs_sent: list[float] = []  # the cost table (ms) this edge was last told
        self.costs_sent_t = 0.0
        self._inbox: deque[Frame] = deque()  # frames read ahead, handled in order
        self._wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(ep.wake_fd, self._on_wake)
        self._timer = self.loop.call_later(server.limits.hello_timeout, self._hello_expired)

    def _on_wake(self) -> None:
        self.ep.drain_wake()
        if self.closed:
            if self.ep.closed:
                self._finish()
            return
        if self.busy and self.ep.closed:
            # The edge hung up while a pass of its own (or its context) is on the way: the
            # session ends now, not when that work is done, so it no longer counts against
            # --max-sessions and its target goes back to the pool right after that pass.
            started = self.work_started
            self._peer_gone(f"the {self.work} under way is discarded" if started
                            else f"dropped its queued {self.work}")  # fmt: skip
            self.end(None)
            return
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self.closed:
                self._wake.clear()
                frame = self._inbox.popleft() if self._inbox else self.ep.try_recv()
                if frame is None:
                    if self.ep.closed:
                        self._peer_gone()
                        break
                    await self._wake.wait()
                    continue
                if self.greeted:
                    self._arm_idle()
                await self.handle(frame)
                # One frame per turn: a client that floods cheap frames (PINGs) must not keep
                # the loop from every other session.
                await asyncio.sleep(0)
        except PeerGone as e:
            if not self.closed:
                self._peer_gone(str(e))
        except SessionError as e:
            if not self.closed:
                self.fail(e.code, str(e))
        except PromptTooLongError as e:
            if not self.closed:
                self.fail(ErrorCode.TOO_LONG, str(e))
        except ProtocolError as e:
            if not self.closed:
                self.fail(ErrorCode.BAD_FRAME, str(e))
        except Exception as e:  # a bug or a failing model: this session only
            if not self.closed:
                log.exception("session %d from %s: internal error", self.sid, self.peer)
                self.fail(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            self.end(None)

    # ------------------------------------------------------------------- timers
    def _hello_expired(self) -> None:
        if not self.greeted and not self.closed:
            self.fail(ErrorCode.TIMEOUT, f"no HELLO within {self.server.limits.hello_timeout:g} s")

    def _arm_idle(self) -> None:
        self._timer.cancel()
        self._timer = self.loop.call_later(self.server.limits.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.closed:
            return
        if self.busy:  # the cloud owes it an answer: not idle
            self._arm_idle()
            return
        self.fail(ErrorCode.TIMEOUT,
                  f"idle for {self.server.limits.idle_timeout:g} s (--idle-timeout)")  # fmt: skip

    async def _compute(self, what: str, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the worker thread unless the edge has hung up by the time its turn
        comes (then the work is dropped)."""

        def guarded() -> T:
            if self.closed or self.ep.closed:
                raise PeerGone(f"dropped its queued {what}")
            self.work_started = True
            return fn()

        self.busy, self.work, self.work_started = True, what, False
        try:
            return await self.server.compute(guarded)
        finally:
            self.busy = False

    # ---------------------------------------------------------------- frames in
    async def handle(self, frame: Frame) -> None:
        ftype = frame.type
        if not self.greeted:
            if frame.session != 0 and ftype != FrameType.HELLO:
                raise SessionError(
                    ErrorCode.UNKNOWN_SESSION,
                    f"{ftype.name} names session {frame.session}, which this connection has "
                    "not opened (say HELLO first)",
                )
            if ftype != FrameType.HELLO:
                raise SessionError(ErrorCode.BAD_FRAME, f"expected HELLO first, got {ftype.name}")
            if frame.session != 0:
                raise SessionError(
                    ErrorCode.UNKNOWN_SESSION, f"HELLO names session {frame.session}, expected 0"
                )
            self._timer.cancel()  # HELLO came in time; acquiring a target may queue a while
            await self._hello(frame)
            return
        if frame.session != self.sid:
            raise SessionError(
                ErrorCode.UNKNOWN_SESSION,
                f"{ftype.name} names session {frame.session}; this connection is session "
                f"{self.sid}",
            )
        if ftype == FrameType.PREFILL:
            await self._prefill(frame)
        elif ftype == FrameType.DRAFT:
            await self._draft(frame)
        elif ftype == FrameType.RESET:
            if frame.payload:
                raise ProtocolError(f"RESET carries {len(frame.payload)} payload bytes")
            if self.seq is not None and not self.seq.reset(frame.epoch):
                self._stale(frame, 0)
        elif ftype == FrameType.PING:  # its payload is at most MAX_PING_PAYLOAD bytes
            self.send(Frame(FrameType.PONG, self.sid, frame.epoch, frame.payload))
        elif ftype == FrameType.PONG:
            pass
        elif ftype == FrameType.BYE:
            self.end("the edge said BYE", bye=True)
        elif ftype == FrameType.ERROR:
            err = decode_error(frame.payload)
            log.info("session %d from %s: the edge reported error %d: %s", self.sid, self.peer,
                     err.code, err.message)  # fmt: skip
            self.end("the edge reported an error")
        else:
            raise SessionError(ErrorCode.BAD_FRAME, f"{ftype.name} is not a frame the edge sends")

    async def _hello(self, frame: Frame) -> None:
        server = self.server
        hello = decode_hello(frame.payload)
        if not hello.min_version <= PROTOCOL_VERSION <= hello.max_version:
            raise SessionError(
                ErrorCode.BAD_VERSION,
                f"the edge speaks protocol versions {hello.min_version}..{hello.max_version}, "
                f"this cloud speaks {PROTOCOL_VERSION}",
            )
        if server.auth_token is not None and not hmac.compare_digest(
            hello.auth_token, server.auth_token
        ):
            raise SessionError(ErrorCode.AUTH_FAILED, "wrong or missing auth token")
        if hello.vocab_size != server.vocab_size or hello.tokenizer_hash != server.tokenizer_hash:
            raise SessionError(
                ErrorCode.TOKENIZER_MISMATCH,
                f"the draft's tokenizer ({hello.vocab_size} tokens, hash "
                f"{hello.tokenizer_hash[:12] or '-'}) differs from the target's "
                f"({server.vocab_size} tokens, hash {server.tokenizer_hash[:12]})",
            )
        if len(server.sessions) >= server.max_sessions:
            raise SessionError(
                ErrorCode.BUSY, f"the cloud serves {server.max_sessions} sessions already"
            )
        server.waiting_hello.pop(self.sid, None)
        server.sessions[self.sid] = self
        self.busy, self.work, self.work_started = True, "context opening", True
        try:
            target = await server.open_target()
        except (OSError, RuntimeError, ValueError, PipesdError) as e:
            # Out of descriptors or memory for another target context: a capacity limit.
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise SessionError(
                ErrorCode.BUSY, f"cannot open a target context for another session: {why}"
            ) from None
        finally:
            self.busy = False
        if self.closed:  # the edge left while its context was opening
            server.release_target(target)
            raise PeerGone("its target context was returned")
        self.target = target
        self.greeted = True
        self._arm_idle()
        self.costs_sent = server.cost_table_ms()
        ok = server.hello_ok(self.sid, self.costs_sent)
        self.send(Frame(FrameType.HELLO_OK, self.sid, 0, encode_hello_ok(ok)))
        log.info("session %d from %s: started", self.sid, self.peer)

    async def _prefill(self, frame: Frame) -> None:
        assert self.target is not None
        msg = decode_prefill(frame.payload)
        try:
            params = SamplingParams(
                temperature=msg.temperature,
                top_k=msg.top_k,
                top_p=msg.top_p,
                seed=None if msg.seed < 0 else msg.seed,
            )
        except ValueError as e:
            raise ProtocolError(f"PREFILL: {e}") from None
        if not msg.tokens:
            raise ProtocolError("PREFILL carries no tokens")
        if max(msg.tokens) >= self.server.vocab_size:
            raise ProtocolError(f"PREFILL: token id {max(msg.tokens)} is outside the vocabulary")
        if self.seq is not None and frame.epoch < self.seq.epoch:
            self._stale(frame, len(msg.tokens))
            return
        self.seq = TargetSession(self.target, params)
        seq = self.seq
        verdict = await self._compute("PREFILL", lambda: seq.prefill(msg.tokens, epoch=frame.epoch))
        self._send_verdict(verdict)

    async def _draft(self, frame: Frame) -> None:
        if self.seq is None:
            raise ProtocolError("DRAFT before PREFILL")
        lim = self.server.limits
        has_dist = bool(frame.flags & FLAG_HAS_DIST)
        msg = decode_draft(frame.payload, has_dist)
        vocab = self.server.vocab_size
        if msg.tokens and max(msg.tokens) >= vocab:
            raise ProtocolError(f"DRAFT: token id {max(msg.tokens)} is outside the vocabulary")
        dists = None
        if has_dist:
            dists = []
            for d in msg.dists:
                ids = d.ids_array()
                if ids.size > lim.max_dist:
                    raise ProtocolError(
                        f"DRAFT: a draft distribution of {ids.size} entries exceeds this "
                        f"cloud's limit of {lim.max_dist} (--max-dist)"
                    )
                if ids.size and int(ids.max()) >= vocab:
                    raise ProtocolError(
                        f"DRAFT: distribution id {int(ids.max())} is outside the vocabulary"
                    )
                dists.append(SparseDist(ids.astype(np.int64), d.probs_array().astype(np.float64)))
        seq = self.seq
        if len(msg.tokens) > 2 * lim.max_window:
            raise ProtocolError(
                f"DRAFT: {len(msg.tokens)} drafts in one frame; this cloud holds at most "
                f"{2 * lim.max_window} unverified drafts (twice --max-window)"
            )
        if not seq.receive(frame.epoch, msg.start, msg.tokens, dists):
            self._stale(frame, len(msg.tokens))
            return
        if seq.ledger.pending_count > 2 * lim.max_window:
            raise ProtocolError(
                f"DRAFT: {seq.ledger.pending_count} drafts wait for verification; this cloud "
                f"holds at most {2 * lim.max_window} (twice --max-window)"
            )
        if frame.flags & FLAG_VERIFY:
            if self._next_sequence_waits(frame.epoch):
                # The edge has moved on to its next sequence (this one ended, at an end of
                # sequence, with requests for further tokens still out): the pass would
                # only delay the next prompt's first token.
                self._stale(frame, len(msg.tokens), "the edge has started its next sequence")
                return
            end = msg.start + len(msg.tokens)
            count = end - seq.ledger.committed_len
            if count > lim.max_window:
                raise ProtocolError(
                    f"DRAFT: a verification of {count} drafts exceeds this cloud's window "
                    f"limit of {lim.max_window} (--max-window)"
                )
            verdict = await self._compute("verification", lambda: seq.verify_window(end))
            self.verifies += 1
            self.server.costs.observe(verdict.drafted + 1, verdict.verify_s)
            self._send_verdict(verdict)
            self._maybe_send_costs()

    def _maybe_send_costs(self) -> None:
        """Tells the edge the cost table again when an estimate moved (at most once a second)."""
        now = time.monotonic()
        if now - self.costs_sent_t < 1.0:
            return
        table = self.server.cost_table_ms()
        if tables_differ(self.costs_sent, table):
            self.send(Frame(FrameType.COSTS, self.sid, 0, encode_costs(table)))
            self.costs_sent, self.costs_sent_t = table, now

    def _send_verdict(self, verdict: Verdict) -> None:
        wire = WireVerdict(
            verdict.start, verdict.drafted, verdict.accepted, verdict.next_token,
            1000.0 * verdict.verify_s,
        )  # fmt: skip
        self.send(Frame(FrameType.VERDICT, self.sid, verdict.epoch, encode_verdict(wire)))

    def _next_sequence_waits(self, epoch: int) -> bool:
        """Whether a PREFILL of a later epoch (the edge's next sequence) has already come."""
        while len(self._inbox) < READ_AHEAD:
            frame = self.ep.try_recv()
            if frame is None:
                break
            self._inbox.append(frame)
        return any(f.type == FrameType.PREFILL and f.epoch > epoch for f in self._inbox)

    def _stale(self, frame: Frame, tokens: int, why: str = "") -> None:
        """Frames of a retired epoch are normal while speculation moves on: drop, tell, go on."""
        self.stale_frames += 1
        assert self.seq is not None
        why = why or f"the session is at epoch {self.seq.epoch}" + (
            " (retired)" if self.seq.retired else ""
        )
        msg = f"dropped {frame.type.name} of epoch {frame.epoch} ({tokens} tokens): {why}"
        log.info("session %d from %s: %s", self.sid, self.peer, msg)
        self.send(Frame(FrameType.ERROR, self.sid, frame.epoch,
                        encode_error(WireError(ErrorCode.STALE_EPOCH, msg))))  # fmt: skip

    # --------------------------------------------------------------- frames out
    def send(self, frame: Frame) -> None:
        """Queues a frame without waiting; an edge that does not read its replies is closed."""
        if self.ep.send(frame):
            return
        if self.ep.closed:
            raise PeerGone("its reply was dropped")
        raise SessionError(
            ErrorCode.OVERLOADED,
            f"the edge stopped reading ({self.ep.send_queued_bytes} bytes of replies unread)",
        )

    def fail(self, code: ErrorCode, message: str) -> None:
        """Sends a fatal ERROR, logs one line, closes this connection only."""
        log.warning("session %d from %s: %s: %s; connection closed", self.sid, self.peer,
                    code.name, message)  # fmt: skip
        if not self.ep.closed:
            # Best effort: a full ring (the edge not reading) only loses this notice.
            self.ep.send(Frame(FrameType.ERROR, self.sid if self.greeted else 0, 0,
                               encode_error(WireError(code, message[:1000]))))  # fmt: skip
        self.end(None, flush=True)

    def _peer_gone(self, what: str = "") -> None:
        reason = self.ep.close_reason
        if reason == "PROTOCOL_ERROR":
            # The endpoint has already answered the malformed bytes with an ERROR frame.
            log.warning("session %d from %s: %s; connection closed", self.sid, self.peer,
                        self.ep.error)  # fmt: skip
        else:
            log.info("session %d from %s: the edge closed the connection (%s)%s", self.sid,
                     self.peer, self.ep.error or reason.lower(),
                     f"; {what}" if what else "")  # fmt: skip

    def end(self, why: str | None, *, bye: bool = False, flush: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self._wake.set()
        if bye and not self.ep.closed:
            self.ep.send(Frame(FrameType.BYE, self.sid, 0, b""))
            flush = True
        if why:
            log.info("session %d from %s: %s after %d verifications", self.sid, self.peer, why,
                     self.verifies)  # fmt: skip
        self.server.sessions.pop(self.sid, None)
        self.server.waiting_hello.pop(self.sid, None)
        if self.target is not None:
            self.server.release_target(self.target)
            self.target = None
        if flush and not self.ep.closed:
            # The I/O thread writes what is queued (500 ms at most), then closes; the wake fd
            # tells _on_wake when to let go of the endpoint.
            Session.lingering.add(self)
            self.ep.close_after_flush(500)
            if self.ep.closed:
                self._finish()
        else:
            self._finish()

    def _finish(self) -> None:
        Session.lingering.discard(self)
        self.loop.remove_reader(self.ep.wake_fd)
        self.ep.close()


def serve_forever(server: CloudServer) -> int:
    """The ``pipesd cloud`` command's main loop."""

    def ready(s: CloudServer) -> None:
        auth = "auth token required" if s.auth_token else "no auth (loopback only)"
        print(
            f"pipesd cloud: listening on {s.host}:{s.port} (target {s.target_name} on "
            f"{s.backend}, context {s.n_ctx}, up to {s.max_sessions} sessions, {auth})",
            file=sys.stderr,
            flush=True,
        )

    server.run(ready)
    print("pipesd cloud: stopped", file=sys.stderr, flush=True)
    return 0
