"""PipeSD's decisions: the dual-threshold trigger, DP-planned batches, the monitor's estimates,
thresholds files and the tuners."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipesd._core import solve_batch_schedule_constant
from pipesd.cloud.verifier import Verdict
from pipesd.edge.drafter import DraftToken
from pipesd.edge.monitor import LinkMonitor
from pipesd.policies import POLICIES, make_policy
from pipesd.policies.pipesd import PIPESD_POLICIES, PipeSDPolicy, Thresholds
from pipesd.tune import OnlineRetuner, optimise


def tok(p: float) -> DraftToken:
    return DraftToken(token=1, confidence=p, dist=None)


def fires(policy: PipeSDPolicy, confidences: list[float]) -> list[bool]:
    return [policy.should_verify(i + 1, tok(p)) for i, p in enumerate(confidences)]


def test_dual_trigger_fires_on_the_product_or_one_token_and_resets() -> None:
    pol = PipeSDPolicy(thresholds=Thresholds(r1=0.5, r2=0.3))
    # 0.9 * 0.8 = 0.72, * 0.7 = 0.504, * 0.9 = 0.4536 <= 0.5: fires on the 4th.
    assert fires(pol, [0.9, 0.8, 0.7, 0.9]) == [False, False, False, True]
    assert pol.cumulative == 1.0  # reset after the trigger
    # A single unsure token fires at once although the product is still high.
    assert fires(pol, [0.95, 0.25]) == [False, True]
    assert fires(pol, [0.95, 0.3]) == [False, True]  # the bounds are inclusive


def test_trigger_ablations_use_one_test_each() -> None:
    seq = PipeSDPolicy(thresholds=Thresholds(0.5, 0.3), trigger="seq")
    assert fires(seq, [0.95, 0.25]) == [False, True]  # 0.2375 <= 0.5 by the product
    assert fires(seq, [0.99, 0.31]) == [False, True]
    token = PipeSDPolicy(thresholds=Thresholds(0.5, 0.3), trigger="token")
    assert fires(token, [0.8, 0.8, 0.8, 0.8, 0.29]) == [False] * 4 + [True]
    fixed = PipeSDPolicy(trigger="fixed", fixed_len=3)
    assert fires(fixed, [0.01, 0.01, 0.99]) == [False, False, True]
    capped = PipeSDPolicy(thresholds=Thresholds(0.01, 0.01), max_window=5)
    assert fires(capped, [1.0] * 5) == [False] * 4 + [True]


def test_pipeline_sends_on_the_dp_plan_and_repeats_it() -> None:
    mon = LinkMonitor(n_hat=8)
    pol = PipeSDPolicy(monitor=mon)
    mon.alpha_s, mon.beta_s, mon.gamma_s = 0.002, 0.004, 0.001  # the link is the bottleneck
    plan = solve_batch_schedule_constant(0.002, 0.004, 0.001, 8)
    assert 1 < plan.num_batches < 8  # batches group tokens here
    sends = [pol.should_send(j) for j in range(1, 17)]
    ends = set(plan.batch_ends)
    assert sends[:8] == [j in ends for j in range(1, 9)]
    assert sends[8:] == sends[:8]  # past N-hat the plan repeats
    # A slow draft and a cheap batch: every token goes out as soon as it is drafted.
    mon.alpha_s, mon.beta_s, mon.gamma_s = 1e-4, 1e-5, 0.08
    assert all(pol.should_send(j) for j in range(1, 9))
    no_pipe = PipeSDPolicy(pipeline=False)
    assert not any(no_pipe.should_send(j) for j in range(1, 9)) and no_pipe.wait_drafts == 0


def test_monitor_fits_alpha_beta_and_replans_only_on_real_moves() -> None:
    mon = LinkMonitor(n_hat=20, window=32)
    mon.on_rtt(0.040)
    mon.on_rtt(0.041)
    alpha, beta = 0.003, 0.0005
    for b in (1, 2, 4, 8, 3, 6):
        # send-to-verdict = round trip + verify + transmission of the last batch
        mon.on_window(drafted=6, last_batch=b, send_to_verdict_s=0.040 + 0.5 + alpha + beta * b,
                      verify_s=0.5)  # fmt: skip
    assert math.isclose(mon.alpha_s, alpha, rel_tol=1e-6)
    assert math.isclose(mon.beta_s, beta, rel_tol=1e-6)
    mon.on_draft(0.080)
    assert mon.needs_plan()
    mon.planned(mon.estimate())
    mon.on_draft(0.085)  # EWMA moves gamma by about 1%: keep the plan
    assert not mon.needs_plan()
    for _ in range(10):
        mon.on_draft(0.160)  # the edge slowed to half speed
    assert mon.needs_plan()


def test_thresholds_validation_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="R1 must be in"):
        Thresholds(0.0, 0.5)
    good = tmp_path / "th.json"
    good.write_text(json.dumps({"r1": 0.4, "r2": 0.2, "ms_per_token": 100}))
    assert Thresholds.load(good) == Thresholds(0.4, 0.2)
    with pytest.raises(ValueError, match="not found"):
        Thresholds.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not valid"):
        Thresholds.load(bad)


def test_policy_names() -> None:
    for name in PIPESD_POLICIES:
        assert name in POLICIES
        pol = make_policy(name, draft_len=6, thresholds=Thresholds(0.3, 0.2))
        assert isinstance(pol, PipeSDPolicy) and pol.name == name
    assert make_policy("pipesd-no-pipeline", draft_len=6).pipeline is False  # type: ignore[union-attr]


def test_optimiser_finds_the_better_region() -> None:
    # A synthetic time per token with its minimum at (0.3, 0.6).
    def objective(th: Thresholds) -> tuple[float, int]:
        return 100 + 400 * ((th.r1 - 0.3) ** 2 + (th.r2 - 0.6) ** 2), 10

    res = optimise(objective, budget=16, progress=False)
    assert len(res.evaluations) == 16
    assert res.ms_per_token == min(e.ms_per_token for e in res.evaluations)
    assert res.ms_per_token < 110  # within ~0.16 of the optimum
    assert res.tuner_s > 0


def test_online_retuner_retunes_after_drift() -> None:
    rt = OnlineRetuner(Thresholds(0.9, 0.9), drift=0.3, budget=6, trial_windows=2, warmup=4,
                       patience=3)  # fmt: skip
    for _ in range(4):
        assert rt.on_window(5, 0.5) == Thresholds(0.9, 0.9)  # baseline 100 ms/token
    assert rt.baseline == pytest.approx(0.1)
    # Conditions worsen: time per token now depends on the thresholds, best near (0.3, 0.3).
    th = rt.current
    for _ in range(200):
        cost = 0.2 + 0.5 * ((th.r1 - 0.3) ** 2 + (th.r2 - 0.3) ** 2)
        th = rt.on_window(5, 5 * cost)
        if rt.retunes:
            break
    assert rt.retunes == 1 and not rt.tuning
    assert rt.current != Thresholds(0.9, 0.9)
    assert rt.baseline is not None and rt.baseline < 0.2 + 0.5 * (0.6**2 + 0.6**2)


def test_window_timing_reaches_the_monitor() -> None:
    pol = PipeSDPolicy()
    pol.on_rtt(0.04)
    v = Verdict(epoch=1, start=10, drafted=5, accepted=5, next_token=3, verify_s=0.3)
    pol.on_window_timing(v, last_batch=2, send_to_verdict_s=0.35)
    assert pol.monitor.samples[-1] == (2, pytest.approx(0.01))
