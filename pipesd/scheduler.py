"""The PipeSD batch-schedule DP in pure Python: the reference for the compiled solver.

The edge streams a window of n draft tokens to the cloud in batches. Token j (1-based) finishes
drafting at ``ready[j-1]``; a batch of b tokens occupies the link for ``alpha + beta * b``; a
batch leaves once its last token is drafted and the link, free at time 0, is free again::

    dp[0] = 0
    dp[j] = min over 0 <= i < j of max(dp[i], ready(j)) + alpha + beta * (j - i)

This module computes exactly what ``pipesd._core.solve_batch_schedule`` computes (same
operations in the same order, same tie-break), tens to hundreds of times slower. Use the compiled
solver; this one exists to check it and to time it against (``bench/bench_scheduler.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipesd._core import MAX_SCHEDULE_TOKENS, ScheduleError

__all__ = ["TIE_TOLERANCE", "solve_batch_schedule_py"]

TIE_TOLERANCE = 1e-12
"""Relative tolerance under which two candidate finish times count as equal."""


def _check(alpha: float, beta: float, ready: Sequence[float]) -> None:
    for name, meaning, value in (
        ("alpha", "per-batch send cost", alpha),
        ("beta", "per-token send cost", beta),
    ):
        if not (math.isfinite(value) and value >= 0.0):
            raise ScheduleError(f"{name} ({meaning}) must be finite and >= 0, got {value!r}")
    n = len(ready)
    if not 1 <= n <= MAX_SCHEDULE_TOKENS:
        raise ScheduleError(f"a window needs 1 to {MAX_SCHEDULE_TOKENS} draft tokens, got {n}")
    prev = 0.0
    for k, r in enumerate(ready):
        if not (math.isfinite(r) and r >= 0.0):
            raise ScheduleError(f"ready times must be finite and >= 0, got ready[{k}] = {r!r}")
        if r < prev:
            raise ScheduleError(
                f"ready times must be non-decreasing, got ready[{k}] = {r!r} "
                f"after ready[{k - 1}] = {prev!r}"
            )
        prev = r
    if not math.isfinite(ready[-1] + n * (alpha + beta)):
        raise ScheduleError(
            f"schedule times overflow: ready(n) = {ready[-1]!r}, alpha = {alpha!r}, "
            f"beta = {beta!r}, n = {n}"
        )


def solve_batch_schedule_py(
    alpha: float, beta: float, ready: Sequence[float]
) -> tuple[list[int], float]:
    """The optimal batching: (cumulative token counts at each batch's end, makespan).

    Among candidates within TIE_TOLERANCE of the best finish time for a prefix, the one whose
    own plan has the fewest batches wins, then the largest last batch. Raises ScheduleError for
    the inputs the compiled solver rejects.
    """
    alpha = float(alpha)
    beta = float(beta)
    times = [float(r) for r in ready]
    _check(alpha, beta, times)
    n = len(times)
    dp = [0.0] * (n + 1)
    back = [0] * (n + 1)
    batches = [0] * (n + 1)
    for j in range(1, n + 1):
        r = times[j - 1]
        r_alpha = r + alpha
        # Scanning i downwards the lower bound (r + alpha) + beta * (j - i) only grows.
        best = math.inf
        for i in range(j - 1, -1, -1):
            send = beta * float(j - i)
            if r_alpha + send > best:
                break
            cand = (max(dp[i], r) + alpha) + send
            if cand < best:
                best = cand
        limit = best + TIE_TOLERANCE * best
        pick = -1
        pick_value = best
        for i in range(j - 1, -1, -1):
            send = beta * float(j - i)
            if r_alpha + send > limit:
                break
            cand = (max(dp[i], r) + alpha) + send
            if cand <= limit and (pick < 0 or batches[i] <= batches[pick]):
                pick = i
                pick_value = cand
        dp[j] = pick_value
        back[j] = pick
        batches[j] = batches[pick] + 1
    ends = [0] * batches[n]
    j = n
    for k in range(batches[n] - 1, -1, -1):
        ends[k] = j
        j = back[j]
    return ends, dp[n]
