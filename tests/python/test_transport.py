"""The wire format and the TCP endpoint through the bindings (loopback only)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from pipesd import _core as core
from pipesd.errors import ProtocolError, TransportError


def test_payload_round_trips() -> None:
    hello = core.decode_hello(core.encode_hello(core.Hello("secret", 151936, "ab12")))
    assert (hello.auth_token, hello.vocab_size, hello.tokenizer_hash) == (b"secret", 151936, "ab12")
    draft = core.Draft(
        start=17,
        tokens=[5, 6],
        dists=[core.WireDist([5, 9], [0.75, 0.25]), core.WireDist([6], [1.0])],
    )
    frame = core.make_draft_frame(session=3, epoch=4, draft=draft, verify=True)
    assert frame.flags == core.FLAG_VERIFY | core.FLAG_HAS_DIST
    back = core.decode_draft(frame.payload, has_dist=True)
    assert (back.start, back.tokens) == (17, [5, 6])
    assert [d.ids for d in back.dists] == [[5, 9], [6]]
    assert back.dists[0].probs == pytest.approx([0.75, 0.25])
    v = core.decode_verdict(core.encode_verdict(core.WireVerdict(17, 2, 1, 42, 3.5)))
    assert (v.start, v.drafted, v.accepted, v.next_token) == (17, 2, 1, 42)


def test_bad_bytes_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        core.decode_draft(core.encode_draft(core.Draft(0, [1, 2, 3]))[:-2], has_dist=False)
    parser = core.FrameParser()
    with pytest.raises(ProtocolError, match="magic"):
        parser.feed(b"\x00" * 32)
        parser.next()
    # A header announcing 1 GiB is refused from its 32 bytes alone.
    huge = bytearray(core.Frame(core.FrameType.PING).encode())
    huge[28:32] = (1 << 30).to_bytes(4, "little")
    parser = core.FrameParser()
    with pytest.raises(ProtocolError, match="payload"):
        parser.feed(bytes(huge))
        parser.next()


def _pair() -> tuple[core.FrameListener, core.FrameEndpoint, core.FrameEndpoint]:
    listener = core.FrameListener.listen("127.0.0.1", 0)
    client = core.FrameEndpoint.connect("127.0.0.1", listener.port)
    server = listener.accept(timeout_ms=5000)
    assert server is not None
    return listener, client, server


def _recv(ep: core.FrameEndpoint, timeout_s: float = 5.0) -> core.Frame:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        f = ep.try_recv()
        if f is not None:
            return f
        time.sleep(0.001)
    raise AssertionError("no frame arrived")


def test_frames_cross_a_loopback_connection() -> None:
    listener, client, server = _pair()
    try:
        hello = core.Frame(core.FrameType.HELLO, payload=core.encode_hello(core.Hello("t", 8, "")))
        assert client.send(hello)
        got = _recv(server)
        assert got.type == core.FrameType.HELLO and core.decode_hello(got.payload).vocab_size == 8
        for i in range(1000):
            while not server.send(core.Frame(core.FrameType.PONG, epoch=i, payload=b"x" * 10)):
                time.sleep(0.001)
        epochs = [_recv(client).epoch for _ in range(1000)]
        assert epochs == list(range(1000))
        stats = client.stats()
        assert stats["frames_received"] == 1000 and stats["frames_sent"] == 1
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_wake_fd_drives_an_event_loop(loop_factory) -> None:
    listener, client, server = _pair()

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        got: list[int] = []
        done = asyncio.Event()

        def on_wake() -> None:
            client.drain_wake()
            while (f := client.try_recv()) is not None:
                got.append(f.epoch)
            if len(got) == 50:
                done.set()

        loop.add_reader(client.wake_fd, on_wake)
        for i in range(50):
            assert server.send(core.Frame(core.FrameType.PING, epoch=i))
        await asyncio.wait_for(done.wait(), 5)
        loop.remove_reader(client.wake_fd)
        return got

    loop = loop_factory()
    try:
        assert loop.run_until_complete(main()) == list(range(50))
    finally:
        loop.close()
        client.close()
        server.close()


def test_garbage_closes_only_that_connection() -> None:
    listener = core.FrameListener.listen("127.0.0.1", 0)
    raw = socket.create_connection(("127.0.0.1", listener.port))
    victim = listener.accept(timeout_ms=5000)
    healthy_client = core.FrameEndpoint.connect("127.0.0.1", listener.port)
    healthy = listener.accept(timeout_ms=5000)
    try:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 64)
        deadline = time.monotonic() + 5
        while not victim.closed and time.monotonic() < deadline:
            time.sleep(0.005)
        assert victim.closed and victim.close_reason == "PROTOCOL_ERROR"
        assert "magic" in victim.error
        assert healthy_client.send(core.Frame(core.FrameType.PING, epoch=7))
        assert _recv(healthy).epoch == 7
    finally:
        raw.close()
        for ep in (victim, healthy_client, healthy):
            ep.close()


def test_connect_to_closed_port_is_a_transport_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        core.FrameEndpoint.connect("127.0.0.1", port)
