"""The cloud's verification cost table on the wire (HELLO_OK, COSTS), protocol version 2
refusing version-1 peers in both directions, and ``auto`` through a real cloud and link."""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

from cloudproc import CloudProcess
from test_baselines import assert_same_or_tie
from test_cli_errors import assert_one_error_line, run_cli

from pipesd import Generator, models
from pipesd._core import (
    PROTOCOL_VERSION,
    ErrorCode,
    FrameParser,
    FrameType,
    HelloOk,
    decode_costs,
    decode_error,
    decode_hello_ok,
    encode_costs,
    encode_error,
    encode_hello_ok,
)
from pipesd.edge.drafter import SLOWDOWN_WINDOW
from pipesd.link import Link
from pipesd.policies.auto import AutoPolicy

PROMPT = "def is_prime(n):\n"


def test_cost_table_round_trips_through_the_codec() -> None:
    ok = decode_hello_ok(encode_hello_ok(HelloOk(7, "m", 4096, [58.0, 129.5, 143.0])))
    assert (ok.session, ok.max_ctx) == (7, 4096)
    assert ok.verify_ms == [58.0, 129.5, 143.0]
    assert decode_hello_ok(encode_hello_ok(HelloOk(7, "m", 4096))).verify_ms == []
    assert decode_costs(encode_costs([1.0, 2.5])) == [1.0, 2.5]


def test_hello_ok_carries_the_calibrated_table_and_costs_refresh_it(
    smollm_path: Path, mild_draft: Path, tmp_path: Path
) -> None:
    with (
        CloudProcess(smollm_path, tmp_path / "cloud.log") as cloud,
        Generator(draft=str(mild_draft), cloud=cloud.address, n_ctx=1024) as gen,
    ):
        assert gen.cloud is not None
        table = gen.cloud.pass_costs()
        assert len(table) == 32 and all(v > 0 for v in table)
        # The newest stored calibration of this file (older ones may be left by earlier
        # calibration methods, whose keys differ).
        files = sorted((models.pipesd_home() / "costs").glob("*.json"),
                       key=lambda p: p.stat().st_mtime, reverse=True)  # fmt: skip
        stored = [json.loads(p.read_text()) for p in files]
        calibrated = next(d["verify_s"] for d in stored
                              if Path(d.get("model", "")).resolve() == smollm_path.resolve()
                              and d.get("backend") == "llama.cpp")  # fmt: skip
        assert all(abs(a - b) <= 1e-6 * max(1.0, b) for a, b in
                       zip(table, calibrated, strict=True))  # fmt: skip
    with (
        CloudProcess(smollm_path, tmp_path / "nocal.log", args=("--no-calibrate",)) as cloud,
        Generator(draft=str(mild_draft), cloud=cloud.address, n_ctx=1024) as gen,
    ):
        assert gen.cloud is not None and gen.cloud.pass_costs() == []
        res = gen.generate(PROMPT, max_new_tokens=24, policy="vanilla", draft_len=3)
        assert res.stats.verifications > 0
        # The passes served taught the cloud a curve, which it sent in COSTS frames.
        assert gen.cloud.costs_updates >= 1
        table = gen.cloud.pass_costs()
        # Passes of 4 (3 drafts and the last) were served; the cloud tells the sizes it
        # measured, 0 for the others, up to the largest it served.
        assert len(table) >= 4 and table[3] > 0 and all(v >= 0 for v in table), table


def test_a_version_1_edge_is_refused_with_one_line(smollm_path: Path, tmp_path: Path) -> None:
    with CloudProcess(smollm_path, tmp_path / "cloud.log", args=("--no-calibrate",)) as cloud:
        sock = socket.create_connection(("127.0.0.1", cloud.port), timeout=30)
        sock.sendall(struct.pack("<IHHIQQI", 0x31445350, 1, 1, 0, 0, 0, 0))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        parser = FrameParser()
        parser.feed(data)
        frame = parser.next()
        assert frame is not None and frame.type == FrameType.ERROR
        err = decode_error(frame.payload)
        assert err.code == int(ErrorCode.BAD_VERSION.value)
        assert f"unsupported protocol version 1, expected {PROTOCOL_VERSION}" in err.message
        assert cloud.alive()
    assert "unsupported protocol version 1" in cloud.log()


