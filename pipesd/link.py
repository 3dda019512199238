"""A network link emulator in user space: a TCP proxy that delays and rate-limits each direction.

The kernel of the test machine has no netem, so the edge-cloud link is emulated here. A
:class:`Link` listens on an address; for every client connection it connects to the upstream
and relays bytes both ways. "up" is client -> upstream (edge -> cloud), "down" the reverse.

Each direction has a one-way latency, a rate and optional jitter. Bytes are metered: a chunk of
n bytes occupies its direction for ``n * 8 / rate`` seconds after the chunks before it, so a
busy direction delays later chunks, and is delivered one latency after its last byte leaves
(plus jitter, clipped at 0, never reordering bytes). The rate may follow a trace, piecewise
constant over the time since the link started. The rates are shared by all connections through
one link, as on one physical link.

Timing runs on threads (one reader and one writer per direction per connection) so that it has
``time.sleep`` precision rather than an event loop's timer granularity. Every chunk's send time
minus its scheduled delivery time, the delay the emulator adds beyond the emulated one, is
recorded and reported by :meth:`Link.stats`. Not emulated: the TCP handshake (the upstream
connection is made when a client connects, without delay) and packet loss.

Command line: ``pipesd link --scenario paper-5g --listen 127.0.0.1:7071 --upstream
127.0.0.1:7070`` puts the link between an edge and a cloud process.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import ctypes
import dataclasses
import errno
import functools
import logging
import math
import random
import signal
import socket
import struct
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import numpy as np

from pipesd.errors import PipesdError, TransportError
from pipesd.netaddr import parse_hostport

log = logging.getLogger("pipesd.link")

CHUNK_BYTES = 16 * 1024  # larger reads are metered and delivered in pieces of this size
RECV_BYTES = 64 * 1024
QUEUE_BYTES = 4 * 1024 * 1024  # per direction per connection; past it the reader stops reading
POLL_S = 0.2  # the longest a blocked socket call waits before it looks for an abort
CONNECT_TIMEOUT_S = 5.0
DYNAMIC_TRACE_S = 6 * 3600.0  # a generated trace covers this much; its last rates hold after
_STATS_RESERVOIR = 1_000_000  # delay samples kept for the median and p99 (count, max: exact)


@dataclass(frozen=True)
class TracePoint:
    """From ``time_s`` seconds after the link started, each direction runs at these rates."""

    time_s: float
    up_mbps: float
    down_mbps: float


@dataclass(frozen=True)
class Scenario:
    """A named link: latency and rates per direction; a dynamic one draws its rates from ranges.

    A dynamic scenario's trace is piecewise constant: each direction keeps a rate drawn
    uniformly from its range for a segment of ``segment_s[0]..segment_s[1]`` seconds, on its own
    segment boundaries. ``up_mbps`` and ``down_mbps`` are then the ranges' midpoints.
    """

    name: str
    one_way_ms: float
    up_mbps: float
    down_mbps: float
    jitter_ms: float = 0.0
    description: str = ""
    up_range_mbps: tuple[float, float] | None = None
    down_range_mbps: tuple[float, float] | None = None
    segment_s: tuple[float, float] = (2.0, 5.0)

    def __post_init__(self) -> None:
        if not (self.one_way_ms >= 0 and self.jitter_ms >= 0):
            raise ValueError(f"scenario {self.name!r}: latency and jitter must be >= 0 ms")
        ranges = (*(self.up_range_mbps or ()), *(self.down_range_mbps or ()))
        for rate in (self.up_mbps, self.down_mbps, *ranges):
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"scenario {self.name!r}: rates must be > 0 Mbit/s, got {rate}")
        if (self.up_range_mbps is None) != (self.down_range_mbps is None):
            raise ValueError(f"scenario {self.name!r}: give both rate ranges or neither")
        if not 0 < self.segment_s[0] <= self.segment_s[1]:
            raise ValueError(f"scenario {self.name!r}: bad segment lengths {self.segment_s}")

    @property
    def dynamic(self) -> bool:
        return self.up_range_mbps is not None

    def trace(self, seed: int = 0, duration_s: float = DYNAMIC_TRACE_S) -> list[TracePoint] | None:
        """The rate trace of a dynamic scenario (same seed, same trace); None if static."""
        if self.up_range_mbps is None or self.down_range_mbps is None:
            return None
        rng = np.random.default_rng(seed)
        up_t, up_r = _segments(rng, self.up_range_mbps, self.segment_s, duration_s)
        down_t, down_r = _segments(rng, self.down_range_mbps, self.segment_s, duration_s)
        times = np.union1d(up_t, down_t)
        ups = up_r[np.searchsorted(up_t, times, side="right") - 1]
        downs = down_r[np.searchsorted(down_t, times, side="right") - 1]
        return [
            TracePoint(float(t), round(float(u), 3), round(float(d), 3))
            for t, u, d in zip(times, ups, downs, strict=True)
        ]

    def summary(self) -> str:
        """``"20 ms one-way, 20/200 Mbit/s up/down"``."""
        if self.up_range_mbps is not None and self.down_range_mbps is not None:
            up = "-".join(f"{r:g}" for r in self.up_range_mbps)
            down = "-".join(f"{r:g}" for r in self.down_range_mbps)
        else:
            up, down = f"{self.up_mbps:g}", f"{self.down_mbps:g}"
        jitter = f", jitter {self.jitter_ms:g} ms" if self.jitter_ms else ""
        return f"{self.one_way_ms:g} ms one-way, {up}/{down} Mbit/s up/down{jitter}"


def _segments(
    rng: np.random.Generator,
    rate_range: tuple[float, float],
    segment_s: tuple[float, float],
    duration_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Start times (from 0) and rates of piecewise-constant segments covering duration_s."""
    n = int(duration_s / segment_s[0]) + 2  # enough segments even if every one is the shortest
    starts = np.concatenate(([0.0], np.cumsum(rng.uniform(*segment_s, size=n - 1))))
    rates = rng.uniform(*rate_range, size=n)
    keep = starts < max(duration_s, 1e-9)
    return starts[keep], rates[keep]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="lan", one_way_ms=0.5, up_mbps=1000.0, down_mbps=1000.0,
            description="wired LAN: 0.5 ms one-way, 1000 Mbit/s each way",
        ),
        Scenario(
            name="paper-5g", one_way_ms=20.0, up_mbps=20.0, down_mbps=200.0,
            description="the PipeSD paper's 5G link: 20 ms one-way, 20 up / 200 down Mbit/s",
        ),
        Scenario(
            name="wan", one_way_ms=50.0, up_mbps=10.0, down_mbps=50.0,
            description="a long-haul WAN: 50 ms one-way, 10 up / 50 down Mbit/s",
        ),
        Scenario(
            name="dynamic", one_way_ms=20.0, up_mbps=45.0, down_mbps=215.0,
            up_range_mbps=(10.0, 80.0), down_range_mbps=(150.0, 280.0), segment_s=(2.0, 5.0),
            description="a fluctuating 5G link: 20 ms one-way, 10-80 up / 150-280 down Mbit/s, "
            "each changing every 2-5 s along a trace drawn from --seed",
        ),
    )
}  # fmt: skip


