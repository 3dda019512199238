"""The cloud server: verifies drafts for many edge sessions over the PipeSD wire protocol.

One uvloop event loop accepts connections and serves every session; each connection is one
session with its own target KV cache (docs/protocol.md gives the frames and their rules).
Forward passes run on one worker thread, so the loop stays responsive while the target
computes, and sessions take turns on the model. A session that breaks the protocol gets an
ERROR frame and its connection closes; no other session notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipesd import models
from pipesd._core import (
    PROTOCOL_VERSION,
    EndpointOptions,
    ErrorCode,
    Frame,
    FrameEndpoint,
    FrameType,
    HelloOk,
    WireError,
    WireVerdict,
    decode_draft,
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
from pipesd.errors import PipesdError, PromptTooLongError, ProtocolError
from pipesd.llama_backend import LlamaCppModel, tokenizer_fingerprint
from pipesd.netaddr import parse_hostport
from pipesd.sampling import SamplingParams, SparseDist

log = logging.getLogger("pipesd.cloud")

T = TypeVar("T")


class SessionError(Exception):
    """Ends a session with an ERROR frame of ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TargetPool:
    """Target instances with their own KV caches over one set of weights (or one mmap)."""

    def __init__(
        self, path: Path, *, backend: str, device: str, n_ctx: int, threads: int | None
    ) -> None:
        self.path, self.backend, self.device = path, backend, device
        self.n_ctx, self.threads = n_ctx, threads
        self.first = load_target(path, backend=backend, device=device, n_ctx=n_ctx, threads=threads)
        self.idle: list[TargetBackend] = [self.first]

    def acquire(self) -> TargetBackend:
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
        self.idle.append(target)

    def close(self) -> None:
        for t in self.idle:
            if isinstance(t, LlamaCppModel):
                t.close()
        self.idle = []


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
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipesd-target")
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
            for s in list(self.sessions.values()):
                s.end("server shutting down", bye=True)
            await asyncio.sleep(0)
            self._compute.shutdown(wait=True)
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

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e.strerror)
                return
            peer = f"{addr[0]}:{addr[1]}"
            conn.setblocking(True)
            ep = FrameEndpoint.adopt(conn.detach(), EndpointOptions())
            session = Session(self, next(self._ids), ep, peer)
            asyncio.get_running_loop().create_task(session.run())

    def cost_table_ms(self) -> list[float]:
        """The pass-cost table as it travels: ms for passes of 1..32 tokens (empty: none)."""
        return [1000.0 * v for v in self.costs.table()]

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs a forward pass on the target's worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, fn, *args)