def test_a_version_1_cloud_is_refused_with_one_line(mild_draft: Path) -> None:
    """A peer answering in version 1 (a fake cloud in this test: it answers any connection
    with a version-1 ERROR frame) gives the edge one clear line, no retries, exit 2."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    payload = encode_error_v1()

    def serve() -> None:
        for _ in range(2):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(struct.pack("<IHHIQQI", 0x31445350, 1, 8, 0, 0, 0, len(payload))
                         + payload)  # fmt: skip
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        proc = run_cli("generate", "--cloud", f"127.0.0.1:{port}", "--draft", str(mild_draft),
                       "--max-new-tokens", "4", "x")  # fmt: skip
        assert_one_error_line(proc, "speaks another protocol version")
        assert "version 1" in proc.stderr
    finally:
        server.close()
        t.join(timeout=10)


def encode_error_v1() -> bytes:
    from pipesd._core import WireError

    return encode_error(WireError(ErrorCode.BAD_VERSION, "unsupported protocol version 2"))


def test_auto_through_cloud_and_link_is_lossless(smollm_path: Path, mild_draft: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    """Through a real cloud and the emulated 5G link, ``auto`` (whatever it chooses) gives the
    target's output; with the curve unknown it speculates and learns it from the verdicts."""

    class Recording(AutoPolicy):
        """auto, noting the round trip its first decision planned with."""

        first_rtt: float | None = None

        def decode_alone(self, *, budget: int, behind: int) -> int:
            model = self.cycle_model()
            if self.first_rtt is None and model is not None:
                self.first_rtt = model.rtt_s
            return super().decode_alone(budget=budget, behind=behind)

    for args in ((), ("--no-calibrate",)):
        with (
            CloudProcess(smollm_path, tmp_path / "c.log", args=args) as cloud,
            Link(("127.0.0.1", cloud.port), "paper-5g") as link,
            Generator(draft=str(mild_draft), cloud=f"127.0.0.1:{link.port}", n_ctx=1024) as gen,
        ):
            # The handshake measured the round trip (20 ms each way) before any sequence.
            assert gen.cloud is not None
            assert [r for r in gen.cloud.recent_rtts() if 0.04 <= r < 1.0], gen.cloud.recent_rtts()
            # auto first: without calibration the cloud has served no pass yet.
            trace: list[tuple[str, float, float]] = []
            policy = Recording(acceptance=gen.acceptance)
            res = gen.generate(PROMPT, max_new_tokens=32, trace=trace, policy=policy)
            ref = gen.generate(PROMPT, max_new_tokens=32, policy="target-only")
        assert res.stats.policy == "auto"
        if args:
            assert res.stats.verifications > 0
            assert_same_or_tie(smollm_path, PROMPT, ref.tokens, res.tokens)
        else:
            # The calibrated curve says no window pays: the target decodes alone from the
            # first token on, and the drafter never even evaluates the prompt.
            rest = res.stats.new_tokens - 1  # after the prefill's token
            assert res.stats.alone_tokens == rest and res.stats.verifications == 0, res.stats
            assert res.stats.drafted == 0 and res.stats.draft_s == 0.0
            assert res.tokens == ref.tokens  # the target alone: the very same passes
            # The decision before the first token already planned with the round trip.
            assert policy.first_rtt is not None and policy.first_rtt >= 0.04
            # Blocks alone follow each other without a gap: the requests for the next block
            # go out before the last of the block before is answered, so until every token
            # is asked for, some request (the prefill first) is always outstanding.
            outstanding, asked, gaps = 1, 0, 0
            for kind, _, value in trace:
                if kind == "verify":
                    assert value == 0
                    outstanding, asked = outstanding + 1, asked + 1
                elif kind == "verdict":
                    outstanding -= 1
                    gaps += outstanding == 0 and asked < rest
            assert asked >= rest and gaps == 0, trace


