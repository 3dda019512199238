"""Bad input against a running ``pipesd cloud``: each gets an ERROR frame (where one can be sent)
and a log line, only its own connection closes, and a healthy session alongside finishes with
the right output. Also the edge's one-line errors for an unreachable or refusing cloud."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from cloudproc import CloudProcess, free_port
from test_cli_errors import assert_one_error_line, run_cli

from pipesd import Generator
from pipesd._core import (
    PROTOCOL_VERSION,
    ErrorCode,
    Frame,
    FrameParser,
    FrameType,
    Hello,
    Prefill,
    WireDist,
    decode_error,
    decode_hello_ok,
    decode_verdict,
    encode_hello,
    encode_prefill,
    make_draft_frame,
)
from pipesd._core import Draft as WireDraft
from pipesd.llama_backend import LlamaCppModel, tokenizer_fingerprint

TOKEN = "s3cret-token"
PROMPT = "def is_prime(n):\n"
N_NEW = 48


def header(*, magic: int = 0x31445350, version: int = PROTOCOL_VERSION, ftype: int = 1,
           flags: int = 0, session: int = 0, epoch: int = 0,
           length: int = 0) -> bytes:  # fmt: skip
    return struct.pack("<IHHIQQI", magic, version, ftype, flags, session, epoch, length)


class Raw:
    """A plain socket speaking (or failing to speak) the protocol."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.parser = FrameParser()
        self.eof = False
        self.costs_frames = 0

    def send(self, data: bytes | Frame) -> None:
        self.sock.sendall(data.encode() if isinstance(data, Frame) else data)

    def frame(self) -> Frame | None:
        """The next frame (COSTS notices skipped), or None at end of stream."""
        while True:
            f = self.parser.next()
            if f is not None and f.type == FrameType.COSTS:
                self.costs_frames += 1
                continue
            if f is not None:
                return f
            if self.eof:
                return None
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            else:
                self.parser.feed(chunk)

    def error_then_close(self) -> tuple[str, str]:
        """Reads to the end: the one ERROR frame (code name, message), then the close."""
        f = self.frame()
        assert f is not None, "the cloud closed without an ERROR frame"
        assert f.type == FrameType.ERROR, f.type
        err = decode_error(f.payload)
        assert self.frame() is None, "the connection stayed open after a fatal error"
        self.sock.close()
        return ErrorCode(err.code).name, err.message

    def hello(self, vocab: int, fingerprint: str, token: str = TOKEN) -> int:
        h = Hello(token, vocab, fingerprint)
        self.send(Frame(FrameType.HELLO, 0, 0, encode_hello(h)))
        f = self.frame()
        assert f is not None and f.type == FrameType.HELLO_OK, f
        return int(decode_hello_ok(f.payload).session)

    def prefill(self, sid: int, epoch: int, prompt: Prefill) -> int:
        """Starts a sequence; returns the first output token (the PREFILL's VERDICT)."""
        self.send(Frame(FrameType.PREFILL, sid, epoch, encode_prefill(prompt)))
        f = self.frame()
        assert f is not None and f.type == FrameType.VERDICT, f
        v = decode_verdict(f.payload)
        assert (v.drafted, v.accepted, f.epoch) == (0, 0, epoch)
        return int(v.next_token)


