"""Transport timings: round trips and frame rate over loopback, and the link emulator's precision.

The client side runs in this process pinned to core 0, every server in another process pinned
to core 1. Round-trip figures are the median over --repeats repeats (each of --rounds round
trips after a warm-up) of each repeat's median and p99.

  rtt          a 40-byte message echoed back: a PING frame with an 8-byte payload echoed as a
               PONG through pipesd._core.FrameEndpoint (the client waits on wake_fd with poll,
               then try_recv), versus a blocking-socket ping-pong of 40 bytes in Python
               (sendall/recv) and in C++ (bench/pingpong.cc, built with c++ -O2)
  frames/s     DRAFT-sized frames (64-byte payload) sent one way as fast as the send ring takes
               them; the receiver counts them and answers once all have arrived
  link         the same PING/PONG through pipesd.link.Link (running in this process) per
               scenario: median RTT, the emulated RTT (2 x one-way + serialisation of 40 bytes
               at the rates in force), the added delay (median of RTT - emulated, minus the
               direct FrameEndpoint RTT) and the link's own per-chunk added delay

Usage: .venv/bin/python bench/bench_transport.py [--repeats 3] [--rounds 20000] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchlib import machine, pin, write_block
from rich.console import Console
from rich.table import Table

from pipesd import _core as core
from pipesd.link import SCENARIOS, Link

HERE = Path(__file__).parent
CLIENT_CORE, SERVER_CORE = 0, 1
MESSAGE_BYTES = 40  # a frame header (32 bytes) and an 8-byte payload
DRAFT_PAYLOAD = 64
LINK_SCENARIOS = ("lan", "paper-5g", "wan", "dynamic")
LINK_SECONDS = 4.0  # per repeat and scenario: rounds = 4 s / emulated RTT, in 50..2000


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank, as bench/pingpong.cc computes it."""
    s = sorted(samples)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def summarise_us(repeats: list[list[float]]) -> dict[str, float]:
    """Median over repeats of each repeat's median and p99; samples in seconds."""
    return {
        "median": 1e6 * statistics.median(statistics.median(r) for r in repeats),
        "p99": 1e6 * statistics.median(percentile(r, 0.99) for r in repeats),
    }


# ----------------------------------------------------------------------------- servers


def frame_echo_server(conn: Connection, core_id: int) -> None:
    """Echo PING as PONG (same epoch and payload) on one connection after another."""
    pin(core_id)
    listener = core.FrameListener.listen("127.0.0.1", 0)
    conn.send(listener.port)
    while not conn.poll():
        ep = listener.accept(timeout_ms=100)
        if ep is None:
            continue
        poller = select.poll()
        poller.register(ep.wake_fd, select.POLLIN)
        while not ep.closed:
            poller.poll(100)
            ep.drain_wake()
            while (f := ep.try_recv()) is not None:
                if f.type == core.FrameType.PING:
                    ep.send(core.Frame(core.FrameType.PONG, f.session, f.epoch, f.payload))
        ep.close()


def frame_sink_server(conn: Connection, core_id: int, frames: int) -> None:
    """Count frames on one connection; answer a PONG after every ``frames`` of them."""
    pin(core_id)
    listener = core.FrameListener.listen("127.0.0.1", 0, 1)
    conn.send(listener.port)
    ep = listener.accept(timeout_ms=10_000)
    assert ep is not None
    poller = select.poll()
    poller.register(ep.wake_fd, select.POLLIN)
    count = 0
    while not ep.closed:
        poller.poll(100)
        ep.drain_wake()
        while ep.try_recv() is not None:
            count += 1
            if count % frames == 0:
                ep.send(core.Frame(core.FrameType.PONG, epoch=count))
    ep.close()


def socket_echo_server(conn: Connection, core_id: int) -> None:
    """Blocking-socket echo of MESSAGE_BYTES messages for one client."""
    pin(core_id)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    s, _ = listener.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(MESSAGE_BYTES)
    view = memoryview(buf)
    while True:
        got = 0
        while got < MESSAGE_BYTES:
            n = s.recv_into(view[got:])
            if n == 0:
                return
            got += n
        s.sendall(buf)