def test_the_idle_edge_guesses_the_tokens_decoded_alone(smollm_path: Path, mild_draft: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    """While the target decodes alone through a network, the idle edge's drafter catches up
    with the prompt and then guesses each token before it comes: the guesses that keep
    auto's estimates fresh between windows. (A drafter that caught up by one token at each
    step stayed one token behind for good and guessed nothing.)"""

    class Shadowing(AutoPolicy):
        """auto with guesses wanted (as on a target much dearer than the draft)."""

        guesses = 0

        def wants_shadow(self) -> bool:
            return True

        def on_shadow(self, confidence: float, accepted: bool) -> None:
            self.guesses += 1
            super().on_shadow(confidence, accepted)

    # Without a calibration the edge speculates first and learns from the verdicts that no
    # window pays (the draft costs what the target does); then the target decodes alone.
    with (
        CloudProcess(smollm_path, tmp_path / "c.log", args=("--no-calibrate",)) as cloud,
        Link(("127.0.0.1", cloud.port), "paper-5g") as link,
        Generator(draft=str(mild_draft), cloud=f"127.0.0.1:{link.port}", n_ctx=1024) as gen,
    ):
        policy = Shadowing(acceptance=gen.acceptance)
        res = gen.generate(PROMPT, max_new_tokens=48, policy=policy)
        ref = gen.generate(PROMPT, max_new_tokens=48, policy="target-only")
    assert res.stats.verifications >= 1 and res.stats.alone_tokens >= 24, res.stats
    assert_same_or_tie(smollm_path, PROMPT, ref.tokens, res.tokens)
    # Every token decoded alone is guessed, but where a block ends and the first one after
    # a window (the drafter is still catching up with the verdict).
    guessed = [ok for _, ok in policy.trace][-policy.guesses :]
    assert policy.guesses >= res.stats.alone_tokens - 8, (policy.guesses, res.stats)
    assert len(guessed) == policy.guesses and any(guessed)


def test_a_throttled_edge_is_idle_when_the_first_token_is_due(
    smollm_path: Path, mild_draft: Path, tmp_path: Path
) -> None:
    """Through a network the edge evaluates the prompt and drafts while the target prefills.
    An edge far below its measured speed (a CPU quota) stops that work before the first
    token is due, as the sequences before tell, so that it takes the token at once; the
    output is the same."""

    def work_before_first_token(trace: list[tuple[str, float, float]]) -> int:
        first = next(t for kind, t, _ in trace if kind == "verdict")
        return sum(1 for kind, t, _ in trace if kind == "draft" and t < first)

    with (
        CloudProcess(smollm_path, tmp_path / "c.log") as cloud,
        Link(("127.0.0.1", cloud.port), "paper-5g") as link,
        Generator(draft=str(mild_draft), cloud=f"127.0.0.1:{link.port}", n_ctx=1024) as gen,
    ):
        assert gen.first_clock.due_in(10) is None
        ref = gen.generate(PROMPT, max_new_tokens=16, policy="target-only")
        due = gen.first_clock.due_in(ref.stats.prompt_tokens)
        # Due after the round trip of the emulated 5G link (40 ms) and the target's prefill.
        assert due is not None and 0.04 < due < ref.stats.ttft_s + 0.1
        trace: list[tuple[str, float, float]] = []
        res = gen.generate(PROMPT, max_new_tokens=16, policy="vanilla", trace=trace)
        assert_same_or_tie(smollm_path, PROMPT, ref.tokens, res.tokens)
        assert work_before_first_token(trace) >= 1  # at full speed: busy until it comes
        # Five times slower than measured: a piece of work takes >= 0.1 s, and the token is
        # due sooner than two of them, so the edge waits idle from the start.
        gen.draft_timings.extend([(5.0, 1.0)] * SLOWDOWN_WINDOW)
        trace = []
        res = gen.generate(PROMPT, max_new_tokens=16, policy="vanilla", trace=trace)
        assert_same_or_tie(smollm_path, PROMPT, ref.tokens, res.tokens)
        assert work_before_first_token(trace) == 0
        assert res.stats.drafted > 0  # it drafts after the first token
