"""``pipesd tune``: set PipeSD's trigger thresholds (R1, R2) from measured time per token.

A Gaussian-process Bayesian optimiser (Nevergrad's ``BO``, expected improvement) proposes
(R1, R2) in (0, 1)^2; each proposal is scored by running PipeSD on the workload's tuning split
through the real split system (a ``pipesd cloud`` process with the target, pinned to core 1, a
link emulator in the chosen scenario, and the drafter in this process on core 0) and measuring
time per output token. The best point is written to a thresholds file that ``generate`` reads.

Also here: ``OnlineRetuner``, which a running client uses to re-tune when its time per token
drifts away from what the thresholds were tuned for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipesd import models, workloads
from pipesd.errors import PipesdError
from pipesd.policies.calibration import AcceptanceModel, calibration_policy
from pipesd.policies.pipesd import PipeSDPolicy, Thresholds, default_thresholds_path

#: Thresholds are searched inside this box (both ends excluded by Thresholds).
LOWER, UPPER = 0.01, 0.99


def make_optimizer(budget: int, seed: int) -> Any:
    import nevergrad as ng

    space = ng.p.Instrumentation(
        r1=ng.p.Scalar(lower=LOWER, upper=UPPER), r2=ng.p.Scalar(lower=LOWER, upper=UPPER)
    )
    space.random_state.seed(seed)
    return ng.optimizers.BO(parametrization=space, budget=budget)


@dataclass
class Evaluation:
    r1: float
    r2: float
    ms_per_token: float
    tokens: int


@dataclass
class TuneResult:
    thresholds: Thresholds
    ms_per_token: float
    evaluations: list[Evaluation] = field(default_factory=list)
    tuner_s: float = 0.0  # the optimiser's own time (ask/tell), not the measurements
    wall_s: float = 0.0

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "r1": self.thresholds.r1,
            "r2": self.thresholds.r2,
            "ms_per_token": self.ms_per_token,
            "tuner_s": self.tuner_s,
            "wall_s": self.wall_s,
            "evaluations": [e.__dict__ for e in self.evaluations],
            **extra,
        }


def optimise(objective: Callable[[Thresholds], tuple[float, int]], *, budget: int, seed: int = 0,
             progress: bool = True) -> TuneResult:  # fmt: skip
    """Minimises ``objective`` (ms per token, tokens) over (R1, R2) with ``budget`` trials."""
    from tqdm import tqdm

    if budget < 1:
        raise ValueError(f"--budget must be >= 1, got {budget}")
    t_start = time.perf_counter()
    tuner_s = 0.0
    t0 = time.perf_counter()
    opt = make_optimizer(budget, seed)
    tuner_s += time.perf_counter() - t0
    evals: list[Evaluation] = []
    best: Evaluation | None = None
    bar = tqdm(total=budget, desc="tuning R1, R2", unit="trial", disable=not progress)
    for _ in range(budget):
        t0 = time.perf_counter()
        cand = opt.ask()
        tuner_s += time.perf_counter() - t0
        th = Thresholds(float(cand.kwargs["r1"]), float(cand.kwargs["r2"]))
        ms, tokens = objective(th)
        evals.append(Evaluation(th.r1, th.r2, ms, tokens))
        if best is None or ms < best.ms_per_token:
            best = evals[-1]
        t0 = time.perf_counter()
        opt.tell(cand, ms)
        tuner_s += time.perf_counter() - t0
        bar.set_postfix_str(f"{ms:.1f} ms/token (best {best.ms_per_token:.1f})")
        bar.update()
    bar.close()
    assert best is not None
    return TuneResult(
        Thresholds(best.r1, best.r2), best.ms_per_token, evals, tuner_s,
        time.perf_counter() - t_start,
    )  # fmt: skip


# ------------------------------------------------------------------ the split system
_READY = re.compile(r"listening on (\S+):(\d+) ")


def pin(core: int, pid: int = 0) -> None:
    """Runs a process on one core where the machine has it (no-op on one core)."""
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        os.sched_setaffinity(pid, {core})


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout``; its status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@contextlib.contextmanager
def cloud_process(target: str, *, ctx: int, backend: str = "auto", device: str = "cpu",
                  core: int = 1, timeout: float = 300.0) -> Iterator[str]:  # fmt: skip
    """A ``pipesd cloud`` child process on 127.0.0.1 (a free port), pinned to ``core``;
    yields its address."""
    with cloud_child(target, ctx=ctx, backend=backend, device=device, core=core,
                     timeout=timeout) as (address, _):  # fmt: skip
        yield address


@contextlib.contextmanager
def cloud_child(target: str, *, ctx: int, backend: str = "auto", device: str = "cpu",
                core: int = 1, timeout: float = 300.0) -> Iterator[tuple[str, int]]:  # fmt: skip
    """``cloud_process`` that also yields the child's pid: (address, pid)."""
    fd, log_name = tempfile.mkstemp(prefix="pipesd-cloud-", suffix=".log")
    log = Path(log_name)
    cmd = [sys.executable, "-m", "pipesd.cli", "cloud", "--target", target, "--listen",
           "127.0.0.1:0", "--ctx", str(ctx), "--target-backend", backend,
           "--device", device]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fd)
    os.close(fd)
    pin(core, proc.pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace")
            m = _READY.search(text)
            if m:
                break
            if proc.poll() is not None:
                last = text.strip().splitlines()[-1:] or ["no output"]
                raise PipesdError(f"the cloud process failed to start: {last[0]}")
            if time.monotonic() > deadline:
                raise PipesdError(f"the cloud process did not start within {timeout:g} s")
            time.sleep(0.05)
        yield f"127.0.0.1:{m.group(2)}", proc.pid
    finally:
        stop_process(proc)
        log.unlink(missing_ok=True)


def measure(gen: Any, prompts: Sequence[str], policy_factory: Callable[[], Any], *,
            max_new_tokens: int) -> tuple[float, int]:  # fmt: skip
    """Runs every prompt; returns (wall ms per output token over all of them, tokens)."""
    wall, tokens = 0.0, 0
    for p in prompts:
        r = gen.generate(p, max_new_tokens=max_new_tokens, policy=policy_factory())
        wall += r.stats.wall_s
        tokens += r.stats.new_tokens
    return (1000.0 * wall / tokens if tokens else math.inf), tokens


def tune(*, scenario: str, workload: str, budget: int = 16, draft: str = models.DEFAULT_DRAFT,
         target: str = models.DEFAULT_TARGET, cloud: str | None = None, ctx: int = 2048,
         max_new_tokens: int = 64, seed: int = 0, progress: bool = True,
         out: Path | None = None,
         acceptance_out: Path | None = None) -> tuple[TuneResult, Path]:  # fmt: skip
    """Tunes (R1, R2) on the workload's tuning split; writes and returns the thresholds file.

    It also measures the pair's acceptance by draft confidence on the same split and writes
    it (``acceptance_out``, default ``acceptance.json`` beside the thresholds file), which
    ``auto`` starts from."""
    from pipesd.api import Generator
    from pipesd.link import SCENARIOS, Link

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if budget < 1:
        raise ValueError(f"--budget must be >= 1, got {budget}")
    prompts = workloads.load(workload, split="tune")
    if not prompts:
        raise ValueError(f"workload {workload} has no prompts in its tuning split")
    out = out or default_thresholds_path()
    pin(0)
    with contextlib.ExitStack() as stack:
        upstream = cloud or stack.enter_context(cloud_process(target, ctx=ctx))
        host, _, port = upstream.rpartition(":")
        link = stack.enter_context(Link((host, int(port)), scenario, seed=seed))
        gen = stack.enter_context(
            Generator(draft=draft, cloud=f"127.0.0.1:{link.port}", n_ctx=ctx, policy="pipesd")
        )
        gen.generate(prompts[0], max_new_tokens=8)  # warm-up: caches, connection

        def objective(th: Thresholds) -> tuple[float, int]:
            return measure(gen, prompts, lambda: PipeSDPolicy(thresholds=th),
                           max_new_tokens=max_new_tokens)  # fmt: skip

        result = optimise(objective, budget=budget, seed=seed, progress=progress)
        # The pair's acceptance by confidence, for `auto`: windows of 8 over the same split.
        acceptance = AcceptanceModel()
        measure(gen, prompts, lambda: calibration_policy(acceptance),
                max_new_tokens=max_new_tokens)  # fmt: skip
    acceptance.save(acceptance_out or out.with_name("acceptance.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    record = result.to_dict(
        scenario=scenario, workload=workload, split="tune", prompts=len(prompts),
        max_new_tokens=max_new_tokens, budget=budget, optimizer="nevergrad BO", draft=draft,
        target=target, tuned_at=time.strftime("%Y-%m-%d %H:%M:%S"),
    )  # fmt: skip
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    return result, out


class OnlineRetuner:
    """Re-tunes a running client's thresholds when its time per token drifts.

    The client reports each verified window (tokens committed, seconds since the previous
    verdict). A moving average is compared with the baseline (the first ``warmup`` windows);
    when it exceeds the baseline by more than ``drift`` for ``patience`` windows in a row, a
    short optimisation starts: each candidate (R1, R2) runs for ``trial_windows`` windows of
    live traffic and is scored by its time per token; after ``budget`` candidates the best one
    is kept and becomes the new baseline.
    """

    def __init__(self, thresholds: Thresholds, *, drift: float = 0.3, budget: int = 8,
                 trial_windows: int = 4, warmup: int = 8, patience: int = 4,
                 seed: int = 0) -> None:  # fmt: skip
        if drift <= 0:
            raise ValueError(f"drift must be > 0, got {drift}")
        self.current = thresholds
        self.drift, self.budget, self.trial_windows = drift, budget, trial_windows
        self.warmup, self.patience, self.seed = warmup, patience, seed
        self.baseline: float | None = None
        self.avg: float | None = None
        self._warm: list[tuple[int, float]] = []
        self._over = 0
        self._opt: Any = None
        self._cand: Any = None
        self._trial: list[tuple[int, float]] = []
        self._asked = 0
        self._best: tuple[float, Thresholds] | None = None
        self.retunes = 0
        self.tuner_s = 0.0

    @property
    def tuning(self) -> bool:
        return self._opt is not None

    def on_window(self, tokens: int, seconds: float) -> Thresholds:
        """Reports a window; returns the thresholds to use from now on."""
        if tokens <= 0:
            return self.current
        if self._opt is not None:
            return self._tuning_step(tokens, seconds)
        per = seconds / tokens
        if self.baseline is None:
            self._warm.append((tokens, seconds))
            if len(self._warm) >= self.warmup:
                self.baseline = sum(s for _, s in self._warm) / sum(t for t, _ in self._warm)
                self.avg = self.baseline
            return self.current
        assert self.avg is not None
        self.avg = 0.8 * self.avg + 0.2 * per
        self._over = self._over + 1 if self.avg > (1 + self.drift) * self.baseline else 0
        if self._over >= self.patience:
            self._start()
        return self.current

    def _start(self) -> None:
        t0 = time.perf_counter()
        self._opt = make_optimizer(self.budget, self.seed + self.retunes)
        self._asked, self._best, self._over = 0, None, 0
        self._ask()
        self.tuner_s += time.perf_counter() - t0

    def _ask(self) -> None:
        self._cand = self._opt.ask()
        self._asked += 1
        self._trial = []
        self.current = Thresholds(float(self._cand.kwargs["r1"]), float(self._cand.kwargs["r2"]))

    def _tuning_step(self, tokens: int, seconds: float) -> Thresholds:
        self._trial.append((tokens, seconds))
        if len(self._trial) < self.trial_windows:
            return self.current
        t0 = time.perf_counter()
        score = sum(s for _, s in self._trial) / sum(t for t, _ in self._trial)
        self._opt.tell(self._cand, score)
        if self._best is None or score < self._best[0]:
            self._best = (score, self.current)
        if self._asked < self.budget:
            self._ask()
        else:
            assert self._best is not None
            self.baseline, self.current = self._best
            self.avg = self.baseline
            self._opt = None
            self.retunes += 1
        self.tuner_s += time.perf_counter() - t0
        return self.current
