"""``pipesd bench``: every policy, in the paper's scenarios, on prompt sets, with energy.

The harness runs the real split system on one machine:

- the cloud: a ``pipesd cloud`` child process with the target, pinned to core 1;
- the link: a ``pipesd.link.Link`` emulator in this process (pinned to core 0), in the
  scenario's conditions;
- the edge: a worker child process (``python -m pipesd.bench_worker``) with the draft model,
  pinned to core 0 and, in the slowed-edge scenarios, placed in a cgroup v1 cpu group whose
  ``cpu.cfs_quota_us`` limits it to a fraction of a core.

Every finished run is appended to ``OUT/results.jsonl`` at once, so an interrupted bench picks
up where it stopped; ``results.json``, ``results.md`` and the plots are written from all
finished runs at the end. The metric names are documented in ``METRICS`` (and in
docs/bench.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipesd import models, workloads
from pipesd.errors import PipesdError
from pipesd.policies import POLICIES

SPECULATIVE = [p for p in POLICIES if p not in ("target-only", "draft-only")]


@dataclass(frozen=True)
class BenchScenario:
    name: str
    link: str | None  # a pipesd.link scenario; None = no network (draft and target together)
    edge_speed: float  # fraction of one core the edge may use
    device: str  # the edge's power profile
    description: str


BENCH_SCENARIOS: dict[str, BenchScenario] = {
    s.name: s
    for s in (
        BenchScenario("local", None, 1.0, "laptop",
                      "no network: draft and target in one process (the bound)"),
        BenchScenario("s1", "paper-5g", 1.0, "laptop", "paper-5g link, default edge"),
        BenchScenario("s2", "paper-5g", 0.5, "phone",
                      "paper-5g link, edge limited to 1/2 of a core (phone)"),
        BenchScenario("s3", "paper-5g", 0.2, "iot",
                      "paper-5g link, edge limited to 1/5 of a core (IoT device)"),
        BenchScenario("s4", "dynamic", 1.0, "laptop",
                      "dynamic bandwidth (10-80 up, 150-280 down Mbit/s), default edge"),
    )
}  # fmt: skip

#: Stated edge power profiles (watts while computing, watts while idle). Edge energy is
#: MODELLED: the edge's busy time (its CPU seconds, stretched by the scenario's CPU limit to
#: what the slower device would take) x active power, plus the rest of the run x idle power.
POWER_PROFILES: dict[str, tuple[float, float]] = {
    "laptop": (15.0, 2.0),
    "phone": (4.0, 0.5),
    "iot": (1.5, 0.2),
}
#: Cloud energy on a CPU cloud is MODELLED as the cloud process's CPU seconds x this power
#: (one busy server core). On CUDA it is MEASURED with the GPU's NVML energy counter.
CLOUD_CPU_WATTS = 12.0

#: Every per-run metric in results.json, with its meaning.
METRICS: dict[str, str] = {
    "policy": "the decoding policy",
    "scenario": "the bench scenario (local, s1..s4)",
    "workload": "the prompt set's name",
    "task": "code or math (picks vanilla's draft length and HSL's threshold)",
    "prompt_index": "index of the prompt within the workload's report split",
    "repeat": "repeat number of this (policy, scenario, prompt)",
    "max_new_tokens": "the token budget",
    "new_tokens": "output tokens produced",
    "wall_s": "wall-clock seconds from the request to the last token",
    "ms_per_token": "wall_s x 1000 / new_tokens",
    "decode_ms_per_token": "(wall_s - ttft_s) x 1000 / (new_tokens - 1): time per token after "
    "the first",
    "tokens_per_s": "new_tokens / wall_s",
    "ttft_s": "seconds until the first output token was known",
    "acceptance_rate": "accepted / submitted draft tokens",
    "verifications": "verification windows",
    "verifications_per_token": "verifications / new_tokens",
    "mean_draft_len": "draft tokens submitted per verification",
    "drafted": "draft tokens made (including those made while waiting)",
    "submitted": "draft tokens sent for verification",
    "accepted": "draft tokens the target accepted",
    "bytes_up": "bytes sent edge -> cloud (frames with headers)",
    "bytes_down": "bytes sent cloud -> edge",
    "rollbacks": "verdicts that threw drafts away",
    "wasted_drafts": "draft tokens thrown away",
    "wait_drafted": "drafts made while a verdict was pending",
    "wait_kept": "of those, drafts that survived",
    "edge_cpu_s": "CPU seconds of the edge process (all its threads)",
    "cloud_cpu_s": "CPU seconds of the cloud process (local: seconds in target calls)",
    "edge_energy_j": "edge energy, MODELLED from CPU time and the device's power profile",
    "cloud_energy_j": "cloud energy: MODELLED from CPU time on a CPU cloud, NVML on CUDA",
    "edge_j_per_token": "edge_energy_j / new_tokens",
    "cloud_j_per_token": "cloud_energy_j / new_tokens",
    "energy_source": "how the energy figures were obtained",
    "tokens": "the output token ids",
    "decision_log": "auto only: each decision between windows (budget, guesses seen, the "
    "rates compared, the pass costs and round trip it planned with); null for other policies",
    "matches_target_only": "greedy output identical to target-only's for this prompt "
    "(null when target-only was not run)",
    "divergence": "where the output first differs from target-only: new-token position and "
    "the target's top-two logit margin there",
}


class BenchError(PipesdError):
    """The bench cannot run as asked."""


# ------------------------------------------------------------------------ edge CPU limit
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


@contextlib.contextmanager
def cpu_limit(fraction: float, name: str) -> Iterator[Path | None]:
    """A cgroup v1 cpu group limited to ``fraction`` of one core (None when fraction >= 1);
    processes are added by writing their pid to its ``cgroup.procs``."""
    if fraction >= 1.0:
        yield None
        return
    period = 100_000
    group = CGROUP_CPU / f"pipesd-{name}-{os.getpid()}"
    try:
        if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
            raise OSError("no cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(period * fraction))))
    except OSError as e:
        raise BenchError(
            f"cannot limit the edge to {fraction:g} of a core with cgroup v1 "
            f"({e.strerror or e}); run as root on a machine with the cpu controller mounted "
            "at /sys/fs/cgroup/cpu, or leave out the slowed-edge scenarios (s2, s3)"
        ) from None
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def join_cgroup(group: Path, pid: int) -> None:
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        raise BenchError(f"cannot move the edge into {group}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Job:
    scenario: str
    workload: str  # the spec given, e.g. humaneval:4
    prompts: list[tuple[int, str]]
    todo: list[tuple[str, int, int]]  # (policy, prompt index, repeat)


def run_key(r: dict[str, Any]) -> tuple[str, str, str, int, int, int]:
    return (r["policy"], r["scenario"], r["workload"], r["prompt_index"], r["repeat"],
            r["max_new_tokens"])  # fmt: skip


def load_records(path: Path) -> list[dict[str, Any]]:
    """Finished runs; a half-written last line (an interrupted write) is ignored."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def parse_list(text: str, known: Sequence[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BenchError(f"no {what} given")
    if "all" in items:
        return list(known)
    bad = [t for t in items if t not in known]
    if bad:
        raise BenchError(f"unknown {what} {', '.join(bad)}; known: {', '.join(known)}")
    return items


