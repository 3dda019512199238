"""Turning logits into the distributions both sides sample from.

The edge and the cloud apply the same processing (temperature, then top-k, then top-p on the
renormalised survivors), so that the draft's distribution q and the target's distribution p are
defined the same way. The draft's q is kept sparse: the tokens that survive truncation and their
probabilities, which is all the target needs for exact speculative sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Without top-k, top-p needs the sorted distribution; most of its mass sits in the first few
# thousand tokens, so those are sorted first and the whole vocabulary only when they fall short.
_TOP_P_FIRST_PASS = 4096


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SparseDist:
    """A truncated distribution: token ids and their probabilities (summing to 1)."""

    ids: npt.NDArray[np.int64]
    probs: npt.NDArray[np.float64]

    def prob_of(self, token: int) -> float:
        hit = np.nonzero(self.ids == token)[0]
        return float(self.probs[hit[0]]) if hit.size else 0.0

    def dense(self, vocab_size: int) -> npt.NDArray[np.float64]:
        out = np.zeros(vocab_size, dtype=np.float64)
        out[self.ids] = self.probs
        return out

    def sample(self, rng: np.random.Generator) -> int:
        return int(self.ids[_sample_index(self.probs, rng)])

    def top(self, k: int) -> SparseDist:
        """The k most probable entries, renormalised (self when it has at most k)."""
        if self.ids.size <= k:
            return self
        keep = np.argsort(-self.probs, kind="stable")[:k]
        p = self.probs[keep]
        return SparseDist(self.ids[keep], p / p.sum())


def softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64, copy=False)
    e = np.exp(x - x.max())
    return e / e.sum()


def greedy_with_confidence(logits: npt.NDArray[np.floating]) -> tuple[int, float]:
    """The argmax token and its probability under the untempered softmax."""
    token = int(np.argmax(logits))
    x = logits.astype(np.float64, copy=False)
    m = x[token]
    return token, float(1.0 / np.exp(x - m).sum())


def truncated(logits: npt.NDArray[np.floating], params: SamplingParams) -> SparseDist:
    """The distribution sampling draws from: tempered, top-k, then top-p, renormalised."""
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution")
    x = logits.astype(np.float64, copy=False) / params.temperature
    vocab = x.shape[0]
    if 0 < params.top_k < vocab:
        ids = np.argpartition(-x, params.top_k - 1)[: params.top_k]
    elif params.top_p < 1.0 and vocab > _TOP_P_FIRST_PASS:
        ids = np.argpartition(-x, _TOP_P_FIRST_PASS - 1)[:_TOP_P_FIRST_PASS]
    else:
        ids = np.arange(vocab)
    # Softmax over the candidates, but normalised against the full vocabulary when no top-k
    # applied, so the top-p cut-off is measured on the true distribution.
    cand = x[ids]
    top = cand.max()
    e = np.exp(cand - top)
    probs = e / (e.sum() if 0 < params.top_k < vocab else np.exp(x - top).sum())
    order = np.argsort(-probs, kind="stable")
    ids, probs = ids[order], probs[order]
    if params.top_p < 1.0:
        cum = np.cumsum(probs)
        if cum[-1] < params.top_p and ids.size < vocab:
            return truncated_full_sort(x, params.top_p)
        keep = int(np.searchsorted(cum, params.top_p, side="left")) + 1
        ids, probs = ids[:keep], probs[:keep]
    return SparseDist(ids.astype(np.int64), probs / probs.sum())


def truncated_full_sort(x: npt.NDArray[np.float64], top_p: float) -> SparseDist:
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1
    p = probs[:keep]
    return SparseDist(order[:keep].astype(np.int64), p / p.sum())


def sample_dense(p: npt.NDArray[np.float64], rng: np.random.Generator) -> int:
    """Samples an index from a non-negative vector (normalised here)."""
    return _sample_index(p, rng)


def _sample_index(p: npt.NDArray[np.float64], rng: np.random.Generator) -> int:
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    idx = int(np.searchsorted(cdf, u, side="right"))
    return min(idx, p.shape[0] - 1)
