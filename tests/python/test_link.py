"""The link emulator against plain loopback servers: delays, rates, ordering, cuts and errors.

Only lower bounds on time are asserted: an emulated link must never be faster than its
latency and rate, but a shared machine may always be slower.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipesd.errors import TransportError
from pipesd.link import (
    SCENARIOS,
    Link,
    Scenario,
    TracePoint,
    add_parser,
    load_trace,
    run,
)
from pipesd.netaddr import parse_hostport

TIMEOUT_S = 10.0


class Server:
    """A loopback TCP server running ``handler(conn)`` on a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], port: int = 0) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = threading.Event()
        self.ended = threading.Event()  # a handler returned: its connection ended
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(conn)
            self.accepted.set()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            self.ended.set()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            c.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def echo_server() -> Iterator[Server]:
    server = Server(echo)
    yield server
    server.close()


def connect(link: Link) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", link.port), timeout=TIMEOUT_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"connection ended after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def recv_until_eof(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(1 << 16):
        buf += chunk
    return bytes(buf)


def sees_end(s: socket.socket) -> bool:
    """True if the peer ended the connection (EOF or reset) within the timeout."""
    s.settimeout(TIMEOUT_S)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def scenario(
    one_way_ms: float = 1.0, up_mbps: float = 1000.0, down_mbps: float = 1000.0, jitter_ms=0.0
) -> Scenario:
    return Scenario("test", one_way_ms, up_mbps, down_mbps, jitter_ms)


# ----------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:7071", ("127.0.0.1", 7071)),
        ("cloud.example:0", ("cloud.example", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:7070", ("::1", 7070)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    ["abc", "7070", ":7070", "host:", "host:port", "host:65536", "::1:7070", "[::1]7070",
     "[nothost]:80", "host:-1", "host:70 70", " host:70", "host:７０"],
)  # fmt: skip
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--listen") as info:
        parse_hostport(text, what="--listen")
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


# ----------------------------------------------------------------------------- timing


def test_round_trip_takes_at_least_two_latencies(echo_server: Server) -> None:
    one_way_s = SCENARIOS["paper-5g"].one_way_ms / 1e3
    with Link(("127.0.0.1", echo_server.port), "paper-5g") as link, connect(link) as s:
        for i in range(3):
            msg = f"ping {i}".encode()
            t0 = time.perf_counter()
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg
            assert time.perf_counter() - t0 >= 2 * one_way_s
        stats = link.stats()
    assert stats["connections"] == 1
    for direction in ("up", "down"):
        d = stats["added_delay_ms"][direction]
        assert d["count"] == 3 and 0 <= d["median"] <= d["p99"] <= d["max"]


def test_bytes_arrive_intact_and_in_order_under_jitter(echo_server: Server) -> None:
    payload = os.urandom(3 << 20)
    jittery = scenario(one_way_ms=1.0, jitter_ms=3.0)
    with Link(("127.0.0.1", echo_server.port), jittery, seed=7) as link, connect(link) as s:

        def send() -> None:
            for off in range(0, len(payload), 50_000):  # many reads, so many jittered chunks
                s.sendall(payload[off : off + 50_000])
            s.shutdown(socket.SHUT_WR)  # the echo server answers EOF with EOF

        sender = threading.Thread(target=send)
        sender.start()
        got = recv_until_eof(s)  # returns only once the half-close came back through the link
        sender.join()
        deadline = time.monotonic() + TIMEOUT_S
        while link.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = link.stats()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    assert stats["active"] == 0  # both half-closes delivered, so the pair was closed
    assert stats["added_delay_ms"]["up"]["count"] >= len(payload) // (16 << 10)


def test_up_direction_is_metered_at_its_own_rate() -> None:
    n, got, done = 200_000, bytearray(), threading.Event()

    def sink(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            got.extend(data)
            if len(got) >= n:
                done.set()

    server = Server(sink)
    slow_up = scenario(one_way_ms=5.0, up_mbps=10.0, down_mbps=100.0)
    try:
        with Link(("127.0.0.1", server.port), slow_up) as link, connect(link) as s:
            t0 = time.perf_counter()
            s.sendall(b"u" * n)
            assert done.wait(TIMEOUT_S)
            elapsed = time.perf_counter() - t0
    finally:
        server.close()
    assert elapsed >= n * 8 / 10e6 + 0.005


def test_down_direction_is_metered_at_its_own_rate() -> None:
    n = 200_000

    def source(conn: socket.socket) -> None:
        conn.sendall(b"d" * n)
        conn.shutdown(socket.SHUT_WR)

    server = Server(source)
    slow_down = scenario(one_way_ms=5.0, up_mbps=100.0, down_mbps=10.0)
    try:
        with Link(("127.0.0.1", server.port), slow_down) as link:
            t0 = time.perf_counter()
            with connect(link) as s:
                assert len(recv_until_eof(s)) == n
            elapsed = time.perf_counter() - t0
    finally:
        server.close()
    # The source starts once the link has connected upstream, after t0: a strict lower bound.
    assert elapsed >= n * 8 / 10e6 + 0.005


def test_a_trace_sets_the_rate(echo_server: Server) -> None:
    n = 100_000
    trace = [TracePoint(0.0, 4.0, 1000.0), TracePoint(3600.0, 1000.0, 1000.0)]
    with Link(("127.0.0.1", echo_server.port), "lan", trace=trace) as link, connect(link) as s:
        assert link.rates_mbps(0.0) == (4.0, 1000.0)
        assert link.rates_mbps(3599.0) == (4.0, 1000.0)
        assert link.rates_mbps(3600.5) == (1000.0, 1000.0)
        t0 = time.perf_counter()
        s.sendall(b"t" * n)
        recv_exactly(s, n)
        elapsed = time.perf_counter() - t0
    # lan alone would move 100 kB in under a millisecond; the trace's 4 Mbit/s needs 0.2 s.
    assert elapsed >= n * 8 / 4e6


def test_dynamic_trace_is_seeded_and_within_its_ranges() -> None:
    dyn = SCENARIOS["dynamic"]
    a, b, c = dyn.trace(seed=1), dyn.trace(seed=1), dyn.trace(seed=2)
    assert a is not None and c is not None
    assert a == b and a != c
    assert a[0].time_s == 0.0 and a[-1].time_s > 3600.0
    assert all(10.0 <= p.up_mbps <= 80.0 and 150.0 <= p.down_mbps <= 280.0 for p in a)
    for rate in ("up_mbps", "down_mbps"):
        pairs = zip(a, a[1:], strict=False)
        changes = [q.time_s for p, q in pairs if getattr(p, rate) != getattr(q, rate)]
        gaps = [y - x for x, y in zip(changes, changes[1:], strict=False)]
        assert gaps and all(2.0 <= g <= 5.0 for g in gaps), rate
    assert SCENARIOS["paper-5g"].trace(seed=1) is None
    link = Link(("127.0.0.1", 9), "dynamic", seed=1)  # never started: the trace is enough
    point = a[10]
    assert link.rates_mbps(point.time_s + 1e-6) == (point.up_mbps, point.down_mbps)


def test_scenarios_match_their_descriptions() -> None:
    s = SCENARIOS
    assert (s["lan"].one_way_ms, s["lan"].up_mbps, s["lan"].down_mbps) == (0.5, 1000, 1000)
    assert (s["paper-5g"].one_way_ms, s["paper-5g"].up_mbps, s["paper-5g"].down_mbps) == (
        20, 20, 200,
    )  # fmt: skip
    assert (s["wan"].one_way_ms, s["wan"].up_mbps, s["wan"].down_mbps) == (50, 10, 50)
    assert s["dynamic"].one_way_ms == 20
    assert s["paper-5g"].summary() == "20 ms one-way, 20/200 Mbit/s up/down"
    with pytest.raises(ValueError, match="rates"):
        scenario(up_mbps=0.0)


# ----------------------------------------------------------------------------- failures


def test_cut_drops_both_sides_and_new_connections_still_work(echo_server: Server) -> None:
    with Link(("127.0.0.1", echo_server.port), "lan") as link:
        s = connect(link)
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"hello"
        assert echo_server.accepted.wait(TIMEOUT_S)
        link.cut()
        assert sees_end(s), "the client did not see the cut"
        assert echo_server.ended.wait(TIMEOUT_S), "the upstream did not see the cut"
        s.close()
        with connect(link) as s2:
            s2.sendall(b"again")
            assert recv_exactly(s2, 5) == b"again"
        assert link.stats()["connections"] == 2


def test_unreachable_upstream_closes_the_client_and_the_link_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    caplog.set_level(logging.WARNING, logger="pipesd.link")
    with Link(("127.0.0.1", port), "lan") as link:
        with connect(link) as s:
            assert sees_end(s)
        records = [r for r in caplog.records if r.name == "pipesd.link"]
        assert len(records) == 1 and f"127.0.0.1:{port}" in records[0].getMessage()
        server = Server(echo, port=port)  # now the upstream exists
        try:
            with connect(link) as s:
                s.sendall(b"back")
                assert recv_exactly(s, 4) == b"back"
        finally:
            server.close()
        assert link.stats()["connections"] == 2


def test_listening_on_a_port_in_use_is_a_transport_error() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        link = Link(("127.0.0.1", 9), "lan", listen=("127.0.0.1", port))
        with pytest.raises(TransportError, match=f"127.0.0.1:{port}.*in use") as info:
            link.start()
        assert "\n" not in str(info.value)
    finally:
        taken.close()


def test_unknown_scenario_and_bad_jitter_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown link scenario 'moon'.*paper-5g"):
        Link(("127.0.0.1", 9), "moon")
    with pytest.raises(ValueError, match="jitter"):
        Link(("127.0.0.1", 9), "lan", jitter_ms=-1.0)


# ----------------------------------------------------------------------------- traces


def test_load_trace(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("time_s,up_mbps,down_mbps\n0,20,200\n2.5,10,150\n\n")
    assert load_trace(good) == [TracePoint(0, 20, 200), TracePoint(2.5, 10, 150)]
    bad = {
        "header.csv": "t,up,down\n0,1,2\n",
        "empty.csv": "time_s,up_mbps,down_mbps\n",
        "word.csv": "time_s,up_mbps,down_mbps\n0,fast,2\n",
        "short.csv": "time_s,up_mbps,down_mbps\n0,1\n",
        "order.csv": "time_s,up_mbps,down_mbps\n1,1,2\n1,3,4\n",
        "zero.csv": "time_s,up_mbps,down_mbps\n0,0,2\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name) as info:
            load_trace(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "absent.csv")


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipesd")
    add_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_link_subcommand_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["link"])
    assert (args.listen, args.upstream, args.scenario) == (
        "127.0.0.1:7071", "127.0.0.1:7070", "paper-5g",
    )  # fmt: skip
    assert (args.seed, args.trace, args.jitter_ms) == (0, None, None)
    args = parser().parse_args(["link", "--scenario", "dynamic", "--seed", "3", "--jitter-ms",
                                "1.5", "--trace", "t.csv", "--listen", "[::1]:9"])  # fmt: skip
    assert (args.scenario, args.seed, args.jitter_ms, args.trace) == ("dynamic", 3, 1.5, "t.csv")
    with pytest.raises(SystemExit):
        parser().parse_args(["link", "--scenario", "moon"])
    capsys.readouterr()
    with pytest.raises(ValueError, match="--listen expects HOST:PORT"):
        run(parser().parse_args(["link", "--listen", "abc"]))


def test_link_command_runs_until_sigterm(echo_server: Server) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipesd.link", "--listen", "127.0.0.1:0",
         "--upstream", f"127.0.0.1:{echo_server.port}", "--scenario", "lan"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        m = re.match(r"pipesd link: 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:\d+, scenario lan \(", first)
        assert m, first
        assert "0.5 ms one-way, 1000/1000 Mbit/s up/down" in first
        with socket.create_connection(("127.0.0.1", int(m[1])), timeout=TIMEOUT_S) as s:
            s.sendall(b"via cli")
            assert recv_exactly(s, 7) == b"via cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
        rest = proc.stderr.read()
    finally:
        proc.kill()
    assert rest.startswith("pipesd link: 1 connection, 0.000 MB up") and "added delay" in rest
    assert "Traceback" not in rest