def plan(policies: list[str], scenarios: list[str], specs: list[str], *, repeats: int,
         max_new_tokens: int, done: set[tuple[Any, ...]]) -> list[Job]:  # fmt: skip
    jobs = []
    for spec in specs:
        prompts = workloads.load(spec, split="report")
        if not prompts:
            raise BenchError(f"workload {spec} has no prompts in its report split")
        name = workloads.label(spec)
        for sc in scenarios:
            todo = []
            for i in range(len(prompts)):
                order = policies[i % len(policies) :] + policies[: i % len(policies)]
                for rep in range(repeats):
                    for p in order:
                        if (p, sc, name, i, rep, max_new_tokens) not in done:
                            todo.append((p, i, rep))
            if todo:
                jobs.append(Job(sc, spec, list(enumerate(prompts)), todo))
    return jobs


# ---------------------------------------------------------------------------- the runner
def run(*, policies: list[str], scenarios: list[str], specs: list[str], max_new_tokens: int,
        out: Path, repeats: int = 1, thresholds: Path | None = None, ctx: int = 2048,
        draft: str = models.DEFAULT_DRAFT, target: str = models.DEFAULT_TARGET,
        target_backend: str = "auto", device: str = "cpu", plots: bool = True,
        progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Runs what is not yet in ``out/results.jsonl``, then writes the reports."""
    from tqdm import tqdm

    from pipesd.link import Link
    from pipesd.tune import cloud_child, pin

    if max_new_tokens < 1:
        raise BenchError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {repeats}")
    if thresholds is not None and not thresholds.is_file():
        raise BenchError(f"thresholds file not found: {thresholds}")
    draft_path = models.resolve(draft)
    target_path = models.resolve(target)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    records = load_records(jsonl)
    if jsonl.is_file():  # drop a half-written last line, so new records start on their own
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    done = {run_key(r) for r in records}
    jobs = plan(policies, scenarios, specs, repeats=repeats, max_new_tokens=max_new_tokens,
                done=done)  # fmt: skip
    total = sum(len(j.todo) for j in jobs)
    for name in {j.scenario for j in jobs}:  # fail before any model loads
        with cpu_limit(BENCH_SCENARIOS[name].edge_speed, "check"):
            pass
    pin(0)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress or total == 0)
    with contextlib.ExitStack() as stack:
        cloud: tuple[str, int] | None = None
        for job in jobs:
            sc = BENCH_SCENARIOS[job.scenario]
            address, cloud_pid = None, None
            job_stack = contextlib.ExitStack()
            if sc.link is not None:
                if cloud is None:
                    cloud = stack.enter_context(
                        cloud_child(str(target_path), ctx=ctx, backend=target_backend,
                                    device=device, core=1)
                    )  # fmt: skip
                host, _, port = cloud[0].rpartition(":")
                link = job_stack.enter_context(Link((host, int(port)), sc.link, seed=0))
                address, cloud_pid = f"127.0.0.1:{link.port}", cloud[1]
            spec = {
                "scenario": sc.name, "workload": workloads.label(job.workload),
                "task": workloads.task_of(job.workload), "prompts": dict(job.prompts),
                "todo": job.todo, "max_new_tokens": max_new_tokens, "ctx": ctx,
                "draft": str(draft_path), "target": str(target_path),
                "target_backend": target_backend, "device": device, "cloud": address,
                "cloud_pid": cloud_pid, "edge_speed": sc.edge_speed,
                "profile": sc.device, "thresholds": str(thresholds) if thresholds else None,
                "trace_policies": ["pipesd", "vanilla"],
            }  # fmt: skip
            bar.set_postfix_str(f"{sc.name} {spec['workload']}")
            with job_stack:
                group = job_stack.enter_context(cpu_limit(sc.edge_speed, sc.name))
                for rec in run_worker(spec, group):
                    with open(jsonl, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                    bar.update()
    bar.close()
    return report(records, out, policies=policies, scenarios=scenarios,
                  specs=specs, max_new_tokens=max_new_tokens, target=str(target_path),
                  plots=plots)  # fmt: skip


def run_worker(spec: dict[str, Any], group: Path | None) -> Iterator[dict[str, Any]]:
    """Runs one edge worker process; yields its records as they finish."""
    from pipesd.tune import pin

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipesd.bench_worker"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pin(0, proc.pid)
        if group is not None:
            join_cgroup(group, proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith("{"):
                yield json.loads(line)
        rc = proc.wait()
        if rc != 0:
            assert proc.stderr is not None
            err = proc.stderr.read().strip().splitlines()
            raise BenchError(
                f"the edge worker ({spec['scenario']}, {spec['workload']}) failed: "
                f"{err[-1] if err else f'exit status {rc}'}"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ reports
def _reference(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[int]]:
    ref: dict[tuple[str, int], list[int]] = {}
    for r in records:
        if r["policy"] == "target-only":
            ref.setdefault((r["workload"], r["prompt_index"]), r["tokens"])
    return ref


def compare(records: list[dict[str, Any]], margin_of: Any = None) -> None:
    """Sets ``matches_target_only`` and ``divergence`` on every record. ``margin_of(record,
    position, reference)`` gives the target's top-two margin at a divergence (or None)."""
    ref = _reference(records)
    for r in records:
        want = ref.get((r["workload"], r["prompt_index"]))
        if want is None:
            r["matches_target_only"], r["divergence"] = None, None
            continue
        n = min(len(want), len(r["tokens"]))
        first = next((i for i in range(n) if want[i] != r["tokens"][i]), None)
        if first is None and len(want) != len(r["tokens"]):
            first = n
        r["matches_target_only"] = first is None
        r["divergence"] = None
        if first is not None:
            margin = margin_of(r, first, want) if margin_of and r["policy"] in SPECULATIVE else None
            r["divergence"] = {"position": first, "target_margin": margin}


def aggregate(rs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["new_tokens"] for r in rs)
    wall = sum(r["wall_s"] for r in rs)
    ver = sum(r["verifications"] for r in rs)
    sub = sum(r["submitted"] for r in rs)
    per = max(tokens, 1)
    matched = [r["matches_target_only"] for r in rs if r["matches_target_only"] is not None]
    return {
        "runs": len(rs),
        "tokens": tokens,
        "ms_per_token": 1000 * wall / per,
        "median_ms_per_token": statistics.median(r["ms_per_token"] for r in rs),
        "decode_ms_per_token": 1000
        * sum(r["wall_s"] - r["ttft_s"] for r in rs)
        / max(1, sum(r["new_tokens"] - 1 for r in rs)),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in rs),
        "acceptance_rate": sum(r["accepted"] for r in rs) / sub if sub else None,
        "verifications_per_token": ver / per,
        "mean_draft_len": sub / ver if ver else None,
        "bytes_up_per_token": sum(r["bytes_up"] for r in rs) / per,
        "bytes_down_per_token": sum(r["bytes_down"] for r in rs) / per,
        "rollbacks": sum(r["rollbacks"] for r in rs),
        "wasted_drafts": sum(r["wasted_drafts"] for r in rs),
        "edge_j_per_token": sum(r["edge_energy_j"] for r in rs) / per,
        "cloud_j_per_token": sum(r["cloud_energy_j"] for r in rs) / per,
        "matched": sum(matched),
        "compared": len(matched),
    }


