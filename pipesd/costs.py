"""What one verification pass of the target costs, by its size, as measured on its hardware.

A pass of n tokens (the last committed token and n - 1 drafts) is one forward call with logits
for every row. Its wall time is nothing like linear on a CPU: llama.cpp picks its kernels by
batch-size class, so the curve is a staircase (on the 1.5B Q4_K_M target here a pass of 4
costs about two one-token decodes and a pass of 5 about four); an F16 file or a GPU gives a
nearly flat curve. Policies that choose a window need the real curve, so the target measures
it: once at start on a synthetic context (``calibrate``, cached on disk per model file and
settings), then from every pass it runs (``PassCostCurve.observe``).

Sizes never measured are estimated conservatively: below the largest measured size, the cost
of the nearest measured size above (costs grow with size, so it is an upper bound); above it,
that largest cost scaled linearly with the size.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

log = logging.getLogger("pipesd.costs")

#: Pass sizes measured at calibration and announced to edges: 1 .. CALIBRATED_SIZES tokens.
CALIBRATED_SIZES = 32
#: Tokens of synthetic context before the timed passes (a short prompt's worth).
CALIBRATION_CONTEXT = 64
#: The sizes windows are made of (1 .. SHAPE_SIZES) are timed this many times at calibration
#: (the median kept): their ratios are the shape every estimate scales.
SHAPE_SIZES, SHAPE_REPEATS = 8, 3


class PassCostCurve:
    """Per-size estimates of one pass's wall time.

    With a prior (a calibration or a peer's table), the prior gives the curve's shape and the
    passes observed now give its level: the estimate of a pass of n tokens is prior(n) times
    the median ratio of observed to prior over the last ``window`` passes of any size. Sizes
    the prior lacks are estimated from their own observations, else interpolated.

    One level for the whole curve, not a median per observed size: the passes observed run at
    this sequence's context length and on the machine's current load, and those raise every
    size alike. A target decoding alone observes only one-token passes; were those its own
    estimate beside larger sizes known from quieter passes, the ratio V(2)/V(1) would shrink
    (1.35 against the calibrated 1.9 on the Q4_K_M target at HumanEval contexts) and a window
    would look cheaper than the target alone where it is not.
    """

    def __init__(self, *, max_size: int = CALIBRATED_SIZES, window: int = 9) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_size = max_size
        self.window = window
        self._obs: dict[int, collections.deque[float]] = {}
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._prior: dict[int, float] = {}
        self.version = 0  # bumped whenever an estimate may have changed
        self._level = (-1, 1.0)  # (version it was computed at, level)

    # ------------------------------------------------------------------ inputs
    def observe(self, size: int, seconds: float) -> None:
        """One pass of ``size`` tokens took ``seconds``."""
        if size < 1 or not seconds > 0.0:
            return
        self._obs.setdefault(size, collections.deque(maxlen=self.window)).append(seconds)
        self._recent.append((size, seconds))
        self.version += 1

    def set_prior(self, table_s: Sequence[float]) -> None:
        """Replaces the prior: ``table_s[i]`` is the cost of a pass of i + 1 tokens (zero or
        negative entries: unknown). The recent passes set its level."""
        self._prior = {i + 1: float(v) for i, v in enumerate(table_s) if v > 0.0}
        self.version += 1

    # ----------------------------------------------------------------- outputs
    def level(self) -> float:
        """Observed over prior: the median ratio over the last ``window`` passes whose size
        the prior has (1.0 when there are none)."""
        if self._level[0] != self.version:
            ratios = [s / self._prior[n] for n, s in self._recent if n in self._prior]
            self._level = (self.version, float(statistics.median(ratios)) if ratios else 1.0)
        return self._level[1]

    def measured(self, size: int) -> float | None:
        """The estimate at exactly ``size`` (the prior at the observed level, else the
        observations of that size), if any."""
        prior = self._prior.get(size)
        if prior is not None:
            return prior * self.level()
        obs = self._obs.get(size)
        return float(statistics.median(obs)) if obs else None

    @property
    def known(self) -> bool:
        return bool(self._obs) or bool(self._prior)

    def sizes(self) -> list[int]:
        return sorted(set(self._obs) | set(self._prior))

    def cost(self, size: int) -> float:
        """Estimated seconds of a pass of ``size`` tokens; 0.0 when nothing is known."""
        exact = self.measured(size)
        if exact is not None:
            return exact
        sizes = self.sizes()
        if not sizes:
            return 0.0
        above = [s for s in sizes if s > size]
        if above:
            return self.measured(above[0]) or 0.0
        top = sizes[-1]
        return (self.measured(top) or 0.0) * size / top

    def estimates(self) -> list[float]:
        """What a peer is told: ``measured`` for sizes 1 .. the largest known, 0.0 where a
        size is not known. The conservative fill of ``cost`` stays out, so that a peer that
        scales this table by its own observations scales measurements only."""
        sizes = self.sizes()
        if not sizes:
            return []
        return [self.measured(n) or 0.0 for n in range(1, min(sizes[-1], self.max_size) + 1)]

    def table(self, upto: int | None = None) -> list[float]:
        """Costs (seconds) of passes of 1 .. ``upto`` tokens; empty when nothing is known."""
        if not self.known:
            return []
        return [self.cost(n) for n in range(1, (upto or self.max_size) + 1)]


def tables_differ(old: Sequence[float], new: Sequence[float], fraction: float = 0.15) -> bool:
    """True when some size's cost moved by more than ``fraction`` (or the sizes differ)."""
    if len(old) != len(new):
        return True
    return any(abs(a - b) > fraction * max(a, b) for a, b in zip(old, new, strict=True))


class _Target(Protocol):
    @property
    def kv_len(self) -> int: ...

    def decode(self, tokens: Sequence[int], *, all_logits: bool) -> object: ...

    def decode_argmax(self, tokens: Sequence[int], *, all_rows: bool) -> object: ...

    def truncate(self, n: int) -> None: ...


def measure_curve(
    target: _Target,
    vocab_size: int,
    *,
    sizes: Sequence[int] = tuple(range(1, CALIBRATED_SIZES + 1)),
    context: int = CALIBRATION_CONTEXT,
    repeats: int = 1,
    shape_repeats: int = SHAPE_REPEATS,
    progress: bool = False,
) -> list[float]:
    """Times passes of each size after a synthetic context; returns seconds per size: the
    median of ``repeats`` passes, of ``max(repeats, shape_repeats)`` for sizes up to
    SHAPE_SIZES. Sizes are timed round-robin, so that a change of load spreads over the whole
    curve instead of bending part of it. The target's KV cache is empty afterwards."""

    def times_of(n: int) -> int:
        return max(repeats, shape_repeats) if n <= SHAPE_SIZES else repeats

    ids = [(7919 * i + 13) % vocab_size for i in range(context + max(sizes) + 1)]
    target.truncate(0)
    target.decode(ids[:context], all_logits=False)
    target.decode(ids[context : context + 1], all_logits=True)  # warm-up
    target.truncate(context)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(times_of(n) for n in sizes), desc="calibrating verification cost",
                   unit="pass", file=sys.stderr, leave=False)  # fmt: skip
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    try:
        for r in range(max(times_of(n) for n in sizes)):
            for n in sizes:
                if r >= times_of(n):
                    continue
                t0 = time.perf_counter()
                # As a greedy verification runs it: every row scored, argmax read in place.
                target.decode_argmax(ids[context : context + n], all_rows=True)
                samples[n].append(time.perf_counter() - t0)
                target.truncate(context)
                if bar is not None:
                    bar.update(1)
        out = [float(statistics.median(samples[n])) for n in sizes]
    finally:
        if bar is not None:
            bar.close()
        target.truncate(0)
    return out