def load_trace(path: str | Path) -> list[TracePoint]:
    """A rate trace from a CSV file with header ``time_s,up_mbps,down_mbps``.

    Each row's rates hold from its time on; times must increase and rates be > 0.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read trace {path}: {getattr(e, 'strerror', None) or e}") from e
    rows = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), 1) if row]
    header = [c.strip() for c in rows[0][1]] if rows else []
    if header != ["time_s", "up_mbps", "down_mbps"]:
        raise ValueError(f"trace {path}: the first line must be time_s,up_mbps,down_mbps")
    points: list[TracePoint] = []
    for n, row in rows[1:]:
        try:
            t, up, down = (float(c) for c in row)
        except ValueError:
            raise ValueError(
                f"trace {path} line {n}: expected three numbers, got {','.join(row)!r}"
            ) from None
        if not all(math.isfinite(x) for x in (t, up, down)) or t < 0 or up <= 0 or down <= 0:
            raise ValueError(f"trace {path} line {n}: need time_s >= 0 and rates > 0")
        if points and t <= points[-1].time_s:
            raise ValueError(f"trace {path} line {n}: time_s {t:g} does not increase")
        points.append(TracePoint(t, up, down))
    if not points:
        raise ValueError(f"trace {path}: no rows after the header")
    return points


class _RateSchedule:
    """A piecewise-constant rate over link time (seconds since the link started)."""

    def __init__(self, times_s: Sequence[float], rates_mbps: Sequence[float]) -> None:
        self.times_s = list(times_s)
        self.rates_bps = [r * 1e6 for r in rates_mbps]

    def rate_bps(self, at_s: float) -> float:
        return self.rates_bps[max(0, bisect.bisect_right(self.times_s, at_s) - 1)]

    def finish_s(self, start_s: float, nbytes: int) -> float:
        """When the last of nbytes leaves, if the first starts at start_s."""
        i = max(0, bisect.bisect_right(self.times_s, start_s) - 1)
        bits, t = nbytes * 8.0, start_s
        while True:
            rate = self.rates_bps[i]
            end = self.times_s[i + 1] if i + 1 < len(self.times_s) else math.inf
            if t + bits / rate <= end:
                return t + bits / rate
            bits -= (end - t) * rate
            t, i = end, i + 1


class _DelayStats:
    """Added delays in seconds: exact count and max; median and p99 over a uniform reservoir."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._samples = array("d")
        self._count = 0
        self._max = 0.0
        self._rng = random.Random(seed)

    def add(self, delay_s: float) -> None:
        with self._lock:
            self._count += 1
            self._max = max(self._max, delay_s)
            if len(self._samples) < _STATS_RESERVOIR:
                self._samples.append(delay_s)
            else:  # reservoir sampling keeps every chunk equally likely to be in the sample
                j = self._rng.randrange(self._count)
                if j < _STATS_RESERVOIR:
                    self._samples[j] = delay_s

    def summary_ms(self) -> dict[str, float]:
        with self._lock:
            x = np.frombuffer(self._samples, dtype=np.float64).copy()
            count, worst = self._count, self._max
        if not count:
            return {"median": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
        return {
            "median": 1e3 * float(np.median(x)),
            "p99": 1e3 * float(np.percentile(x, 99)),
            "max": 1e3 * worst,
            "count": count,
        }


class _Direction:
    """One direction of the link, shared by its connections: rate, latency, jitter, stats."""

    def __init__(
        self, name: str, one_way_s: float, jitter_s: float, rates: _RateSchedule, seed: int
    ) -> None:
        self.name = name
        self.one_way_s = one_way_s
        self.jitter_s = jitter_s
        self.rates = rates
        self.t0 = 0.0  # perf_counter() when the link started; link time is relative to it
        self._lock = threading.Lock()
        self._busy_until = 0.0  # perf_counter() seconds when the last metered byte leaves
        self._rng = random.Random(seed)
        self.delays = _DelayStats(seed + 1)
        self.bytes = 0

    def deliver_at(self, received: float, nbytes: int) -> float:
        """perf_counter() time at which a chunk read at ``received`` reaches the other side."""
        with self._lock:
            start = max(received, self._busy_until)
            self._busy_until = self.rates.finish_s(start - self.t0, nbytes) + self.t0
            jitter = max(0.0, self._rng.gauss(0.0, self.jitter_s)) if self.jitter_s else 0.0
            return self._busy_until + self.one_way_s + jitter

    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _tighten_timer_slack() -> None:
    # Linux lets a sleeping thread wake up to 50 us late by default (timer slack), batching
    # wake-ups to save power; a writer thread asks for 1 us so its sleeps end on time.
    libc = _libc()
    if sys.platform == "linux" and libc is not None:
        ulong = ctypes.c_ulong
        libc.prctl(29, ulong(1000), ulong(0), ulong(0), ulong(0))  # PR_SET_TIMERSLACK, in ns


class _Aborted(Exception):
    pass


class _Stream:
    """One direction of one connection: reads src, delays, writes dst."""

    def __init__(
        self, conn: _Connection, direction: _Direction, src: socket.socket, dst: socket.socket
    ) -> None:
        self.conn = conn
        self.direction = direction
        self.src = src
        self.dst = dst
        self.cond = threading.Condition()
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (deliver at, bytes or EOF)
        self.queued_bytes = 0
        self.last_due = 0.0

    def _put(self, due: float, data: bytes | None) -> None:
        due = max(due, self.last_due)  # jitter never reorders bytes
        self.last_due = due
        with self.cond:
            self.queue.append((due, data))
            self.queued_bytes += len(data) if data else 0
            self.cond.notify_all()

    def read_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.queued_bytes > QUEUE_BYTES and not self.conn.aborted:
                        self.cond.wait(POLL_S)
                if self.conn.aborted:
                    return
                try:
                    data = self.src.recv(RECV_BYTES)
                except TimeoutError:
                    continue
                now = time.perf_counter()
                if self.conn.aborted:
                    return
                if not data:  # the half-close follows the bytes before it, one latency later
                    self._put(now + self.direction.one_way_s, None)
                    return
                for off in range(0, len(data), CHUNK_BYTES):
                    piece = data[off : off + CHUNK_BYTES]
                    self._put(self.direction.deliver_at(now, len(piece)), piece)
        except OSError as e:
            self.conn.abort(f"{self.direction.name} read: {e}")
        finally:
            self.conn.thread_done()

    def write_loop(self) -> None:
        _tighten_timer_slack()
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.conn.aborted:
                        self.cond.wait(POLL_S)
                    if self.conn.aborted:
                        return
                    due, data = self.queue.popleft()
                    self.queued_bytes -= len(data) if data else 0
                    self.cond.notify_all()
                while (wait := due - time.perf_counter()) > 0:
                    if self.conn.aborted:
                        return
                    time.sleep(min(wait, POLL_S))
                if data is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.direction.delays.add(time.perf_counter() - due)
                self._send_all(data)
                self.direction.count_bytes(len(data))
        except _Aborted:
            pass
        except OSError as e:
            self.conn.abort(f"{self.direction.name} write: {e}")
        finally:
            self.conn.thread_done()

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.dst.send(view) :]
            except TimeoutError:
                if self.conn.aborted:
                    raise _Aborted from None


