"""The cloud's per-sequence rules (docs/protocol.md, Epochs) on a real small target: streamed
drafts, stale and newer epochs, drafts made while a verdict was pending, malformed positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesd.cloud.verifier import TargetSession
from pipesd.errors import ProtocolError
from pipesd.llama_backend import LlamaCppModel
from pipesd.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def target(smollm_path: Path):  # type: ignore[no-untyped-def]
    m = LlamaCppModel(smollm_path, n_ctx=512)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompt(target: LlamaCppModel) -> list[int]:
    return target.tokenize("def add(a, b):\n")


@pytest.fixture(scope="module")
def greedy_tokens(target: LlamaCppModel, prompt: list[int]) -> list[int]:
    """The target's own continuation: the prefill's token, then one token per empty window."""
    s = TargetSession(target, GREEDY)
    out = [s.prefill(prompt, epoch=1).next_token]
    for _ in range(12):
        v = s.verify_window(len(prompt) + len(out))
        out.append(v.next_token)
    return out


def new_session(target: LlamaCppModel, prompt: list[int], epoch: int = 1) -> TargetSession:
    s = TargetSession(target, GREEDY)
    s.prefill(prompt, epoch=epoch)
    return s


def test_prefill_commits_the_first_token(target, prompt, greedy_tokens) -> None:
    s = TargetSession(target, GREEDY)
    v = s.prefill(prompt, epoch=4)
    assert (v.epoch, v.start, v.drafted, v.accepted) == (4, len(prompt), 0, 0)
    assert v.next_token == greedy_tokens[0] and v.verify_s > 0
    # As after any verdict, the target holds every committed token but the last.
    assert s.ledger.committed() == [*prompt, greedy_tokens[0]]
    assert target.kv_len == len(prompt)


def test_streamed_window_equals_one_shot(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    assert s.receive(1, p, g[:2])
    assert s.receive(1, p + 2, g[2:4])
    v = s.verify_window(p + 4)
    assert (v.start, v.drafted, v.accepted, v.next_token) == (p, 4, 4, g[4])
    assert s.ledger.committed() == prompt + greedy_tokens[:1] + g[:5]


def test_stale_and_newer_epochs(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt, epoch=5)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    assert not s.receive(4, p, g[:3])
    assert s.ledger.pending_count == 0 and s.dropped == 3
    assert s.receive(5, p, [7, 8])
    assert s.receive(6, p, g[:2])  # epoch 6 retires epoch 5's drafts
    assert s.ledger.pending() == g[:2]
    assert not s.receive(5, p + 2, [9])
    v = s.verify_window(p + 2)
    assert v.epoch == 6 and v.accepted == 2


def test_rejection_retires_the_epoch(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    wrong = (g[1] + 1) % 1000
    s.receive(1, p, [g[0], wrong])
    v = s.verify_window(p + 2)
    assert (v.accepted, v.next_token) == (1, g[1])
    # The edge will discard what it drafted meanwhile: frames of epoch 1 are now stale.
    assert not s.receive(1, p + 2, [1, 2])
    assert s.receive(2, p + 2, g[2:4])
    assert s.verify_window(p + 4).accepted == 2


def test_wait_drafts_kept_when_bonus_matches(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    s.receive(1, p, g[:3])
    v = s.verify_window(p + 3)
    assert v.accepted == 3 and v.next_token == g[3]
    # Drafted during the wait, from position p + 3 on: the first equals the bonus.
    assert s.receive(1, p + 3, g[3:6])
    assert s.ledger.committed_len == p + 4
    assert s.ledger.pending() == g[4:6]
    v = s.verify_window(p + 6)
    assert v.accepted == 2 and v.next_token == g[6]


def test_wait_drafts_dropped_when_bonus_differs(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    s.receive(1, p, g[:2])
    s.verify_window(p + 2)
    wrong = (g[2] + 1) % 1000
    assert not s.receive(1, p + 2, [wrong, 5, 6])
    assert s.retired and s.ledger.pending_count == 0
    assert not s.receive(1, p + 5, [7])  # the rest of that speculation is dropped too
    assert s.receive(2, p + 3, g[3:5])
    assert s.verify_window(p + 5).accepted == 2


def test_malformed_positions_are_protocol_errors(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    with pytest.raises(ProtocolError, match="drafts start at position"):
        s.receive(1, p + 3, [1])  # a gap
    s.receive(1, p, g[:2])
    with pytest.raises(ProtocolError, match="repeat pending drafts"):
        s.receive(1, p + 1, [1])
    with pytest.raises(ProtocolError, match="cannot verify up to position"):
        s.verify_window(p + 3)
    with pytest.raises(ProtocolError, match="DRAFT before PREFILL"):
        TargetSession(target, GREEDY).receive(1, 0, [1])


def test_reset_drops_pending_and_keeps_the_prefix(target, prompt, greedy_tokens) -> None:
    s = new_session(target, prompt, epoch=3)
    p, g = len(prompt) + 1, greedy_tokens[1:]  # the prefill committed greedy_tokens[0]
    s.receive(3, p, g[:2])
    assert not s.reset(2)
    assert s.reset(4)
    assert s.ledger.pending_count == 0 and s.ledger.committed_len == p
    s.receive(4, p, g[:1])
    assert s.verify_window(p + 1).accepted == 1
