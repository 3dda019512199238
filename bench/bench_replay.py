"""``auto``'s decisions replayed on the drafter's real guesses over a target's own output.

For every target-only run of a ``pipesd bench`` results file, the drafter drafts K tokens
greedily at every position of the target's output, from the target's own prefix: their
confidences and how many match the target are a trace of what any window started there
would see (draft j + 1 of a window is the drafter's guess after j accepted ones). Policies
are then replayed over those traces on a simulated clock, with the target's measured
pass-cost table and a scenario's link and edge speed: fixed windows of 1..16 drafts, ``auto``
as shipped (``AutoPolicy`` itself, driven draft by draft and verdict by verdict), and ``auto``
judging whether to speculate at all by a_bar alone, as it did before the replay
(``ABarAuto``). A cycle costs T(n) of docs/policies.md with its real outcome: n drafts, the
round trip, the pass of n + 1 and, when the whole window and the guess after it are right,
the drafting hidden behind the wait. Greedy only; one sequence at a time; the drafter's
catch-up after tokens decoded alone is taken as done by shadow guesses (``behind = 0``).

    .venv/bin/python bench/bench_replay.py --results bench/out/matrix-full-f16/results.jsonl \
        --target qwen2.5-coder-1.5b-f16 --scenario s1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import HERE, commit_label, machine, pin, write_block

from pipesd import models
from pipesd.bench import BENCH_SCENARIOS
from pipesd.cloud.verifier import Verdict
from pipesd.costs import calibration_key
from pipesd.edge.drafter import DraftToken
from pipesd.link import SCENARIOS
from pipesd.llama_backend import LlamaCppModel
from pipesd.models import pipesd_home
from pipesd.policies.auto import AutoPolicy, CycleModel, best_window, cycle_time
from pipesd.sampling import greedy_with_confidence

Trace = list[dict[str, Any]]  # per position: {"conf": [...], "match": m}


class ABarAuto(AutoPolicy):
    """``auto`` with the test it had before: speculation pays by rate(n*) at a_bar."""

    def speculation_rate(self, model: CycleModel) -> float:
        return best_window([], self.future, model, self.max_window)[1]


def collect(results: Path, draft: str, k: int) -> tuple[list[dict[str, Any]], float]:
    """The traces of every target-only run, and the drafter's median seconds per draft."""
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["policy"] == "target-only":
            refs.setdefault((row["workload"], row["prompt_index"]), row)
    if not refs:
        raise SystemExit(f"bench_replay: {results} holds no target-only run")
    model = LlamaCppModel(models.resolve(draft), n_ctx=4096, n_threads=1)
    out, times = [], []
    for (workload, index), row in sorted(refs.items()):
        prompt, ref = model.tokenize(row["prompt"]), row["tokens"]
        model.truncate(0)
        model.decode(prompt[:-1], all_logits=False)
        last, positions = prompt[-1], []
        for p in range(len(ref)):
            model.truncate(len(prompt) + p - 1)
            feed, confs, toks = [last], [], []
            for _ in range(min(k, len(ref) - p)):
                t0 = time.perf_counter()
                token, conf = greedy_with_confidence(model.decode(feed, all_logits=False)[0])
                times.append(time.perf_counter() - t0)
                confs.append(round(conf, 5))
                toks.append(token)
                feed = [token]
            match = 0
            while match < len(toks) and toks[match] == ref[p + match]:
                match += 1
            positions.append({"conf": confs, "match": match})
            last = ref[p]
        print(f"bench_replay: {workload} {index}: {len(ref)} positions", flush=True)
        out.append({"workload": workload, "prompt_index": index, "positions": positions})
    model.close()
    return out, statistics.median(times)


def realized(n: int, match: int, model: CycleModel, waits: bool) -> tuple[int, float]:
    """(tokens committed, seconds) of a window of n drafts whose first ``match`` are right."""
    full = waits and match > n  # the whole window and the guess after it: drafting hidden
    return min(match, n) + 1, cycle_time(n, 1.0 if full else 0.0, model)


def replay_fixed(trace: Trace, n: int, model: CycleModel) -> tuple[int, float]:
    p = tokens = 0
    seconds = 0.0
    while p < len(trace):
        q = trace[p]
        c, s = realized(min(n, len(q["conf"])), q["match"], model, model.overlap)
        tokens, seconds, p = tokens + c, seconds + s, p + c
    return tokens, seconds


