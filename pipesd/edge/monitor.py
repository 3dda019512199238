"""Online estimates of the costs the batch schedule depends on (docs: ../README, PipeSD policy).

gamma: seconds to draft one token, from the drafter's own timing.
alpha, beta: the uplink's cost of a batch of b draft tokens, alpha + beta * b. They are fitted
from send/verdict timing: for every window, the time from sending its last batch to receiving
the verdict, minus the cloud's verify time and the link's round trip (the minimum RTT of small
PING frames), is what transmitting that last batch of b tokens cost; a least-squares line
through recent (b, cost) pairs gives alpha and beta. Both stay >= 0.

N-hat: a moving average of recent window lengths (drafts per verification), starting at 20.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True)
class CostEstimate:
    alpha_s: float
    beta_s: float
    gamma_s: float
    n_hat: int


class LinkMonitor:
    """Keeps alpha, beta, gamma and N-hat; says when they moved enough to plan again."""

    def __init__(self, *, n_hat: int = 20, window: int = 16, ewma: float = 0.2,
                 replan_fraction: float = 0.2, max_n_hat: int = 256) -> None:  # fmt: skip
        self.gamma_s = 0.0
        self.n_hat_avg = float(n_hat)
        self.max_n_hat = max_n_hat
        self.ewma = ewma
        self.replan_fraction = replan_fraction
        self.rtt_s: collections.deque[float] = collections.deque(maxlen=window)
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.alpha_s = 0.0
        self.beta_s = 0.0
        self._planned: CostEstimate | None = None
        self.replans = 0

    # --------------------------------------------------------------- observations
    def on_draft(self, seconds: float) -> None:
        g = self.gamma_s
        self.gamma_s = seconds if g == 0.0 else (1 - self.ewma) * g + self.ewma * seconds

    def on_rtt(self, seconds: float) -> None:
        self.rtt_s.append(seconds)

    def on_window(self, drafted: int, last_batch: int, send_to_verdict_s: float,
                  verify_s: float) -> None:  # fmt: skip
        """One verified window: its size, its last batch and how long the verdict took."""
        self.n_hat_avg = (1 - self.ewma) * self.n_hat_avg + self.ewma * max(1, drafted)
        rtt = min(self.rtt_s) if self.rtt_s else 0.0
        self.samples.append((last_batch, max(0.0, send_to_verdict_s - verify_s - rtt)))
        self._fit()

    def _fit(self) -> None:
        n = len(self.samples)
        xs = [float(b) for b, _ in self.samples]
        ys = [c for _, c in self.samples]
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
        beta = max(0.0, beta)
        self.beta_s = beta
        self.alpha_s = max(0.0, my - beta * mx)

    # -------------------------------------------------------------------- planning
    def estimate(self) -> CostEstimate:
        n_hat = max(1, min(self.max_n_hat, round(self.n_hat_avg)))
        return CostEstimate(self.alpha_s, self.beta_s, self.gamma_s, n_hat)

    def needs_plan(self) -> bool:
        """True before the first plan and when an estimate moved by more than the fraction."""
        now = self.estimate()
        old = self._planned
        if old is None:
            return True
        if now.n_hat != old.n_hat:
            return True

        def moved(a: float, b: float) -> bool:
            # Changes below 0.1 ms cannot move a plan whose steps are milliseconds.
            scale = max(abs(a), abs(b))
            return scale > 1e-4 and abs(a - b) > self.replan_fraction * scale

        return (
            moved(now.alpha_s, old.alpha_s)
            or moved(now.beta_s, old.beta_s)
            or moved(now.gamma_s, old.gamma_s)
        )

    def planned(self, est: CostEstimate) -> None:
        self._planned = est
        self.replans += 1