class _Connection:
    """A client connection and its upstream connection, relayed by four threads.

    The sockets are closed by whichever thread finishes last, so no thread ever uses a closed
    (and possibly reused) descriptor.
    """

    def __init__(self, link: Link, client: socket.socket, peer: Any) -> None:
        self.link = link
        self.client = client
        self.peer = peer
        self.upstream: socket.socket | None = None
        self.streams: list[_Stream] = []
        self.threads: list[threading.Thread] = []
        self.aborted = False
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._alive = 1  # the serving thread

    def serve(self) -> None:
        """Connect upstream, start the other three threads and read the client."""
        link = self.link
        upstream: socket.socket | None = None
        try:
            upstream = socket.create_connection(link.upstream, timeout=CONNECT_TIMEOUT_S)
            _configure(upstream)
        except OSError as e:
            if upstream is not None:
                upstream.close()
            log.warning(
                "upstream %s unreachable (%s); closed the client connection from %s",
                _format_address(link.upstream),
                e.strerror or e,
                _format_address(self.peer),
            )
            self.thread_done()
            return
        with self._lock:
            self.upstream = upstream
            aborted = self.aborted
        if aborted:  # cut() came while connecting: reset the upstream connection too
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.thread_done()
            return
        up = _Stream(self, link._up, self.client, upstream)
        down = _Stream(self, link._down, upstream, self.client)
        self.streams = [up, down]
        with self._lock:
            self._alive += 3
        workers = [
            ("up-write", up.write_loop),
            ("down-read", down.read_loop),
            ("down-write", down.write_loop),
        ]
        for name, target in workers:
            t = threading.Thread(target=target, name=f"pipesd-link-{name}", daemon=True)
            self.threads.append(t)
            t.start()
        up.read_loop()

    def abort(self, reason: str) -> None:
        """Drop the connection: both peers get a reset (SO_LINGER 0) once every thread is out."""
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
            socks = [s for s in (self.client, self.upstream) if s is not None]
        log.debug("connection from %s aborted: %s", _format_address(self.peer), reason)
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes a thread blocked in recv at once
            except OSError:
                pass
        for stream in self.streams:
            with stream.cond:
                stream.cond.notify_all()

    def thread_done(self) -> None:
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
        if last:
            for s in (self.client, self.upstream):
                if s is not None:
                    s.close()
            self.finished.set()
            self.link._forget(self)