def _is_temporary(path: Path) -> bool:
    import tempfile

    return path.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


def calibration_key(path: Path, *, backend: str, device: str, threads: int | None) -> str:
    """Identifies a calibration: the model file (path, size, mtime) and how it runs."""
    st = path.stat()
    # "shape3": sizes 1..8 timed 3 times (tables measured before are measured again).
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{backend}|{device}|{threads}|shape3"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def cached_calibration(
    target: _Target,
    vocab_size: int,
    *,
    path: Path,
    backend: str,
    device: str,
    threads: int | None,
    progress: bool = True,
    refresh: bool = False,
) -> list[float]:
    """The pass-cost table of this model file and settings: read from
    ``$PIPESD_HOME/costs/KEY.json`` if measured before (unless ``refresh``), else measured now
    (a progress line on stderr) and stored there."""
    from pipesd.models import pipesd_home

    if path.is_dir():  # a Hugging Face directory: key on its config
        path = path / "config.json"
    key = calibration_key(path, backend=backend, device=device, threads=threads)
    store = pipesd_home() / "costs" / f"{key}.json"
    if not refresh and store.is_file():
        try:
            data = json.loads(store.read_text(encoding="utf-8"))
            table = [float(v) for v in data["verify_s"]]
            if len(table) == CALIBRATED_SIZES and all(v > 0 for v in table):
                return table
        except (OSError, ValueError, KeyError, TypeError):
            pass
        log.warning("ignoring unreadable calibration %s; measuring again", store)
    t0 = time.perf_counter()
    table = measure_curve(target, vocab_size, progress=progress)
    if _is_temporary(path):  # a scratch model: keep nothing
        return table
    if progress:
        print(
            f"pipesd: calibrated the verification cost of passes of 1..{len(table)} tokens in "
            f"{time.perf_counter() - t0:.1f} s (1: {1000 * table[0]:.0f} ms, "
            f"{len(table)}: {1000 * table[-1]:.0f} ms; stored in {store})",
            file=sys.stderr,
            flush=True,
        )
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"model": str(path), "backend": backend, "device": device,
                    "threads": threads, "verify_s": table}),
        encoding="utf-8",
    )  # fmt: skip
    tmp.replace(store)
    return table