class ServerProcess:
    """A server function in a spawned process pinned to SERVER_CORE; ``port`` once it listens."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(child, SERVER_CORE, *args), daemon=True)
        self._proc.start()
        if not self._conn.poll(30):
            raise RuntimeError(f"{target.__name__} did not start")
        self.port: int = self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()


# ----------------------------------------------------------------------------- clients


def wait_frame(ep: core.FrameEndpoint, poller: select.poll) -> core.Frame:
    while (f := ep.try_recv()) is None:
        if ep.closed:
            raise RuntimeError(f"connection closed: {ep.error}")
        poller.poll(1000)
        ep.drain_wake()
    return f


def frame_round_trips(
    ep: core.FrameEndpoint, rounds: int, link: Link | None = None, gap_s: float = 0.0
) -> Any:
    """Seconds per PING/PONG round trip; with a link, also the link time of each send.

    ``gap_s`` idles that long before each round trip (not timed), as the link makes both ends do.
    """
    poller = select.poll()
    poller.register(ep.wake_fd, select.POLLIN)
    payload = b"\x01" * (MESSAGE_BYTES - 32)
    rtts, sent_at = [], []
    for i in range(rounds):
        ping = core.Frame(core.FrameType.PING, epoch=i, payload=payload)
        if gap_s:
            time.sleep(gap_s)
        if link is not None:
            sent_at.append(link.elapsed_s())
        t0 = time.perf_counter()
        if not ep.send(ping):
            raise RuntimeError("send ring full during a ping-pong")
        f = wait_frame(ep, poller)
        rtts.append(time.perf_counter() - t0)
        if f.type != core.FrameType.PONG or f.epoch != i:
            raise RuntimeError(f"expected PONG {i}, got {f.type.name} {f.epoch}")
    return (rtts, sent_at) if link is not None else rtts


def bench_frame_rtt(port: int, rounds: int, repeats: int) -> dict[str, float]:
    ep = core.FrameEndpoint.connect("127.0.0.1", port)
    frame_round_trips(ep, rounds // 10)  # warm-up
    out = summarise_us([frame_round_trips(ep, rounds) for _ in range(repeats)])
    ep.close()
    return out


def bench_socket_rtt(rounds: int, repeats: int) -> dict[str, float]:
    server = ServerProcess(socket_echo_server)
    s = socket.create_connection(("127.0.0.1", server.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"\x01" * MESSAGE_BYTES
    buf = bytearray(MESSAGE_BYTES)
    view = memoryview(buf)

    def trips(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < MESSAGE_BYTES:
                got += s.recv_into(view[got:])
            out.append(time.perf_counter() - t0)
        return out

    trips(rounds // 10)
    result = summarise_us([trips(rounds) for _ in range(repeats)])
    s.close()
    server.stop()
    return result


def build_pingpong(out_dir: Path) -> Path:
    exe = out_dir / "pingpong"
    src = HERE / "pingpong.cc"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["c++", "-O2", "-std=c++17", "-o", str(exe), str(src)], check=True)
    return exe


def bench_cpp_rtt(exe: Path, rounds: int, repeats: int) -> dict[str, float]:
    server = subprocess.Popen(
        [str(exe), "server", str(MESSAGE_BYTES)], stdout=subprocess.PIPE, text=True
    )
    pin(SERVER_CORE, server.pid)
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    client = subprocess.run(
        [str(exe), "client", port, str(MESSAGE_BYTES), str(rounds), str(rounds // 10),
         str(repeats)],
        capture_output=True, text=True, check=True,
        preexec_fn=lambda: pin(CLIENT_CORE),
    )  # fmt: skip
    server.wait(10)
    rows = [tuple(map(float, line.split())) for line in client.stdout.splitlines()]
    return {
        "median": statistics.median(r[0] for r in rows),
        "p99": statistics.median(r[1] for r in rows),
    }


def bench_frames_per_second(frames: int, repeats: int) -> dict[str, float]:
    server = ServerProcess(frame_sink_server, frames)
    ep = core.FrameEndpoint.connect("127.0.0.1", server.port)
    poller = select.poll()
    poller.register(ep.wake_fd, select.POLLIN)
    draft = core.Frame(core.FrameType.DRAFT, session=1, epoch=1, payload=b"\x02" * DRAFT_PAYLOAD)

    def burst() -> float:
        t0 = time.perf_counter()
        for _ in range(frames):
            while not ep.send(draft):
                os.sched_yield()  # the ring is full: let the I/O thread (same core) drain it
        wait_frame(ep, poller)
        return time.perf_counter() - t0

    burst()  # warm-up
    seconds = statistics.median(burst() for _ in range(repeats))
    ep.close()
    server.stop()
    wire = len(draft.encode())
    return {
        "frames": frames,
        "payload_bytes": DRAFT_PAYLOAD,
        "wire_bytes": wire,
        "frames_per_s": frames / seconds,
        "mb_per_s": frames * wire / seconds / 1e6,
    }


def bench_link(port: int, name: str, repeats: int) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    one_way_s = scenario.one_way_ms / 1e3
    bits = MESSAGE_BYTES * 8
    # The baseline: the same ping-pong without the link, but idle between round trips for as
    # long as the link keeps both ends waiting, since waking an idle core costs time too.
    ep = core.FrameEndpoint.connect("127.0.0.1", port)
    rounds = max(50, min(2000, int(LINK_SECONDS / (2 * one_way_s))))
    direct = [frame_round_trips(ep, rounds, gap_s=2 * one_way_s) for _ in range(repeats)]
    direct_s = statistics.median(statistics.median(r) for r in direct)
    ep.close()
    with Link(("127.0.0.1", port), name, seed=0) as link:
        ep = core.FrameEndpoint.connect("127.0.0.1", link.port)
        up, down = link.rates_mbps(0.0)
        nominal_s = 2 * one_way_s + bits / (up * 1e6) + bits / (down * 1e6)
        rounds = max(50, min(2000, int(LINK_SECONDS / nominal_s)))
        frame_round_trips(ep, 5, link)  # warm-up
        rtts: list[list[float]] = []
        excess: list[float] = []
        emulated: list[float] = []
        for _ in range(repeats):
            r, sent_at = frame_round_trips(ep, rounds, link)
            rtts.append(r)
            for rtt, t in zip(r, sent_at, strict=True):
                up, down = link.rates_mbps(t)
                e = 2 * one_way_s + bits / (up * 1e6) + bits / (down * 1e6)
                emulated.append(e)
                excess.append(rtt - e)
        ep.close()
        stats = link.stats()
    return {
        "one_way_ms": scenario.one_way_ms,
        "rounds": rounds * repeats,
        "rtt_ms": 1e3 * statistics.median(statistics.median(r) for r in rtts),
        "rtt_p99_ms": 1e3 * statistics.median(percentile(r, 0.99) for r in rtts),
        "emulated_ms": 1e3 * statistics.median(emulated),
        "direct_idle_ms": 1e3 * direct_s,
        "added_ms": 1e3 * (statistics.median(excess) - direct_s),
        "link_added_ms": stats["added_delay_ms"],
    }


def run(repeats: int, rounds: int, out_dir: Path) -> dict[str, Any]:
    pin(CLIENT_CORE)  # before any thread starts, so that every thread here inherits it
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "repeats": repeats, "rounds": rounds}
    echo = ServerProcess(frame_echo_server)
    try:
        rtt = {"FrameEndpoint": bench_frame_rtt(echo.port, rounds, repeats)}
        rtt["Python socket"] = bench_socket_rtt(rounds, repeats)
        rtt["C++ socket"] = bench_cpp_rtt(build_pingpong(out_dir), rounds, repeats)
        result["rtt_us"] = rtt
        result["throughput"] = bench_frames_per_second(200_000, repeats)
        result["link"] = {name: bench_link(echo.port, name, repeats) for name in LINK_SCENARIOS}
    finally:
        echo.stop()
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    (out_dir / "transport.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- report

RTT_LABELS = {
    "FrameEndpoint": "`pipesd._core.FrameEndpoint`, PING/PONG frame (client polls `wake_fd`)",
    "Python socket": "Python blocking socket, `sendall`/`recv`",
    "C++ socket": "C++ blocking socket (`bench/pingpong.cc`)",
}


def table_markdown(r: dict[str, Any]) -> str:
    m, t = r["machine"], r["throughput"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; commit {m['commit']}"
        f"{' with uncommitted changes' if m['dirty'] else ''}, {m['date']}; load average "
        f"{m['load_average']:.2f} at the start, {m['load_average_end']:.2f} at the end. Client "
        f"in the benchmark process on core {CLIENT_CORE}, every server in its own process on core "
        f"{SERVER_CORE}; loopback TCP with TCP_NODELAY. Command: "
        "`.venv/bin/python bench/bench_transport.py`.",
        "",
        f"Round trip of a {MESSAGE_BYTES}-byte message, {r['rounds']} round trips per repeat "
        f"after a warm-up, median of {r['repeats']} repeats:",
        "",
        "| path | median µs | p99 µs |",
        "|---|---:|---:|",
    ]
    for key, v in r["rtt_us"].items():
        lines.append(f"| {RTT_LABELS[key]} | {v['median']:.1f} | {v['p99']:.1f} |")
    lines += [
        "",
        f"One way through `FrameEndpoint`: {t['frames']:,} DRAFT frames of {t['payload_bytes']} "
        f"payload bytes ({t['wire_bytes']} on the wire), sent from Python as fast as the send "
        f"ring takes them and counted by a Python receiver: **{t['frames_per_s'] / 1e3:,.0f}k "
        f"frames/s, {t['mb_per_s']:.1f} MB/s** (median of {r['repeats']}).",
        "",
        "The link emulator (`pipesd.link.Link`, in the client's process) between a "
        "`FrameEndpoint` client and the echo server, PING/PONG frames of "
        f"{MESSAGE_BYTES} bytes. Emulated RTT: 2 x one-way plus the serialisation of "
        f"{MESSAGE_BYTES} bytes at the rates in force. Direct: the same ping-pong without the "
        "link, idle for the emulated RTT before each round trip (as the link makes both ends "
        "idle). Added: median of (RTT - emulated) minus the direct median. Link up/down: the "
        "link's own per-chunk delay past the scheduled delivery, median / p99 / max.",
        "",
        "| scenario | round trips | RTT median ms | RTT p99 ms | emulated ms | direct ms "
        "| added ms | link up µs | link down µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["link"].items():
        cells = []
        for direction in ("up", "down"):
            d = v["link_added_ms"][direction]
            cells.append(f"{1e3 * d['median']:.0f} / {1e3 * d['p99']:.0f} / {1e3 * d['max']:.0f}")
        lines.append(
            f"| {name} | {v['rounds']} | {v['rtt_ms']:.3f} | {v['rtt_p99_ms']:.3f} "
            f"| {v['emulated_ms']:.3f} | {v['direct_idle_ms']:.3f} | {v['added_ms']:.3f} "
            f"| {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    r = run(args.repeats, args.rounds, args.out)
    table = Table(title="PipeSD transport")
    for col in ("what", "median", "p99"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for key, v in r["rtt_us"].items():
        table.add_row(f"RTT {key}", f"{v['median']:.1f} µs", f"{v['p99']:.1f} µs")
    t = r["throughput"]
    table.add_row("FrameEndpoint one way", f"{t['frames_per_s'] / 1e3:,.0f}k frames/s",
                  f"{t['mb_per_s']:.1f} MB/s")  # fmt: skip
    for name, v in r["link"].items():
        table.add_row(f"link {name} RTT", f"{v['rtt_ms']:.3f} ms", f"{v['rtt_p99_ms']:.3f} ms")
        table.add_row(f"link {name} added", f"{v['added_ms']:.3f} ms", "")
    Console().print(table)
    if not args.no_write:
        write_block("transport", "## Transport", table_markdown(r), after="## Components")
    print(f"wrote {args.out / 'transport.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