def _configure(s: socket.socket) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(POLL_S)


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class Link:
    """A TCP proxy emulating a network link between its clients and ``upstream``.

    ``scenario`` is a name from :data:`SCENARIOS` or a :class:`Scenario`. ``trace`` replaces
    its rates (before the trace's first point the scenario's rates hold); a dynamic scenario
    without one draws its trace from ``seed``. ``jitter_ms`` replaces the scenario's jitter.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        scenario: str | Scenario,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 0,
        trace: list[TracePoint] | None = None,
        jitter_ms: float | None = None,
    ) -> None:
        if isinstance(scenario, str):
            if scenario not in SCENARIOS:
                raise ValueError(
                    f"unknown link scenario {scenario!r}; known: {', '.join(SCENARIOS)}"
                )
            scenario = SCENARIOS[scenario]
        jitter = scenario.jitter_ms if jitter_ms is None else jitter_ms
        if not (math.isfinite(jitter) and jitter >= 0):
            raise ValueError(f"jitter must be >= 0 ms, got {jitter_ms}")
        self.scenario = scenario
        self.upstream = upstream
        self.listen = listen
        self.seed = seed
        self.trace = trace if trace is not None else scenario.trace(seed)
        self.jitter_ms = jitter
        points = list(self.trace or [])
        if not points or points[0].time_s > 0:
            points.insert(0, TracePoint(0.0, scenario.up_mbps, scenario.down_mbps))
        times = [p.time_s for p in points]
        if any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError("trace times must increase")
        for p in points:
            if not all(math.isfinite(r) and r > 0 for r in (p.up_mbps, p.down_mbps)):
                raise ValueError(f"trace rates must be > 0 Mbit/s, got {p}")
        one_way_s, jitter_s = scenario.one_way_ms / 1e3, jitter / 1e3
        up_rates = _RateSchedule(times, [p.up_mbps for p in points])
        down_rates = _RateSchedule(times, [p.down_mbps for p in points])
        self._up = _Direction("up", one_way_s, jitter_s, up_rates, seed=4 * seed + 1)
        self._down = _Direction("down", one_way_s, jitter_s, down_rates, seed=4 * seed + 3)
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._accepted = 0
        self._closing = False
        self._t0 = 0.0

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> Link:
        """Bind the listening socket and start serving; raises TransportError if it cannot."""
        if self._listener is not None:
            return self
        host, port = self.listen
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            listener = socket.create_server((host, port), family=family, backlog=64)
        except OSError as e:
            why = (
                "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            )
            raise TransportError(
                f"link cannot listen on {_format_address(self.listen)}: {why}"
            ) from None
        listener.settimeout(POLL_S)
        self._listener = listener
        self._address = listener.getsockname()[:2]
        self._t0 = time.perf_counter()
        self._up.t0 = self._down.t0 = self._t0
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="pipesd-link-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, drop every connection and join every thread."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        self._drop_all()

    def cut(self) -> None:
        """Drop every current connection, both sides at once; new connections are still served."""
        self._drop_all()

    def _drop_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort("cut")
        for c in conns:
            c.finished.wait(CONNECT_TIMEOUT_S + 2 * POLL_S)
            for t in c.threads:
                t.join(2 * POLL_S)

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------- queries

    @property
    def address(self) -> tuple[str, int]:
        """The address clients connect to (the bound port, if ``listen`` asked for port 0)."""
        if self._address is None:
            raise RuntimeError("the link is not started; call start() first")
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    def elapsed_s(self) -> float:
        """Link time: seconds since start(), the clock the rate trace runs on."""
        return time.perf_counter() - self._t0 if self._listener is not None else 0.0

    def rates_mbps(self, at_s: float | None = None) -> tuple[float, float]:
        """(up, down) rates at link time ``at_s`` (default: now)."""
        t = self.elapsed_s() if at_s is None else at_s
        return self._up.rates.rate_bps(t) / 1e6, self._down.rates.rate_bps(t) / 1e6

    def stats(self) -> dict[str, Any]:
        """Connections accepted, bytes delivered each way, and the emulator's added delay.

        ``added_delay_ms[direction]`` summarises, over every chunk delivered, its actual send
        time minus its scheduled delivery time: median, p99 and max in ms, and the count.
        """
        with self._lock:
            accepted, active = self._accepted, len(self._conns)
        return {
            "connections": accepted,
            "active": active,
            "bytes_up": self._up.bytes,
            "bytes_down": self._down.bytes,
            "added_delay_ms": {
                "up": self._up.delays.summary_ms(),
                "down": self._down.delays.summary_ms(),
            },
        }

    # ------------------------------------------------------------------------- serving

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._closing:
                    return
                log.warning("accept failed: %s", e.strerror or e)
                time.sleep(0.1)  # e.g. out of descriptors: do not spin
                continue
            try:
                _configure(client)
            except OSError:  # the client is already gone
                client.close()
                continue
            conn = _Connection(self, client, peer)
            with self._lock:
                if self._closing:
                    client.close()
                    return
                self._accepted += 1
                self._conns.add(conn)
            t = threading.Thread(target=conn.serve, name="pipesd-link-up-read", daemon=True)
            conn.threads.append(t)
            t.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)


# ----------------------------------------------------------------------------- command line


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:7071", metavar="HOST:PORT",
                   help="where edge clients connect (default 127.0.0.1:7071)")  # fmt: skip
    p.add_argument("--upstream", default="127.0.0.1:7070", metavar="HOST:PORT",
                   help="the cloud server (default 127.0.0.1:7070)")  # fmt: skip
    scenarios = "; ".join(f"{s.name}: {s.description}" for s in SCENARIOS.values())
    p.add_argument("--scenario", choices=list(SCENARIOS), default="paper-5g", help=scenarios)
    p.add_argument("--seed", type=int, default=0, help="seed of the dynamic trace and the jitter")
    p.add_argument("--trace", metavar="CSV", default=None,
                   help="rates from a CSV file time_s,up_mbps,down_mbps (replaces the "
                   "scenario's rates)")  # fmt: skip
    p.add_argument("--jitter-ms", type=float, default=None,
                   help="jitter sigma in ms, normal clipped at 0 (default: scenario)")  # fmt: skip


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``link`` subcommand to the ``pipesd`` command line."""
    p = sub.add_parser(
        "link",
        help="emulate a network link between an edge and a cloud process",
        description="Relay TCP connections from --listen to --upstream through an emulated "
        "link (latency, rate, jitter, rate trace) until interrupted; then print one line of "
        "statistics.",
    )
    _add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Serve the link until SIGINT or SIGTERM; one line on stderr at start and one at the end."""
    listen = parse_hostport(args.listen, what="--listen")
    upstream = parse_hostport(args.upstream, what="--upstream")
    trace = load_trace(args.trace) if args.trace else None
    link = Link(
        upstream,
        args.scenario,
        listen=listen,
        seed=args.seed,
        trace=trace,
        jitter_ms=args.jitter_ms,
    )
    scenario = link.scenario
    desc = scenario.summary()
    if trace is not None:
        desc = f"{scenario.one_way_ms:g} ms one-way, rates from {args.trace}"
        if link.jitter_ms:
            desc += f", jitter {link.jitter_ms:g} ms"
    elif args.jitter_ms is not None:
        desc = dataclasses.replace(scenario, jitter_ms=link.jitter_ms).summary()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with link.start():
            route = f"{_format_address(link.address)} -> {_format_address(upstream)}"
            print(f"pipesd link: {route}, scenario {scenario.name} ({desc})", file=sys.stderr)
            sys.stderr.flush()
            while not stop.wait(0.5):
                pass
            stats = link.stats()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"pipesd link: {stats_summary(stats)}", file=sys.stderr, flush=True)
    return 0


def stats_summary(stats: dict[str, Any]) -> str:
    """One line from :meth:`Link.stats`."""
    n = stats["connections"]
    delays = []
    for name in ("up", "down"):
        d = stats["added_delay_ms"][name]
        delays.append(
            f"{name} {d['median']:.3f}/{d['p99']:.3f}/{d['max']:.3f} ms ({d['count']} chunks)"
        )
    return (
        f"{n} connection{'' if n == 1 else 's'}, {stats['bytes_up'] / 1e6:.3f} MB up, "
        f"{stats['bytes_down'] / 1e6:.3f} MB down; added delay median/p99/max " + ", ".join(delays)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipesd.link``: the ``pipesd link`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="python -m pipesd.link", description=__doc__)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (PipesdError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pipesd: error: {msg}", file=sys.stderr)
        return 2


__all__ = [
    "SCENARIOS",
    "Link",
    "Scenario",
    "TracePoint",
    "add_parser",
    "load_trace",
    "run",
    "stats_summary",
]

if __name__ == "__main__":
    sys.exit(main())
