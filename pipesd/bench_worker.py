"""The edge side of ``pipesd bench``: one process per (scenario, workload).

Reads a job (JSON) on stdin, loads the draft model (and, in the ``local`` scenario, the target),
runs every (policy, prompt, repeat) it names and prints one JSON record per finished run on
stdout. The parent pins this process to the edge core and, for a slowed edge, puts it in a CPU
limited cgroup before it loads anything heavy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from pipesd.bench import CLOUD_CPU_WATTS, energy


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GpuEnergy:
    """The GPU's cumulative energy counter (NVML), in joules; None where there is none."""

    def __init__(self) -> None:
        self.handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read()
        except Exception:  # noqa: BLE001 - no NVML, no GPU or no energy counter
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0


def main() -> int:
    job = json.loads(sys.stdin.read())
    from pipesd import Generator
    from pipesd.policies import make_policy
    from pipesd.policies.baselines import task_defaults
    from pipesd.policies.pipesd import resolve_thresholds

    task = job["task"]
    draft_len = int(task_defaults(task)["draft_len"])
    thresholds = resolve_thresholds(job["thresholds"])
    local = job["cloud"] is None
    kwargs: dict[str, Any] = {"draft": job["draft"], "n_ctx": job["ctx"]}
    if local:
        kwargs.update(target=job["target"], target_backend=job["target_backend"],
                      device=job["device"])  # fmt: skip
    else:
        kwargs.update(cloud=job["cloud"])
    gpu = GpuEnergy() if job["device"] == "cuda" else None
    prompts = {int(k): v for k, v in job["prompts"].items()}
    traced: set[str] = set()
    with Generator(**kwargs) as gen:
        first = prompts[min(prompts)]
        gen.generate(first, max_new_tokens=8, policy="vanilla")  # warm-up
        gen.generate(first, max_new_tokens=4, policy="target-only")
        for policy, index, repeat in job["todo"]:
            rule: Any = policy
            if policy not in ("target-only", "draft-only"):
                # auto learns the pair's acceptance across the worker's runs, as it does
                # across a Generator's sequences.
                rule = make_policy(policy, draft_len=draft_len, thresholds=thresholds, task=task,
                                   acceptance=gen.acceptance)  # fmt: skip
            trace: list[tuple[str, float, float]] | None = None
            if policy in job["trace_policies"] and policy not in traced:
                trace = []
                traced.add(policy)
            cloud0 = process_cpu_s(job["cloud_pid"]) if job["cloud_pid"] else 0.0
            gpu0 = gpu.read() if gpu else None
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            r = gen.generate(prompts[index], max_new_tokens=job["max_new_tokens"], policy=rule,
                             trace=trace)  # fmt: skip
            edge_cpu = time.process_time() - cpu0
            gpu1 = gpu.read() if gpu else None
            s = r.stats
            if local:
                cloud_cpu = s.prefill_s + s.verify_s
                edge_cpu = max(0.0, edge_cpu - cloud_cpu)
            else:
                cloud_cpu = process_cpu_s(job["cloud_pid"]) - cloud0
            edge_j = energy(edge_cpu, s.wall_s, job["edge_speed"], job["profile"])
            if gpu0 is not None and gpu1 is not None:
                cloud_j, cloud_src = gpu1 - gpu0, "measured (NVML GPU energy counter)"
            else:
                cloud_j = cloud_cpu * CLOUD_CPU_WATTS
                cloud_src = f"modelled (cloud CPU seconds x {CLOUD_CPU_WATTS:g} W)"
            n = max(1, s.new_tokens)
            rec = {
                "policy": policy, "scenario": job["scenario"], "workload": job["workload"],
                "task": task, "prompt_index": index, "repeat": repeat,
                "max_new_tokens": job["max_new_tokens"], "prompt": prompts[index],
                **{k: v for k, v in s.to_dict().items() if k != "policy"},
                "verifications_per_token": s.verifications / n,
                "decode_ms_per_token": 1000 * (s.wall_s - s.ttft_s) / max(1, s.new_tokens - 1),
                "mean_draft_len": s.submitted / s.verifications if s.verifications else None,
                "edge_cpu_s": edge_cpu, "cloud_cpu_s": cloud_cpu,
                "edge_energy_j": edge_j, "cloud_energy_j": cloud_j,
                "edge_j_per_token": edge_j / n, "cloud_j_per_token": cloud_j / n,
                "energy_source": {
                    "edge": f"modelled ({job['profile']} profile, edge CPU time)",
                    "cloud": cloud_src,
                },
                "thresholds": thresholds.to_dict() if policy.startswith("pipesd") else None,
                "tokens": r.tokens,
                "decision_log": getattr(rule, "decision_log", None),
                "trace": [(k, a - t0, b - t0 if k == "draft" else b) for k, a, b in trace]
                if trace else None,
            }  # fmt: skip
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - one line for the parent
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