def measure_draft(model: _Target, vocab_size: int, *, context: int = CALIBRATION_CONTEXT,
                  repeats: int = 5) -> tuple[float, float]:  # fmt: skip
    """The drafter's costs: (seconds per drafted token, seconds per prompt token of a
    prefill), timed after a synthetic context. The KV cache is empty afterwards."""
    ids = [(7919 * i + 13) % vocab_size for i in range(context + repeats + 1)]
    model.truncate(0)
    model.decode(ids[:8], all_logits=False)  # warm-up
    model.truncate(0)
    t0 = time.perf_counter()
    model.decode(ids[:context], all_logits=False)
    prefill = (time.perf_counter() - t0) / context
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        model.decode(ids[context + i : context + i + 1], all_logits=False)
        times.append(time.perf_counter() - t0)
    model.truncate(0)
    return float(statistics.median(times)), prefill


def cached_draft_costs(model: _Target, vocab_size: int, *, path: Path,
                       threads: int | None) -> tuple[float, float]:  # fmt: skip
    """``measure_draft`` once per draft file and thread count (``$PIPESD_HOME/costs``)."""
    from pipesd.models import pipesd_home

    if _is_temporary(path):  # a scratch model: measure, keep nothing
        return measure_draft(model, vocab_size)
    key = calibration_key(path, backend="draft", device="cpu", threads=threads)
    store = pipesd_home() / "costs" / f"{key}.json"
    try:
        data = json.loads(store.read_text(encoding="utf-8"))
        decode_s, prefill_s = float(data["decode_s"]), float(data["prefill_s"])
        if decode_s > 0 and prefill_s > 0:
            return decode_s, prefill_s
    except (OSError, ValueError, KeyError, TypeError):
        pass
    decode_s, prefill_s = measure_draft(model, vocab_size)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(path), "threads": threads, "decode_s": decode_s,
                               "prefill_s": prefill_s}), encoding="utf-8")  # fmt: skip
    tmp.replace(store)
    return decode_s, prefill_s
