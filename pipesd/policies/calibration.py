"""The probability that the target accepts a draft, given the draft's confidence.

Confidences (the draft's probability of its own token) fall into equal bins; each bin holds a
Beta estimate of the acceptance rate whose prior mean is the bin's centre (``prior``
pseudo-observations). Every verdict adds the window's outcomes in order: the accepted drafts
as accepted, the first rejected one as rejected; drafts after it were never judged. The table
is learnt online per session and can be seeded from a file (``pipesd tune`` writes one). What a
``Generator`` learns is also kept per draft/target pair (``learnt_acceptance_path``), so the
next process using the pair starts from it rather than from the bins' centres.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipesd.cloud.verifier import Verdict
    from pipesd.edge.drafter import DraftToken


def default_acceptance_path() -> Path:
    """Where ``pipesd tune`` writes the pair's calibration and ``generate`` reads it."""
    from pipesd.models import pipesd_home

    return pipesd_home() / "acceptance.json"


#: Most judged drafts a bin of a learnt file counts as when it is loaded: the file's shape
#: seeds a session, and the session's own verdicts still move it within a few windows.
LEARNT_CAP = 64.0


def learnt_acceptance_path(draft: str, target: str) -> Path:
    """Where a ``Generator`` keeps what it learnt of the pair ``draft`` (the draft file's
    name) and ``target`` (the target's identity: file, backend, device)."""
    from pipesd.models import pipesd_home

    key = hashlib.sha256(f"{draft}|{target}".encode()).hexdigest()[:24]
    return pipesd_home() / "acceptance" / f"{key}.json"


class AcceptanceModel:
    """P(accepted | confidence) as a table of confidence bins."""

    def __init__(self, *, bins: int = 10, prior: float = 4.0) -> None:
        if bins < 1 or prior <= 0:
            raise ValueError(f"need bins >= 1 and prior > 0, got {bins}, {prior}")
        self.bins = bins
        self.prior = prior
        centres = [(i + 0.5) / bins for i in range(bins)]
        self.hits = [c * prior for c in centres]
        self.trials = [prior] * bins

    def bin_of(self, confidence: float) -> int:
        return min(self.bins - 1, max(0, int(confidence * self.bins)))

    def prob(self, confidence: float) -> float:
        b = self.bin_of(confidence)
        return self.hits[b] / self.trials[b]

    def observe(self, confidence: float, accepted: bool) -> None:
        b = self.bin_of(confidence)
        self.trials[b] += 1.0
        self.hits[b] += float(accepted)

    def update(self, confidences: Sequence[float], accepted: int) -> None:
        """One verdict: ``confidences`` of the window's drafts in order, ``accepted`` of them
        accepted; the next one (if any) was rejected and later ones were never judged."""
        for i, c in enumerate(confidences):
            if i < accepted:
                self.observe(c, True)
            else:
                self.observe(c, False)
                break

    @property
    def observations(self) -> float:
        return sum(self.trials) - self.prior * self.bins

    def mean_rate(self) -> float | None:
        """The acceptance rate over every observed draft (None before any)."""
        seen = self.observations
        if seen < 1.0:
            return None
        prior_hits = sum((i + 0.5) / self.bins * self.prior for i in range(self.bins))
        return (sum(self.hits) - prior_hits) / seen

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "prior": self.prior, "hits": self.hits, "trials": self.trials}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AcceptanceModel:
        m = AcceptanceModel(bins=int(data["bins"]), prior=float(data["prior"]))
        hits = [float(v) for v in data["hits"]]
        trials = [float(v) for v in data["trials"]]
        if len(hits) != m.bins or len(trials) != m.bins:
            raise ValueError(f"expected {m.bins} bins, got {len(hits)} and {len(trials)}")
        if any(t <= 0 or h < 0 or h > t for h, t in zip(hits, trials, strict=True)):
            raise ValueError("every bin needs 0 <= hits <= trials and trials > 0")
        m.hits, m.trials = hits, trials
        return m

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: Generators of one pair in several processes may save at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        tmp.replace(path)

    @staticmethod
    def load(path: str | Path) -> AcceptanceModel:
        try:
            return AcceptanceModel.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ValueError(f"acceptance file {path} not found") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"acceptance file {path} is not valid: {e}") from None

    def capped(self, trials: float = LEARNT_CAP) -> AcceptanceModel:
        """A copy whose bins count as at most ``trials`` judged drafts (and the prior), each
        bin's rate unchanged."""
        m = self.copy()
        limit = trials + m.prior
        for b in range(m.bins):
            if m.trials[b] > limit:
                m.hits[b] *= limit / m.trials[b]
                m.trials[b] = limit
        return m

    def copy(self) -> AcceptanceModel:
        return AcceptanceModel.from_dict(self.to_dict())


def resolve_acceptance(
    value: AcceptanceModel | str | Path | None, learnt: Path | None = None
) -> AcceptanceModel | None:
    """An AcceptanceModel, a file path, or None: then the pair's ``learnt`` file if given and
    present (capped at ``LEARNT_CAP`` per bin), else the default file if present, else None."""
    if isinstance(value, AcceptanceModel):
        return value
    if value is not None:
        return AcceptanceModel.load(value)
    for path, cap in ((learnt, True), (default_acceptance_path(), False)):
        if path is None or not path.is_file():
            continue
        try:
            model = AcceptanceModel.load(path)
        except ValueError:
            continue  # a damaged default is ignored; an explicit file is an error
        return model.capped() if cap else model
    return None


def calibration_policy(model: AcceptanceModel, draft_len: int = 8) -> Any:
    """A stop-and-wait policy of ``draft_len`` drafts that teaches ``model`` every verdict:
    what ``pipesd tune`` runs over the tuning split to write the pair's calibration."""
    from pipesd.policies.base import FixedLengthPolicy

    class Calibrating(FixedLengthPolicy):
        name = "calibrate"

        def __init__(self) -> None:
            super().__init__(draft_len)
            self.window: list[float] = []

        def should_verify(self, pending: int, last: DraftToken) -> bool:
            del self.window[pending - 1 :]
            self.window.append(last.confidence)
            return super().should_verify(pending, last)

        def on_verdict(self, verdict: Verdict) -> None:
            model.update(self.window[: verdict.drafted], verdict.accepted)
            self.window = []

    return Calibrating()
