"""The batch-schedule solver through the bindings: optimality, limits and the error mapping."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest

from pipesd import _core
from pipesd._core import (
    MAX_SCHEDULE_TOKENS,
    BatchPlan,
    PipesdError,
    ScheduleError,
    plan_makespan,
    solve_batch_schedule,
    solve_batch_schedule_constant,
)
from pipesd.scheduler import solve_batch_schedule_py


def simulate(alpha: float, beta: float, ready: list[float], ends: list[int]) -> float:
    """The cost model, batch by batch: a batch leaves when drafted and the link is free."""
    t, start = 0.0, 0
    for end in ends:
        t = max(t, ready[end - 1]) + alpha + beta * (end - start)
        start = end
    return t


def brute_force(alpha: float, beta: float, ready: list[float]) -> float:
    """The best makespan over all 2^(n-1) batchings."""
    n = len(ready)
    best = math.inf
    for cuts in itertools.product((False, True), repeat=n - 1):
        ends = [k + 1 for k, cut in enumerate(cuts) if cut] + [n]
        best = min(best, simulate(alpha, beta, ready, ends))
    return best


def random_cost(rng: random.Random, lo: float, hi: float) -> float:
    return 0.0 if rng.random() < 0.1 else math.exp(rng.uniform(math.log(lo), math.log(hi)))


def random_ready(rng: random.Random, n: int) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        p = rng.random()
        t += 0.0 if p < 0.15 else 5.0 * rng.random() if p < 0.25 else random_cost(rng, 1e-3, 1.0)
        out.append(t)
    return out


def check_plan(plan: BatchPlan, alpha: float, beta: float, ready: list[float]) -> None:
    n = len(ready)
    ends = plan.batch_ends
    assert ends[-1] == n and all(a < b for a, b in zip([0, *ends[:-1]], ends, strict=True))
    assert sum(plan.batch_sizes) == n and plan.num_batches == len(ends) == len(plan.batch_sizes)
    best = brute_force(alpha, beta, ready)
    assert plan.makespan == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert plan_makespan(alpha, beta, ready, ends) == plan.makespan
    assert simulate(alpha, beta, ready, ends) == pytest.approx(plan.makespan, rel=1e-12)
    # The pure-Python recurrence does the same arithmetic: the same plan, bit for bit.
    assert solve_batch_schedule_py(alpha, beta, ready) == (ends, plan.makespan)


@pytest.mark.parametrize("n", range(1, 11))
def test_constant_draft_time_matches_brute_force(n: int) -> None:
    rng = random.Random(1000 + n)
    for _ in range(15):
        alpha, beta, gamma = (random_cost(rng, 1e-4, 1.0) for _ in range(3))
        plan = solve_batch_schedule_constant(alpha, beta, gamma, n)
        ready = [gamma * j for j in range(1, n + 1)]
        check_plan(plan, alpha, beta, ready)
        same = solve_batch_schedule(alpha, beta, ready)
        assert (same.batch_ends, same.makespan) == (plan.batch_ends, plan.makespan)


@pytest.mark.parametrize("n", range(1, 11))
def test_measured_ready_times_match_brute_force(n: int) -> None:
    rng = random.Random(n)
    for _ in range(15):
        alpha, beta = random_cost(rng, 1e-4, 2.0), random_cost(rng, 1e-4, 2.0)
        ready = random_ready(rng, n)
        check_plan(solve_batch_schedule(alpha, beta, ready), alpha, beta, ready)


def test_large_window_agrees_with_the_python_recurrence() -> None:
    rng = random.Random(5)
    for _ in range(5):
        alpha, beta = random_cost(rng, 1e-4, 1.0), random_cost(rng, 1e-4, 1.0)
        ready = random_ready(rng, 256)
        plan = solve_batch_schedule(alpha, beta, tuple(ready))
        assert solve_batch_schedule_py(alpha, beta, ready) == (plan.batch_ends, plan.makespan)
        assert plan.makespan <= simulate(alpha, beta, ready, list(range(1, 257)))
        assert plan.makespan <= simulate(alpha, beta, ready, [256])


def test_tiny_start_up_cost_sends_each_token_alone_when_drafting_is_slower() -> None:
    # alpha -> 0 and every token takes longer to draft than to send: one token per batch.
    for n in (1, 2, 20, 256):
        plan = solve_batch_schedule_constant(1e-12, 0.01, 0.05, n)
        assert plan.batch_sizes == [1] * n
        assert plan.makespan == pytest.approx(0.05 * n + 1e-12 + 0.01, rel=1e-12)


def test_huge_start_up_cost_sends_one_batch() -> None:
    for n in (1, 2, 20, 256):
        plan = solve_batch_schedule_constant(1e6, 0.001, 0.05, n)
        assert plan.batch_ends == [n]
        assert plan.makespan == pytest.approx(0.05 * n + 1e6 + 0.001 * n)


def test_ties_prefer_fewer_batches_then_the_larger_last_batch() -> None:
    assert solve_batch_schedule(0.0, 0.25, [0.0] * 6).batch_ends == [6]
    plan = solve_batch_schedule(0.5, 0.5, [0.0, 0.5, 1.5])
    assert (plan.batch_ends, plan.makespan) == ([1, 3], 3.0)
    assert plan_makespan(0.5, 0.5, [0.0, 0.5, 1.5], [2, 3]) == 3.0


def test_repr_and_sizes() -> None:
    plan = solve_batch_schedule(0.5, 0.5, [0.0, 0.5, 1.5])
    assert repr(plan) == "BatchPlan(batch_ends=[1, 3], makespan=3.0)"
    assert plan.batch_sizes == [1, 2] and plan.num_tokens == 3
    with pytest.raises(AttributeError):
        plan.makespan = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: solve_batch_schedule_constant(-0.1, 0.1, 0.1, 4),
            "alpha (per-batch send cost) must be finite and >= 0, got -0.1",
        ),
        (lambda: solve_batch_schedule_constant(0.1, math.nan, 0.1, 4), "beta"),
        (lambda: solve_batch_schedule_constant(0.1, 0.1, math.inf, 4), "gamma"),
        (lambda: solve_batch_schedule_constant(0.1, 0.1, 0.1, 0), "got 0"),
        (
            lambda: solve_batch_schedule_constant(0.1, 0.1, 0.1, MAX_SCHEDULE_TOKENS + 1),
            f"a window needs 1 to {MAX_SCHEDULE_TOKENS} draft tokens, got 65537",
        ),
        (lambda: solve_batch_schedule_constant(0.1, 0.1, 0.1, 1 << 40), f"got {1 << 40}"),
        (lambda: solve_batch_schedule(0.1, 0.1, []), "got 0"),
        (
            lambda: solve_batch_schedule(0.1, 0.1, [0.1, 0.3, 0.2]),
            "ready times must be non-decreasing, got ready[2] = 0.2 after ready[1] = 0.3",
        ),
        (lambda: solve_batch_schedule(0.1, 0.1, [-1.0]), "ready[0] = -1"),
        (lambda: solve_batch_schedule(0.1, 0.1, [0.0, math.nan]), "ready[1] = nan"),
        (lambda: solve_batch_schedule_constant(0.0, 0.0, 1e308, 4), "overflow"),
        (lambda: plan_makespan(0.1, 0.1, [0.1, 0.2], []), "at least one batch"),
        (lambda: plan_makespan(0.1, 0.1, [0.1, 0.2], [1]), "must end at token 2"),
        (lambda: plan_makespan(0.1, 0.1, [0.1, 0.2, 0.3], [2, 2, 3]), "batch_ends[1] = 2"),
    ],
)
def test_bad_inputs_raise_schedule_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ScheduleError) as err:
        call()
    assert message in str(err.value)
    assert isinstance(err.value, PipesdError)
    assert issubclass(_core.ScheduleError, _core.PipesdError)


@pytest.mark.parametrize(
    ("alpha", "beta", "ready", "message"),
    [
        (-0.1, 0.1, [1.0], "alpha"),
        (0.1, math.inf, [1.0], "beta"),
        (0.1, 0.1, [], "got 0"),
        (0.1, 0.1, [0.3, 0.2], "non-decreasing"),
        (0.1, 0.1, [math.nan], "ready[0] = nan"),
    ],
)
def test_python_reference_rejects_the_same_inputs(
    alpha: float, beta: float, ready: list[float], message: str
) -> None:
    with pytest.raises(ScheduleError) as err:
        solve_batch_schedule_py(alpha, beta, ready)
    assert message in str(err.value)