class Session:
    """One connection: HELLO, then sequences of PREFILL / DRAFT / RESET, then BYE."""

    def __init__(self, server: CloudServer, sid: int, ep: FrameEndpoint, peer: str) -> None:
        self.server, self.sid, self.ep, self.peer = server, sid, ep, peer
        self.target: TargetBackend | None = None
        self.seq: TargetSession | None = None
        self.greeted = False
        self.closed = False
        self.verifies = 0
        self.stale_frames = 0
        self.costs_sent: list[float] = []  # the cost table (ms) this edge was last told
        self.costs_sent_t = 0.0
        self._wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(ep.wake_fd, self._on_wake)

    def _on_wake(self) -> None:
        self.ep.drain_wake()
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self.closed:
                self._wake.clear()
                frame = self.ep.try_recv()
                if frame is None:
                    if self.ep.closed:
                        self._peer_gone()
                        break
                    await self._wake.wait()
                    continue
                await self.handle(frame)
        except SessionError as e:
            self.fail(e.code, str(e))
        except PromptTooLongError as e:
            self.fail(ErrorCode.TOO_LONG, str(e))
        except ProtocolError as e:
            self.fail(ErrorCode.BAD_FRAME, str(e))
        except Exception as e:  # a bug or a failing model: this session only
            log.exception("session %d from %s: internal error", self.sid, self.peer)
            self.fail(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            self.end(None)

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
        elif ftype == FrameType.PING:
            self.send(Frame(FrameType.PONG, self.sid, frame.epoch, frame.payload))
        elif ftype == FrameType.PONG:
            pass
        elif ftype == FrameType.BYE:
            self.end("the edge said BYE", bye=True)
        elif ftype == FrameType.ERROR:
            from pipesd._core import decode_error

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
            hello.auth_token.encode(), server.auth_token
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
        server.sessions[self.sid] = self
        self.target = await server.compute(server.pool.acquire)
        self.greeted = True
        self.costs_sent = server.cost_table_ms()
        ok = HelloOk(self.sid, server.fingerprint, server.n_ctx, self.costs_sent)
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
        verdict = await self.server.compute(lambda: seq.prefill(msg.tokens, epoch=frame.epoch))
        self._send_verdict(verdict)

    async def _draft(self, frame: Frame) -> None:
        from pipesd._core import FLAG_HAS_DIST, FLAG_VERIFY

        if self.seq is None:
            raise ProtocolError("DRAFT before PREFILL")
        msg = decode_draft(frame.payload, bool(frame.flags & FLAG_HAS_DIST))
        if msg.tokens and max(msg.tokens) >= self.server.vocab_size:
            raise ProtocolError(f"DRAFT: token id {max(msg.tokens)} is outside the vocabulary")
        dists = None
        if frame.flags & FLAG_HAS_DIST:
            dists = [
                SparseDist(np.asarray(d.ids, dtype=np.int64), np.asarray(d.probs, dtype=np.float64))
                for d in msg.dists
            ]
        seq = self.seq
        if not seq.receive(frame.epoch, msg.start, msg.tokens, dists):
            self._stale(frame, len(msg.tokens))
            return
        if frame.flags & FLAG_VERIFY:
            end = msg.start + len(msg.tokens)
            verdict = await self.server.compute(seq.verify_window, end)
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

    def _stale(self, frame: Frame, tokens: int) -> None:
        """Frames of a retired epoch are normal while speculation moves on: drop, tell, go on."""
        self.stale_frames += 1
        assert self.seq is not None
        msg = (
            f"dropped {frame.type.name} of epoch {frame.epoch} ({tokens} tokens): the session "
            f"is at epoch {self.seq.epoch}" + (" (retired)" if self.seq.retired else "")
        )
        log.info("session %d from %s: %s", self.sid, self.peer, msg)
        self.send(Frame(FrameType.ERROR, self.sid, frame.epoch,
                        encode_error(WireError(ErrorCode.STALE_EPOCH, msg))))  # fmt: skip

    # --------------------------------------------------------------- frames out
    def send(self, frame: Frame) -> None:
        deadline = time.monotonic() + 5.0
        while not self.ep.send(frame):
            if self.ep.closed or time.monotonic() > deadline:
                raise SessionError(ErrorCode.INTERNAL, "the edge stopped reading")
            time.sleep(0.001)

    def fail(self, code: ErrorCode, message: str) -> None:
        """Sends a fatal ERROR, logs one line, closes this connection only."""
        log.warning("session %d from %s: %s: %s; connection closed", self.sid, self.peer,
                    code.name, message)  # fmt: skip
        if not self.ep.closed:
            with contextlib.suppress(SessionError):
                self.send(Frame(FrameType.ERROR, self.sid if self.greeted else 0, 0,
                                encode_error(WireError(code, message[:1000]))))  # fmt: skip
            self.ep.flush(500)
        self.end(None)

    def _peer_gone(self) -> None:
        reason = self.ep.close_reason
        if reason == "PROTOCOL_ERROR":
            # The endpoint has already answered the malformed bytes with an ERROR frame.
            log.warning("session %d from %s: %s; connection closed", self.sid, self.peer,
                        self.ep.error)  # fmt: skip
        else:
            log.info("session %d from %s: connection closed (%s)", self.sid, self.peer,
                     self.ep.error or reason)  # fmt: skip

    def end(self, why: str | None, *, bye: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        if bye and not self.ep.closed:
            self.ep.send(Frame(FrameType.BYE, self.sid, 0, b""))
            self.ep.flush(500)
        if why:
            log.info("session %d from %s: %s after %d verifications", self.sid, self.peer, why,
                     self.verifies)  # fmt: skip
        self.loop.remove_reader(self.ep.wake_fd)
        self.ep.close()
        self.server.sessions.pop(self.sid, None)
        if self.target is not None:
            self.server.pool.release(self.target)
            self.target = None


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