@pytest.fixture(scope="module")
def cloud(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cloud-errors")
    (d / "token").write_text(TOKEN + "\n")
    args = ("--auth-token-file", str(d / "token"), "--ctx", "1024")
    with CloudProcess(smollm_path, d / "cloud.log", args=args) as c:
        yield c


@pytest.fixture(scope="module")
def reference(mild_draft: Path, smollm_path: Path) -> list[int]:
    with Generator(
        draft=str(mild_draft), target=str(smollm_path), n_ctx=1024, policy="vanilla", draft_len=1
    ) as gen:
        return gen.generate(PROMPT, max_new_tokens=N_NEW).tokens


def test_bad_inputs_close_only_their_connection(cloud, smollm_vocab, mild_draft, reference,
                                                real_draft_path) -> None:  # fmt: skip
    vocab, fingerprint, prompt_ids = smollm_vocab
    # A healthy session runs alongside: slowed by a tiny draft length so that it spans the test.
    healthy: dict[str, object] = {}

    def run_healthy() -> None:
        try:
            with Generator(draft=str(mild_draft), cloud=cloud.address, auth_token=TOKEN,
                           n_ctx=1024, policy="vanilla", draft_len=1) as gen:  # fmt: skip
                healthy["tokens"] = gen.generate(PROMPT, max_new_tokens=N_NEW).tokens
        except BaseException as e:  # reported by the assertion below
            healthy["error"] = e

    worker = threading.Thread(target=run_healthy)
    worker.start()
    try:
        cases: list[tuple[str, str, str]] = []

        r = Raw(cloud.port)  # random bytes (not starting with the magic)
        r.send(b"\x00" + os.urandom(200))
        cases.append(("random bytes", *r.error_then_close()))

        r = Raw(cloud.port)  # a header announcing a huge payload; nothing follows
        r.send(header(length=0xFFFFFFF0))
        cases.append(("huge length", *r.error_then_close()))

        r = Raw(cloud.port)
        r.send(header(ftype=77))
        cases.append(("unknown type", *r.error_then_close()))

        r = Raw(cloud.port)
        r.send(header(version=9))
        cases.append(("wrong version", *r.error_then_close()))

        r = Raw(cloud.port)
        r.send(Frame(FrameType.HELLO, 0, 0, encode_hello(Hello("guess", vocab, fingerprint))))
        cases.append(("wrong auth", *r.error_then_close()))

        other = LlamaCppModel(real_draft_path, vocab_only=True)
        other_texts = other.token_texts()
        other.close()
        r = Raw(cloud.port)
        r.send(Frame(FrameType.HELLO, 0, 0,
                     encode_hello(Hello(TOKEN, len(other_texts),
                                        tokenizer_fingerprint(other_texts)))))  # fmt: skip
        cases.append(("other tokenizer", *r.error_then_close()))

        r = Raw(cloud.port)  # DRAFT naming a session nobody opened
        r.send(make_draft_frame(4242, 1, WireDraft(len(prompt_ids), [1, 2], []), True))
        cases.append(("unknown session first", *r.error_then_close()))

        r = Raw(cloud.port)  # DRAFT naming another session than the one HELLO_OK gave
        sid = r.hello(vocab, fingerprint)
        r.prefill(sid, 1, Prefill(prompt_ids))
        r.send(make_draft_frame(sid + 1000, 1, WireDraft(len(prompt_ids) + 1, [1], []), True))
        cases.append(("unknown session", *r.error_then_close()))

        r = Raw(cloud.port)  # a malformed payload inside a valid header
        r.send(Frame(FrameType.HELLO, 0, 0, b"\x05\x00\x00\x00ab"))
        cases.append(("truncated HELLO", *r.error_then_close()))

        r = Raw(cloud.port)  # sampled DRAFT without distributions
        sid = r.hello(vocab, fingerprint)
        r.prefill(sid, 1, Prefill(prompt_ids, temperature=1.0, top_p=1.0))
        r.send(make_draft_frame(sid, 1, WireDraft(len(prompt_ids) + 1, [5], []), True))
        cases.append(("sampled draft without dists", *r.error_then_close()))

        expected = {
            "random bytes": ("BAD_FRAME", "bad frame magic"),
            "huge length": ("TOO_LONG", "bytes, limit "),
            "unknown type": ("BAD_FRAME", "unknown frame type 77"),
            "wrong version": ("BAD_VERSION", "unsupported protocol version 9"),
            "wrong auth": ("AUTH_FAILED", "auth token"),
            "other tokenizer": ("TOKENIZER_MISMATCH", "151936 tokens"),
            "unknown session first": ("UNKNOWN_SESSION", "session 4242"),
            "unknown session": ("UNKNOWN_SESSION", "this connection is session"),
            "truncated HELLO": ("BAD_FRAME", "HELLO payload"),
            "sampled draft without dists": ("BAD_FRAME", "distributions"),
        }
        for what, code, message in cases:
            want_code, want_text = expected[what]
            assert code == want_code, f"{what}: {code} {message}"
            assert want_text in message, f"{what}: {message}"

        # A DRAFT of a stale epoch is dropped with an informational STALE_EPOCH notice; the
        # session goes on (stale frames are normal while speculation moves on).
        r = Raw(cloud.port)
        sid = r.hello(vocab, fingerprint)
        r.prefill(sid, 5, Prefill(prompt_ids))
        r.send(make_draft_frame(sid, 3, WireDraft(len(prompt_ids) + 1, [11, 12], []), True))
        f = r.frame()
        assert f is not None and f.type == FrameType.ERROR
        err = decode_error(f.payload)
        assert ErrorCode(err.code).name == "STALE_EPOCH" and "epoch 3" in err.message
        r.send(make_draft_frame(sid, 5, WireDraft(len(prompt_ids) + 1, [], []), True))
        f = r.frame()
        assert f is not None and f.type == FrameType.VERDICT, "the session did not go on"
        r.send(Frame(FrameType.BYE, sid, 5))
        f = r.frame()
        assert f is not None and f.type == FrameType.BYE
        assert r.frame() is None
    finally:
        worker.join(timeout=600)

    assert "error" not in healthy, healthy.get("error")
    assert healthy["tokens"] == reference
    assert cloud.alive()
    log = cloud.log()
    for needle in ("protocol error: bad frame magic", "announces a payload of 4294967280",
                   "unknown frame type 77",
                   "unsupported protocol version 9", "AUTH_FAILED", "TOKENIZER_MISMATCH",
                   "UNKNOWN_SESSION", "dropped DRAFT of epoch 3"):  # fmt: skip
        assert needle in log, f"no log line for {needle!r}:\n{log}"
    assert "Traceback" not in log


def test_wire_dist_check_rejects_bad_probabilities() -> None:
    with pytest.raises(Exception, match="prob"):
        make_draft_frame(1, 1, WireDraft(3, [4], [WireDist([4], [1.5])]), True)


def test_generate_against_unreachable_cloud_fails_fast(smollm_path: Path) -> None:
    proc = run_cli("generate", "--cloud", f"127.0.0.1:{free_port()}", "--draft", str(smollm_path),
                   "hi")  # fmt: skip
    assert_one_error_line(proc, "cannot reach the cloud at 127.0.0.1:")


def test_generate_with_wrong_token_or_tokenizer(cloud, tmp_path: Path, smollm_path: Path,
                                                real_draft_path: Path) -> None:  # fmt: skip
    bad = tmp_path / "bad-token"
    bad.write_text("nope\n")
    proc = run_cli("generate", "--cloud", cloud.address, "--auth-token-file", str(bad),
                   "--draft", str(smollm_path), "hi")  # fmt: skip
    assert_one_error_line(proc, "AUTH_FAILED")
    good = tmp_path / "good-token"
    good.write_text(TOKEN)
    proc = run_cli("generate", "--cloud", cloud.address, "--auth-token-file", str(good),
                   "--draft", str(real_draft_path), "hi")  # fmt: skip
    assert_one_error_line(proc, "refused the draft", "151936 tokens")
    proc = run_cli("generate", "--cloud", cloud.address, "--auth-token-file",
                   str(tmp_path / "missing"), "--draft", str(smollm_path), "hi")  # fmt: skip
    assert_one_error_line(proc, "cannot read auth token file")


def test_cloud_refuses_open_listen_without_token(smollm_path: Path) -> None:
    proc = run_cli("cloud", "--target", str(smollm_path), "--listen", "0.0.0.0:0")
    assert_one_error_line(proc, "not loopback", "--auth-token-file")
    proc = run_cli("cloud", "--target", str(smollm_path), "--listen", "nonsense")
    assert_one_error_line(proc, "--listen expects HOST:PORT")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("cloud", "--target", str(smollm_path), "--listen", f"127.0.0.1:{port}")
        assert_one_error_line(proc, f"cannot listen on 127.0.0.1:{port}")


def test_one_session_too_many_is_refused_busy(smollm_path: Path, smollm_vocab,
                                              tmp_path: Path) -> None:  # fmt: skip
    vocab, fingerprint, prompt_ids = smollm_vocab
    with CloudProcess(smollm_path, tmp_path / "cloud.log", args=("--max-sessions", "1")) as cloud:
        first = Raw(cloud.port)
        sid = first.hello(vocab, fingerprint, token="")
        second = Raw(cloud.port)
        second.send(Frame(FrameType.HELLO, 0, 0, encode_hello(Hello("", vocab, fingerprint))))
        code, message = second.error_then_close()
        assert code == "BUSY" and "1 sessions" in message
        # The first session is unaffected, and its end frees the place.
        first.prefill(sid, 1, Prefill(prompt_ids))
        first.send(make_draft_frame(sid, 1, WireDraft(len(prompt_ids) + 1, [], []), True))
        f = first.frame()
        assert f is not None and f.type == FrameType.VERDICT
        first.send(Frame(FrameType.BYE, sid, 1))
        assert first.frame() is not None and first.frame() is None
        third = Raw(cloud.port)
        assert third.hello(vocab, fingerprint, token="") > sid


def test_requests_left_by_an_ended_sequence_do_not_delay_the_next(cloud, smollm_vocab) -> None:
    """A sequence that ends (at an end of sequence) with requests for further tokens still out
    leaves them queued at the cloud. Once the next sequence's PREFILL has come, those not yet
    started are dropped with STALE_EPOCH instead of being computed ahead of it, and the new
    sequence starts as a first one would."""
    vocab, fingerprint, prompt_ids = smollm_vocab
    r = Raw(cloud.port)
    sid = r.hello(vocab, fingerprint)
    first = r.prefill(sid, 1, Prefill(prompt_ids))
    n = 12
    burst = [make_draft_frame(sid, 1, WireDraft(len(prompt_ids) + 1 + i, [], []), True)
             for i in range(n)]  # fmt: skip
    again = Frame(FrameType.PREFILL, sid, 2, encode_prefill(Prefill(prompt_ids)))
    r.send(b"".join(f.encode() for f in [*burst, again]))
    answered, dropped = 0, 0
    while True:
        f = r.frame()
        assert f is not None
        if f.type == FrameType.VERDICT and f.epoch == 1:
            answered += 1
        elif f.type == FrameType.ERROR:
            err = decode_error(f.payload)
            assert err.code == int(ErrorCode.STALE_EPOCH.value), err.message
            assert "started its next sequence" in err.message and f.epoch == 1
            dropped += 1
        else:
            assert f.type == FrameType.VERDICT and f.epoch == 2, f.type
            v = decode_verdict(f.payload)
            assert (v.drafted, v.accepted, int(v.next_token)) == (0, 0, first)
            break
    assert answered + dropped == n
    # At most the pass already running when the PREFILL came (and one more, had the frames
    # come in pieces) is computed.
    assert dropped >= n - 2, (answered, dropped)
    r.sock.close()
