"""PipeSD against stop-and-wait on the split system, in one run.

The cloud (`pipesd cloud`, the target) runs in its own process pinned to core 1; the edge (the
draft, this process) and the link emulator are pinned to core 0. First `pipesd tune` sets
(R1, R2) on the HumanEval tuning split; then every prompt of the report split is generated with
`pipesd` (the tuned thresholds) and with `vanilla` (stop-and-wait, draft length 6), alternating
which goes first. Reports time per token, acceptance, verifications, the overheads of the DP
solver, the trigger and the tuner as fractions of run time, and whether the two policies' greedy
outputs agree.

    .venv/bin/python bench/bench_pipesd.py --scenario paper-5g --prompts 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import HERE, commit_label, machine, pin, write_block

from pipesd import Generator, models, workloads
from pipesd.link import SCENARIOS, Link
from pipesd.tune import cloud_process, tune


def run_policy(gen: Generator, prompt: str, policy: str, max_new_tokens: int) -> dict[str, Any]:
    r = gen.generate(prompt, max_new_tokens=max_new_tokens, policy=policy, draft_len=6)
    d = r.stats.to_dict()
    d["tokens"] = r.tokens
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", choices=list(SCENARIOS), default="paper-5g")
    ap.add_argument("--prompts", type=int, default=10, help="report-split prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tune-prompts", type=int, default=4, help="tuning-split prompts")
    ap.add_argument("--tune-tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    pin(0)
    report = workloads.load(f"humaneval:{args.prompts}", split="report")
    t_all = time.perf_counter()
    with cloud_process(models.DEFAULT_TARGET, ctx=args.ctx, core=1) as address:
        tuned, path = tune(
            scenario=args.scenario, workload=f"humaneval:{args.tune_prompts}", budget=args.budget,
            cloud=address, ctx=args.ctx, max_new_tokens=args.tune_tokens,
            out=args.out / "thresholds.json",
        )  # fmt: skip
        host, _, port = address.rpartition(":")
        runs: dict[str, list[dict[str, Any]]] = {"pipesd": [], "vanilla": []}
        with Link((host, int(port)), args.scenario) as link, Generator(
            cloud=f"127.0.0.1:{link.port}", n_ctx=args.ctx, thresholds=path
        ) as gen:  # fmt: skip
            gen.generate(report[0], max_new_tokens=8, policy="vanilla")  # warm-up
            t_report = time.perf_counter()
            for i, prompt in enumerate(report):
                order = ("pipesd", "vanilla") if i % 2 == 0 else ("vanilla", "pipesd")
                for policy in order:
                    d = run_policy(gen, prompt, policy, args.max_new_tokens)
                    runs[policy].append(d)
                    print(f"prompt {i} {policy}: {d['ms_per_token']:.1f} ms/token, "
                          f"{d['new_tokens']} tokens", flush=True)  # fmt: skip
            report_s = time.perf_counter() - t_report
    total_s = time.perf_counter() - t_all

    def agg(rs: list[dict[str, Any]]) -> dict[str, Any]:
        wall = sum(r["wall_s"] for r in rs)
        tokens = sum(r["new_tokens"] for r in rs)
        sub = sum(r["submitted"] for r in rs)
        return {
            "ms_per_token": 1000 * wall / tokens,
            "median_ms_per_token": statistics.median(r["ms_per_token"] for r in rs),
            "tokens": tokens,
            "wall_s": wall,
            "acceptance": sum(r["accepted"] for r in rs) / sub if sub else 0.0,
            "verifications_per_token": sum(r["verifications"] for r in rs) / tokens,
            "mean_window": sub / max(1, sum(r["verifications"] for r in rs)),
            "batches": sum(r["batches"] for r in rs),
            "wait_drafted": sum(r["wait_drafted"] for r in rs),
            "wait_kept": sum(r["wait_kept"] for r in rs),
            "rollbacks": sum(r["rollbacks"] for r in rs),
            "bytes_up": sum(r["bytes_up"] for r in rs),
            "bytes_down": sum(r["bytes_down"] for r in rs),
            "plan_fraction": sum(r["plan_s"] for r in rs) / wall,
            "trigger_fraction": sum(r["trigger_s"] for r in rs) / wall,
        }

    same = sum(a["tokens"] == b["tokens"] for a, b in zip(runs["pipesd"], runs["vanilla"],
                                                            strict=True))  # fmt: skip
    result = {
        "machine": info,
        "scenario": args.scenario,
        "report_prompts": len(report),
        "max_new_tokens": args.max_new_tokens,
        "tune": {
            **tuned.to_dict(),
            "prompts": args.tune_prompts,
            "tokens": args.tune_tokens,
            "budget": args.budget,
        },  # fmt: skip
        "policies": {k: agg(v) for k, v in runs.items()},
        "identical_outputs": same,
        "report_s": report_s,
        "total_s": total_s,
        "runs": runs,  # per prompt, with the output token ids
    }
    (args.out / "pipesd.json").write_text(json.dumps(result, indent=2))
    text = table_markdown(result)
    print(text)
    if not args.no_write:
        write_block("pipesd", "## PipeSD vs stop-and-wait", text)


def table_markdown(r: dict[str, Any]) -> str:
    m, t, p = r["machine"], r["tune"], r["policies"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; commit "
        f"{commit_label(m)}, {m['date']}. Edge (draft `{models.DEFAULT_DRAFT}`, llama.cpp, 1 "
        f"thread) and link emulator pinned to core 0; cloud (`pipesd cloud`, target "
        f"`{models.DEFAULT_TARGET}`, llama.cpp, 1 thread) pinned to core 1. Scenario "
        f"`{r['scenario']}`. Command: `.venv/bin/python bench/bench_pipesd.py --scenario "
        f"{r['scenario']} --prompts {r['report_prompts']} --max-new-tokens {r['max_new_tokens']}`.",
        "",
        f"Tuning: Nevergrad BO, {t['budget']} trials, each {t['prompts']} prompts of the HumanEval "
        f"tuning split (the second half of the set) x {t['tokens']} tokens: **R1 = {t['r1']:.3f}, "
        f"R2 = {t['r2']:.3f}** ({t['ms_per_token']:.1f} ms/token there). The optimiser's own "
        f"time (ask/tell) was {t['tuner_s']:.2f} s: {100 * t['tuner_s'] / t['wall_s']:.2f}% of "
        f"the {t['wall_s']:.0f} s of tuning and {100 * t['tuner_s'] / r['total_s']:.2f}% of the "
        f"whole {r['total_s']:.0f} s run; the rest of tuning is the measured generations.",
        "",
        f"Report: the first {r['report_prompts']} prompts of the HumanEval report split (the "
        f"first half) x {r['max_new_tokens']} new tokens, greedy, each prompt run with both "
        "policies in alternating order.",
        "",
        "| policy | ms/token (all tokens) | median of prompts | tokens | acceptance | "
        "verifications/token | mean window | streamed batches | wait drafts kept/made | "
        "rollbacks | DP solver | trigger |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in p.items():
        lines.append(
            f"| {name} | {a['ms_per_token']:.1f} | {a['median_ms_per_token']:.1f} | "
            f"{a['tokens']} | {100 * a['acceptance']:.1f}% | "
            f"{a['verifications_per_token']:.3f} | {a['mean_window']:.2f} | {a['batches']} | "
            f"{a['wait_kept']}/{a['wait_drafted']} | {a['rollbacks']} | "
            f"{100 * a['plan_fraction']:.3f}% | {100 * a['trigger_fraction']:.3f}% |"
        )
    speed = p["vanilla"]["ms_per_token"] / p["pipesd"]["ms_per_token"]
    lines += [
        "",
        f"PipeSD / stop-and-wait speed-up: **{speed:.2f}x**. Greedy outputs identical for "
        f"{r['identical_outputs']} of {r['report_prompts']} prompts. DP solver and trigger: "
        "time in those calls as a fraction of generation wall time.",
    ]
    return "\n".join(lines)


def rewrite_from_json(path: Path) -> None:
    """Writes the RESULTS.md block again from a saved run (after a change of this table)."""
    write_block(
        "pipesd", "## PipeSD vs stop-and-wait", table_markdown(json.loads(path.read_text()))
    )


if __name__ == "__main__":
    main()
