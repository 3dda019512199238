"""The speculation ledger through the bindings: decisions and the error mapping."""

from __future__ import annotations

import pytest

from pipesd import LedgerError, PipesdError, SpeculationLedger


def test_rejection_rolls_back_and_advances_epoch() -> None:
    led = SpeculationLedger(32)
    led.begin([1, 2, 3])
    led.note_target_kv(2)
    assert led.append_drafts([7, 8, 9]) == 3
    led.note_draft_kv(5)
    w = led.submit(3)
    assert (w.start, w.count) == (3, 3)
    d = led.apply_verdict(w.epoch, 1, 42)
    assert not d.stale and d.rolled_back and d.discarded == 2
    assert led.committed() == [1, 2, 3, 7, 42]
    assert (d.draft_keep, d.target_keep) == (4, 4)
    assert led.epoch == w.epoch + 1
    # The same verdict again belongs to a discarded epoch: dropped, nothing changes.
    assert led.apply_verdict(w.epoch, 1, 42).stale
    assert led.committed() == [1, 2, 3, 7, 42]


def test_wait_drafts_survive_only_a_matching_bonus() -> None:
    for bonus, kept in ((5, [6]), (9, [])):
        led = SpeculationLedger(32)
        led.begin([1, 2])
        led.append_drafts([3, 4])
        w = led.submit(2)
        led.append_drafts([5, 6])  # drafted while the verdict was pending
        d = led.apply_verdict(w.epoch, 2, bonus)
        assert d.bonus
        assert led.pending() == kept
        assert d.kept_beyond == len(kept)
        assert d.rolled_back == (not kept)


def test_errors_map_to_python_hierarchy() -> None:
    led = SpeculationLedger(8)
    with pytest.raises(LedgerError, match="needs a prompt"):
        led.begin([])
    led.begin([1])
    with pytest.raises(LedgerError) as err:
        led.submit(3)
    assert isinstance(err.value, PipesdError)
    assert led.append_drafts(list(range(20))) == 6  # capacity is a return value, not an error