def replay_auto(trace: Trace, make: Callable[[], AutoPolicy], model: CycleModel,
                curve: list[float]) -> tuple[int, float, int]:  # fmt: skip
    """(tokens, seconds, tokens decoded alone) of one sequence under the policy's own code."""
    policy = make()
    policy.bind(pass_costs=lambda: curve, overlap=model.overlap, draft_s=model.gamma_s)
    if model.overlap:
        policy.on_rtt(model.rtt_s)
    policy.begin()
    p = tokens = alone = 0
    seconds = 0.0
    while p < len(trace):
        block = policy.decode_alone(budget=len(trace) - p, behind=0)
        for _ in range(min(block, len(trace) - p)):
            q = trace[p]
            if model.overlap and policy.wants_shadow():
                policy.on_shadow(q["conf"][0], q["match"] > 0)
            policy.on_pass(1, model.pass_s(1))
            p, tokens, alone, seconds = p + 1, tokens + 1, alone + 1, seconds + model.pass_s(1)
        if block:
            continue
        q = trace[p]
        n = 0
        while n < len(q["conf"]):
            n += 1
            policy.on_draft_time(model.gamma_s)
            if policy.should_verify(n, DraftToken(0, q["conf"][n - 1], None)):
                break
        policy.on_submit(n)
        waits = model.overlap and policy.wait_drafts > 0
        c, s = realized(n, q["match"], model, waits)
        accepted = c - 1
        verdict = Verdict(epoch=0, start=p, drafted=n, accepted=accepted, next_token=0,
                          verify_s=model.pass_s(n + 1))  # fmt: skip
        policy.on_verdict(verdict)
        if accepted < n:
            policy.on_rollback()
        tokens, seconds, p = tokens + c, seconds + s, p + c
    return tokens, seconds, alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="a pipesd bench results.jsonl")
    ap.add_argument("--target", default=models.DEFAULT_TARGET,
                    help="the target those runs used (for its calibrated cost table)")  # fmt: skip
    ap.add_argument("--draft", default=models.DEFAULT_DRAFT)
    ap.add_argument("--scenario", default="s1", choices=sorted(BENCH_SCENARIOS))
    ap.add_argument("--drafts", type=int, default=16, help="drafts per position of the trace")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "replay")
    ap.add_argument("--block", default=None, help="RESULTS.md block (default replay-SCENARIO)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    pin(0)
    info = machine()
    key = calibration_key(models.resolve(args.target), backend="llama.cpp", device="cpu",
                          threads=1)  # fmt: skip
    store = pipesd_home() / "costs" / f"{key}.json"
    if not store.is_file():
        raise SystemExit(f"bench_replay: no calibration of {args.target} in {store} "
                         "(run `pipesd cloud --target ...` once)")  # fmt: skip
    curve = [float(v) for v in json.loads(store.read_text())["verify_s"]]
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"traces-{args.results.parent.name}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        traces, gamma = saved["traces"], saved["gamma_s"]
    else:
        traces, gamma = collect(args.results, args.draft, args.drafts)
        cache.write_text(json.dumps({"traces": traces, "gamma_s": gamma}))
    sc = BENCH_SCENARIOS[args.scenario]
    rtt = 2 * SCENARIOS[sc.link].one_way_ms / 1e3 if sc.link else 0.0

    def pass_s(m: int) -> float:
        return curve[m - 1] if m <= len(curve) else curve[-1] * m / len(curve)

    model = CycleModel(pass_s=pass_s, gamma_s=gamma / sc.edge_speed, rtt_s=rtt,
                       overlap=sc.link is not None, wait_limit=16)  # fmt: skip
    rows: list[tuple[str, float, str]] = []
    total = sum(len(t["positions"]) for t in traces)
    rows.append(("target alone", 1000 * pass_s(1), "all"))
    for n in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16):
        tok, sec = map(sum, zip(*(replay_fixed(t["positions"], n, model) for t in traces),
                                strict=True))  # fmt: skip
        rows.append((f"fixed window of {n}", 1000 * sec / tok, "0"))
    for name, make in (("auto", AutoPolicy), ("auto, speculate by a_bar", ABarAuto)):
        runs = [replay_auto(t["positions"], make, model, curve) for t in traces]
        tokens, alone = sum(r[0] for r in runs), sum(r[2] for r in runs)
        rows.append((name, 1000 * sum(r[1] for r in runs) / tokens, f"{alone} of {tokens}"))
    right = sum(q["match"] > 0 for t in traces for q in t["positions"]) / total
    table = ["| policy | ms/token | tokens decoded alone |", "|---|---:|---:|"]
    table += [f"| {name} | {ms:.1f} | {alone} |" for name, ms, alone in rows]
    body = (
        f"Machine: {info['cpu']}, {info['cores']} cores; {commit_label(info)}, {info['date']}. "
        f"Command: `.venv/bin/python bench/bench_replay.py --results {args.results} --target "
        f"{args.target} --scenario {args.scenario}`.\n\n"
        f"Traces: the drafter ({args.draft}) at every position of the target-only output of "
        f"{len(traces)} prompts ({total} positions, {args.drafts} drafts each; guesses right "
        f"{100 * right:.0f}%), median {1000 * gamma:.1f} ms a draft. Replayed with "
        f"{args.target}'s calibrated table (pass of 1: {1000 * pass_s(1):.0f} ms, 4: "
        f"{1000 * pass_s(4):.0f}, 8: {1000 * pass_s(8):.0f}, 16: {1000 * pass_s(16):.0f}), "
        f"scenario {args.scenario}: round trip {1000 * rtt:.0f} ms, draft "
        f"{1000 * model.gamma_s:.1f} ms. Simulated clock, realized outcomes.\n\n"
    ) + "\n".join(table)
    print(body)
    if not args.no_write:
        block = args.block or f"replay-{args.scenario}"
        write_block(block, "## auto replayed on real draft traces (bench/bench_replay.py)", body)


if __name__ == "__main__":
    main()