def report(records: list[dict[str, Any]], out: Path, *, policies: list[str],
           scenarios: list[str], specs: list[str], max_new_tokens: int, target: str,
           plots: bool = True) -> dict[str, Any]:  # fmt: skip
    """Writes results.json, results.md and the plots from the records asked for."""
    sizes = {workloads.label(s): len(workloads.load(s, split="report")) for s in specs}
    names = set(sizes)
    rs = [r for r in records if r["policy"] in policies and r["scenario"] in scenarios
          and r["workload"] in names and r["prompt_index"] < sizes[r["workload"]]
          and r["max_new_tokens"] == max_new_tokens]  # fmt: skip
    compare(rs, _margin_checker(target, rs))
    summary: dict[str, Any] = {}
    for w in sorted(names):
        for sc in scenarios:
            cell = {p: aggregate([r for r in rs if r["policy"] == p and r["scenario"] == sc
                                  and r["workload"] == w]) for p in policies
                    if any(r["policy"] == p and r["scenario"] == sc and r["workload"] == w
                           for r in rs)}  # fmt: skip
            if cell:
                summary.setdefault(w, {})[sc] = cell
    from pipesd.bench_report import write_markdown, write_plots

    result = {
        "metrics": METRICS,
        "scenarios": {k: v.__dict__ for k, v in BENCH_SCENARIOS.items() if k in scenarios},
        "power_profiles": {
            k: {"active_w": a, "idle_w": i} for k, (a, i) in POWER_PROFILES.items()
        },  # fmt: skip
        "cloud_cpu_watts": CLOUD_CPU_WATTS,
        "max_new_tokens": max_new_tokens,
        "summary": summary,
        "runs": rs,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, out / "results.md")
    if plots and rs:
        write_plots(result, out)
    return result


