"""The baselines PipeSD is compared with, behind the same ``DraftPolicy`` interface.

Each class states its defining decision in its docstring; ``tests/python/test_baselines.py``
checks that decision. Defaults follow the papers' settings where they give one (code / math
tasks differ for ``vanilla`` and ``hsl``); ``task_defaults`` returns them.
"""

from __future__ import annotations

from pipesd.cloud.verifier import Verdict
from pipesd.edge.drafter import DraftToken
from pipesd.policies.base import DraftPolicy, FixedLengthPolicy
from pipesd.policies.calibration import AcceptanceModel

#: No policy lets one window grow past this many drafts.
MAX_WINDOW = 64

#: Per-task defaults: vanilla's draft length and HSL's confidence threshold.
TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "code": {"draft_len": 6, "hsl_threshold": 0.99},
    "math": {"draft_len": 4, "hsl_threshold": 0.7},
}


def task_defaults(task: str) -> dict[str, float]:
    if task not in TASK_DEFAULTS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_DEFAULTS)}")
    return TASK_DEFAULTS[task]


class HSLPolicy(DraftPolicy):
    """HSL: verify as soon as one draft's confidence falls below a threshold; the whole draft
    goes out at once with the verify request, and the edge waits for the verdict."""

    name = "hsl"

    def __init__(self, threshold: float = 0.99, *, max_window: int = MAX_WINDOW) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"HSL threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.max_window = max_window

    def should_verify(self, pending: int, last: DraftToken) -> bool:
        return last.confidence < self.threshold or pending >= self.max_window


class EdgeLLMPolicy(DraftPolicy):
    """EdgeLLM: verify when the product C of draft confidences since the last verification
    falls to R or below; R adapts after every verdict: halved after a fully accepted window
    (longer drafts), otherwise ``R <- R / C^((N - N_acc) / N)`` with C that window's product,
    N its drafts and N_acc the accepted ones (C < 1, so R rises and drafts get shorter). The
    edge keeps drafting during verification (``wait_drafts``)."""

    name = "edgellm"

    def __init__(self, initial: float = 0.5, *, wait_drafts: int = 8, floor: float = 1e-4,
                 max_window: int = MAX_WINDOW) -> None:  # fmt: skip
        if not 0.0 < initial < 1.0:
            raise ValueError(f"EdgeLLM threshold must be in (0, 1), got {initial}")
        self.initial = initial
        self.threshold = initial
        self.wait_drafts = wait_drafts
        self.floor = floor
        self.max_window = max_window
        self.cumulative = 1.0
        self._window_products: list[float] = []  # C of each triggered window, oldest first

    def begin(self) -> None:
        self.threshold = self.initial
        self.cumulative = 1.0
        self._window_products = []

    def should_verify(self, pending: int, last: DraftToken) -> bool:
        self.cumulative *= last.confidence
        fire = self.cumulative <= self.threshold or pending >= self.max_window
        if fire:
            self._window_products.append(self.cumulative)
            self.cumulative = 1.0
        return fire

    def on_verdict(self, verdict: Verdict) -> None:
        # The verdict answers the oldest triggered window (a window cut by the token budget or
        # an end-of-generation token never triggered: its product is the running one).
        if self._window_products:
            c = self._window_products.pop(0)
        else:
            c, self.cumulative = self.cumulative, 1.0
        self.adapt(c, verdict.drafted, verdict.accepted)

    def adapt(self, c: float, n: int, n_acc: int) -> None:
        if n <= 0:
            return
        if n_acc >= n:
            self.threshold = max(self.floor, self.threshold / 2)
        else:
            c = min(max(c, 1e-12), 1.0)
            self.threshold = min(0.999, self.threshold / c ** ((n - n_acc) / n))

    def on_rollback(self) -> None:
        self.cumulative = 1.0
        self._window_products = []


class PicoSpecPolicy(FixedLengthPolicy):
    """PicoSpec: a fixed draft length, and the next round is drafted in parallel while the
    current one is verified (``wait_drafts`` = the draft length); the drafts made during the
    wait are kept when the round was fully accepted and the bonus token is the one assumed.

    Its uplink carries only draft tokens (and, when sampling, the sparse draft distributions:
    PipeSD's exact split verification), and the downlink one token per verdict."""

    name = "picospec"

    def __init__(self, draft_len: int) -> None:
        super().__init__(draft_len)
        self.wait_drafts = draft_len


class SpecPPPolicy(DraftPolicy):
    """SpecDec++-style: keep drafting while the estimated probability that every pending draft
    is accepted stays at or above ``threshold``; stop-and-wait.

    Each draft's acceptance probability is estimated from its confidence through a calibration
    table learned online (``pipesd.policies.calibration.AcceptanceModel``: confidence bins,
    each a Beta estimate whose prior mean is the bin's centre; every verdict adds the window's
    outcomes, the accepted drafts as accepted and the first rejected one as rejected)."""

    name = "specpp"

    def __init__(self, threshold: float = 0.4, *, bins: int = 10, prior: float = 4.0,
                 max_window: int = MAX_WINDOW) -> None:  # fmt: skip
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SpecPP threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.max_window = max_window
        self.acceptance = AcceptanceModel(bins=bins, prior=prior)
        self.p_all = 1.0
        self._window: list[float] = []  # confidences of the drafts of the current window

    def accept_prob(self, confidence: float) -> float:
        return self.acceptance.prob(confidence)

    def begin(self) -> None:
        self.p_all = 1.0
        self._window = []

    def should_verify(self, pending: int, last: DraftToken) -> bool:
        self._window.append(last.confidence)
        self.p_all *= self.accept_prob(last.confidence)
        fire = self.p_all < self.threshold or pending >= self.max_window
        if fire:
            self.p_all = 1.0
        return fire

    def on_verdict(self, verdict: Verdict) -> None:
        window, self._window = self._window[: verdict.drafted], []
        self.acceptance.update(window, verdict.accepted)
        self.p_all = 1.0

    def on_rollback(self) -> None:
        self.p_all = 1.0
        self._window = []
