"""The PipeSD policy: a dual-threshold NAV trigger, a DP-planned token-batch pipeline and
drafting during verification; and its ablations.

Trigger (verify now?): with P the draft's probability of its newest token and C the running
product of P since the last verification, verify when C <= R1 or P <= R2; C restarts at 1 after
each trigger. ``seq`` keeps only the R1 test, ``token`` only the R2 test, ``fixed`` verifies
after a fixed number of drafts instead.

Pipeline (send now?): the batch boundaries of the window come from the DP batch-schedule solver
(``pipesd._core.solve_batch_schedule_constant``) over the monitor's alpha, beta, gamma and N-hat;
after drafting token j of a window, the unsent drafts go out as one batch when j is a boundary.
The plan repeats past N-hat. On a trigger every unsent draft goes at once with the verify flag.
While the verdict is pending the edge keeps drafting and streaming (up to ``wait_drafts``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipesd._core import solve_batch_schedule_constant
from pipesd.cloud.verifier import Verdict
from pipesd.edge.drafter import DraftToken
from pipesd.edge.monitor import LinkMonitor
from pipesd.policies.base import DraftPolicy

TRIGGERS = ("dual", "seq", "token", "fixed")
#: The longest window the trigger lets grow before it verifies anyway.
MAX_WINDOW = 64


@dataclass(frozen=True)
class Thresholds:
    """R1 (cumulative confidence) and R2 (single-token confidence), both in (0, 1).

    The built-in values (used untuned) were chosen by a sweep of R1 in {0.2, 0.35, 0.5, 0.7}
    x R2 in {0.3, 0.5, 0.7} on the default pair, 3 HumanEval + 3 GSM8K tuning-split prompts x
    32 tokens (bench/RESULTS.md): (0.35, 0.7) gives windows of 3.6 drafts on average, which
    fill a pass of 4 (a stair of llama.cpp's CPU cost curve) at 83% acceptance, and had the
    lowest decode time of the sweep. The previous (0.35, 0.3) let confident code run to 6-8
    draft windows at 56% acceptance."""

    r1: float = 0.35
    r2: float = 0.7

    def __post_init__(self) -> None:
        for name, v in (("R1", self.r1), ("R2", self.r2)):
            if not (0.0 < v < 1.0 and math.isfinite(v)):
                raise ValueError(f"threshold {name} must be in (0, 1), got {v}")

    @staticmethod
    def load(path: str | Path) -> Thresholds:
        """Reads a thresholds file written by ``pipesd tune``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return Thresholds(float(data["r1"]), float(data["r2"]))
        except FileNotFoundError:
            raise ValueError(f"thresholds file {path} not found (run `pipesd tune`)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"thresholds file {path} is not valid: {e}") from None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def default_thresholds_path() -> Path:
    """Where ``pipesd tune`` writes and ``generate`` looks by default."""
    from pipesd.models import pipesd_home

    return pipesd_home() / "thresholds.json"


def resolve_thresholds(value: Thresholds | str | Path | None) -> Thresholds:
    """A Thresholds object, a file path, or None: the tuned default file if any, else the
    built-in values."""
    if isinstance(value, Thresholds):
        return value
    if value is not None:
        return Thresholds.load(value)
    path = default_thresholds_path()
    return Thresholds.load(path) if path.is_file() else Thresholds()


class PipeSDPolicy(DraftPolicy):
    """PipeSD and its ablations, one class with switches."""

    def __init__(
        self,
        *,
        name: str = "pipesd",
        thresholds: Thresholds | None = None,
        trigger: str = "dual",
        pipeline: bool = True,
        wait_drafts: int = 16,
        fixed_len: int = 6,
        max_window: int = MAX_WINDOW,
        monitor: LinkMonitor | None = None,
    ) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}; known: {', '.join(TRIGGERS)}")
        self.name = name
        self.thresholds = thresholds or Thresholds()
        self.trigger = trigger
        self.pipeline = pipeline
        self.wait_drafts = wait_drafts if pipeline else 0
        self.fixed_len = fixed_len
        self.max_window = max_window
        self.monitor = monitor or LinkMonitor()
        self.cumulative = 1.0
        self.batch_ends: list[int] = [1]  # window positions after which a batch goes out
        self.plan_s = 0.0  # time spent planning (overhead accounting)
        self.triggers = 0
        self.retuner: Any = None  # a pipesd.tune.OnlineRetuner, if the client re-tunes
        self._last_verdict_t: float | None = None

    def begin(self) -> None:
        self.cumulative = 1.0
        self._last_verdict_t = None

    def on_verdict(self, verdict: Verdict) -> None:
        now = time.perf_counter()
        if self.retuner is not None and self._last_verdict_t is not None:
            self.thresholds = self.retuner.on_window(
                verdict.accepted + 1, now - self._last_verdict_t
            )
        self._last_verdict_t = now

    def on_rollback(self) -> None:
        self.cumulative = 1.0

    # ------------------------------------------------------------------ trigger
    def should_verify(self, pending: int, last: DraftToken) -> bool:
        p = last.confidence
        self.cumulative *= p
        r1, r2 = self.thresholds.r1, self.thresholds.r2
        if self.trigger == "fixed":
            fire = pending >= self.fixed_len
        elif self.trigger == "seq":
            fire = self.cumulative <= r1
        elif self.trigger == "token":
            fire = p <= r2
        else:
            fire = self.cumulative <= r1 or p <= r2
        fire = fire or pending >= self.max_window
        if fire:
            self.cumulative = 1.0
            self.triggers += 1
        return fire

    # ----------------------------------------------------------------- pipeline
    def should_send(self, pending: int) -> bool:
        """After drafting the window's ``pending``-th token: send the unsent drafts now?"""
        if not self.pipeline:
            return False
        self._maybe_plan()
        n_hat = self.batch_ends[-1]
        j = (pending - 1) % n_hat + 1  # the plan repeats past N-hat
        return j in self._ends

    def _maybe_plan(self) -> None:
        if not self.monitor.needs_plan():
            return
        t0 = time.perf_counter()
        est = self.monitor.estimate()
        gamma = est.gamma_s if est.gamma_s > 0 else 1e-3
        plan = solve_batch_schedule_constant(est.alpha_s, est.beta_s, gamma, est.n_hat)
        self.batch_ends = list(plan.batch_ends)
        self._ends = set(self.batch_ends)
        self.monitor.planned(est)
        self.plan_s += time.perf_counter() - t0

    # ------------------------------------------------------------- observations
    def on_draft_time(self, seconds: float) -> None:
        self.monitor.on_draft(seconds)

    def on_rtt(self, seconds: float) -> None:
        self.monitor.on_rtt(seconds)

    def on_window_timing(self, verdict: Verdict, last_batch: int, send_to_verdict_s: float) -> None:
        self.monitor.on_window(verdict.drafted, last_batch, send_to_verdict_s, verdict.verify_s)


#: The PipeSD family: name -> (description, constructor keyword arguments).
PIPESD_POLICIES: dict[str, tuple[str, dict[str, object]]] = {
    "pipesd": (
        "dual-threshold trigger, DP-planned token-batch pipeline, drafting during verification",
        {},
    ),
    "pipesd-no-pipeline": (
        "PipeSD's trigger, but the window goes out at once on the trigger and the edge waits",
        {"pipeline": False},
    ),
    "pipesd-fixed-trigger": (
        "PipeSD's pipeline with a fixed draft length (--draft-len)",
        {"trigger": "fixed"},
    ),  # fmt: skip
    "pipesd-token-trigger": (
        "PipeSD with only the single-token threshold R2",
        {"trigger": "token"},
    ),  # fmt: skip
    "pipesd-seq-trigger": (
        "PipeSD with only the cumulative threshold R1",
        {"trigger": "seq"},
    ),  # fmt: skip
}


def make_pipesd_policy(name: str, *, thresholds: Thresholds | None = None,
                       draft_len: int = 6) -> PipeSDPolicy:  # fmt: skip
    _, kwargs = PIPESD_POLICIES[name]
    return PipeSDPolicy(name=name, thresholds=thresholds, fixed_len=draft_len,
                        **kwargs)  # type: ignore[arg-type]  # fmt: skip