def _margin_checker(target: str, rs: list[dict[str, Any]]) -> Any:
    """Loads the target (llama.cpp) only if some speculative run diverged."""
    ref = _reference(rs)
    if not any(r["policy"] in SPECULATIVE and (r["workload"], r["prompt_index"]) in ref
               and r["tokens"] != ref[(r["workload"], r["prompt_index"])] for r in rs):  # fmt: skip
        return None
    from pipesd.llama_backend import LlamaCppModel

    try:
        model = LlamaCppModel(target, n_ctx=4096)
    except Exception:  # noqa: BLE001 - a torch-only target: no margin figure
        return None
    prompts: dict[tuple[str, int], list[int]] = {}

    def margin(r: dict[str, Any], pos: int, want: list[int]) -> float | None:
        key = (r["workload"], r["prompt_index"])
        if key not in prompts:
            prompts[key] = model.tokenize(r["prompt"])
        return top2_margin(model, prompts[key] + want[:pos])

    return margin


def top2_margin(model: Any, context: list[int]) -> float:
    """The model's top-1 minus top-2 logit for the token after ``context``, computed the way
    target-only decoding computes it (the last token alone in its batch). ``model``: anything
    with ``truncate`` and ``decode`` (a llama.cpp model or a torch target)."""
    import numpy as np

    model.truncate(0)
    if len(context) > 1:
        model.decode(context[:-1], all_logits=False)
    row = model.decode([context[-1]], all_logits=True)[-1]
    top = np.partition(row, -2)[-2:]
    model.truncate(0)
    return float(abs(top[1] - top[0]))


def energy(edge_cpu_s: float, wall_s: float, speed: float, profile: str) -> float:
    """Modelled edge joules for one run (see POWER_PROFILES)."""
    active, idle = POWER_PROFILES[profile]
    busy = min(wall_s, edge_cpu_s / speed) if speed > 0 else wall_s
    return busy * active + max(0.0, wall_s - busy) * idle
