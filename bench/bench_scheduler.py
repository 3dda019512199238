"""Batch-schedule solver timings: the compiled DP through pipesd._core against the same
recurrence in pure Python (pipesd.scheduler), for windows of N̂ = 20, 64 and 256 draft tokens.

Each figure is per call, in microseconds: the median (and the minimum) over --repeats repeats
after a warm-up, each repeat timing a loop of calls long enough to last --min-ms (so the clock's
resolution does not matter). The garbage collector is off while timing. Both solvers must return
the same plan and makespan, bit for bit, or the script stops.

  list       pipesd._core.solve_batch_schedule(alpha, beta, ready), ready a list of N̂ floats
             (includes converting the list)
  constant   pipesd._core.solve_batch_schedule_constant(alpha, beta, gamma, N̂)
  python     pipesd.scheduler.solve_batch_schedule_py(alpha, beta, ready)

Scenarios (milliseconds): the cost model's three regimes. The DP's inner loop stops once a
candidate's lower bound passes the best one, so a draft-bound window costs about O(N̂) and a
link-bound one up to O(N̂²); beta = 0 disables the bound and is the worst case.

Usage: .venv/bin/python bench/bench_scheduler.py [--repeats 51] [--out bench/out] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchlib import commit_label, machine, write_block
from rich.console import Console
from rich.table import Table

from pipesd import _core as core
from pipesd.scheduler import solve_batch_schedule_py

HERE = Path(__file__).parent
WINDOWS = (20, 64, 256)

# name -> (alpha_ms, beta_ms, gamma_ms, what it stands for)
SCENARIOS: dict[str, tuple[float, float, float, str]] = {
    "draft-bound": (
        20.0,
        0.05,
        79.0,
        "gamma = this machine's draft time per token (bench_components), alpha = 20 ms per "
        "batch, beta = 128 bytes per token at 20 Mbit/s",
    ),
    "link-bound": (
        20.0,
        10.0,
        5.0,
        "a fast draft and a slow uplink (beta > gamma): batches grow along the window",
    ),
    "beta = 0": (
        20.0,
        0.0,
        79.0,
        "no per-token cost: the inner loop's bound never stops it, the full O(N̂²) scan",
    ),
}


def time_per_call(fn: Callable[[], object], repeats: int, min_s: float) -> dict[str, float]:
    """Per-call microseconds: median and minimum over repeats of a calibrated loop."""
    t0 = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - t0 < 0.05:  # warm-up
        fn()
        calls += 1
    per_call = (time.perf_counter() - t0) / calls
    number = max(1, int(min_s / per_call) + 1)
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter_ns() - start) / number / 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"median": statistics.median(samples), "min": min(samples), "number": number}


def run(repeats: int, py_repeats: int, min_ms: float, out_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": machine(),
        "repeats": repeats,
        "python_repeats": py_repeats,
        "min_ms_per_repeat": min_ms,
        "scenarios": [],
    }
    min_s = min_ms / 1e3
    for name, (alpha, beta, gamma, about) in SCENARIOS.items():
        rows = []
        for n in WINDOWS:
            ready = [gamma * j for j in range(1, n + 1)]
            plan = core.solve_batch_schedule(alpha, beta, ready)
            const = core.solve_batch_schedule_constant(alpha, beta, gamma, n)
            py_ends, py_makespan = solve_batch_schedule_py(alpha, beta, ready)
            cpp = (plan.batch_ends, plan.makespan)
            same = cpp == (py_ends, py_makespan) and cpp == (const.batch_ends, const.makespan)
            if not same:
                raise SystemExit(
                    f"{name}, N̂ = {n}: the solvers disagree: C++ {plan!r}, "
                    f"constant {const!r}, Python {(py_ends, py_makespan)!r}"
                )
            rows.append(
                {
                    "n": n,
                    "batches": plan.num_batches,
                    "batch_sizes": plan.batch_sizes,
                    "makespan_ms": plan.makespan,
                    "same_plan": same,
                    "list_us": time_per_call(
                        partial(core.solve_batch_schedule, alpha, beta, ready), repeats, min_s
                    ),
                    "constant_us": time_per_call(
                        partial(core.solve_batch_schedule_constant, alpha, beta, gamma, n),
                        repeats,
                        min_s,
                    ),
                    "python_us": time_per_call(
                        partial(solve_batch_schedule_py, alpha, beta, ready), py_repeats, min_s
                    ),
                }
            )
        result["scenarios"].append(
            {
                "name": name,
                "alpha_ms": alpha,
                "beta_ms": beta,
                "gamma_ms": gamma,
                "about": about,
                "results": rows,
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scheduler.json").write_text(json.dumps(result, indent=2))
    return result


def fmt_us(t: dict[str, float]) -> str:
    return f"{t['median']:,.1f} ({t['min']:,.1f})"


def table_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    commit = commit_label(m)
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; commit {commit}, "
        f"{m['date']}. `pipesd._core` as built by `pip install -e .` (Release, -O3). Per-call "
        f"microseconds, median (min) over {r['repeats']} repeats for C++ and "
        f"{r['python_repeats']} for Python, after a warm-up; each repeat loops for at least "
        f"{r['min_ms_per_repeat']:g} ms. Not pinned; other test runs shared the machine. "
        "Command: `.venv/bin/python bench/bench_scheduler.py`.",
        "",
        "| scenario (α, β, γ in ms) | N̂ | batches | makespan ms | C++, ready list µs "
        "| C++, constant γ µs | pure Python µs | Python / C++ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["scenarios"]:
        label = f"{s['name']} ({s['alpha_ms']:g}, {s['beta_ms']:g}, {s['gamma_ms']:g})"
        for row in s["results"]:
            ratio = row["python_us"]["median"] / row["list_us"]["median"]
            lines.append(
                f"| {label} | {row['n']} | {row['batches']} | {row['makespan_ms']:,.2f} "
                f"| {fmt_us(row['list_us'])} | {fmt_us(row['constant_us'])} "
                f"| {fmt_us(row['python_us'])} | {ratio:,.0f}x |"
            )
    lines.append("")
    lines.append(
        "Both solvers returned the same plan and makespan, bit for bit, in every row. Scenarios: "
        + "; ".join(f"{s['name']}: {s['about']}" for s in r["scenarios"])
        + "."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=51, help="timed repeats per C++ figure")
    ap.add_argument("--python-repeats", type=int, default=21, help="timed repeats per Python one")
    ap.add_argument("--min-ms", type=float, default=5.0, help="least duration of one repeat")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    r = run(args.repeats, args.python_repeats, args.min_ms, args.out)
    table = Table(title="PipeSD batch scheduler (µs per call, median)")
    for col in ("scenario", "N̂", "batches", "C++ list", "C++ constant", "Python", "ratio"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for s in r["scenarios"]:
        for row in s["results"]:
            table.add_row(
                s["name"],
                str(row["n"]),
                str(row["batches"]),
                f"{row['list_us']['median']:,.2f}",
                f"{row['constant_us']['median']:,.2f}",
                f"{row['python_us']['median']:,.1f}",
                f"{row['python_us']['median'] / row['list_us']['median']:,.0f}x",
            )
    Console().print(table)
    if not args.no_write:
        write_block("scheduler", "## Batch scheduler", table_markdown(r))


if __name__ == "__main__":
    main()
