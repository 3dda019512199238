"""The pair's calibrated acceptance curve: P(draft accepted | draft confidence) by bin.

Runs stop-and-wait windows of 8 drafts (``pipesd.policies.calibration.calibration_policy``,
what ``pipesd tune`` runs) over each workload's tuning split in local mode, and writes the
table of every confidence bin into bench/RESULTS.md: this is what ``auto`` starts from.

    .venv/bin/python bench/bench_acceptance.py --prompts 4 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json

from benchlib import HERE, commit_label, machine, write_block

from pipesd import Generator
from pipesd.policies.calibration import AcceptanceModel, calibration_policy
from pipesd.tune import pin
from pipesd.workloads import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="tuning-split prompts per workload")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--workloads", default="humaneval,gsm8k")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    pin(0)
    info = machine()
    models: dict[str, AcceptanceModel] = {}
    with Generator(n_ctx=2048) as gen:
        for workload in args.workloads.split(","):
            model = AcceptanceModel(prior=1e-6)  # almost no prior: the bins as measured
            for prompt in load(workload, split="tune")[: args.prompts]:
                gen.generate(prompt, max_new_tokens=args.max_new_tokens,
                             policy=calibration_policy(model))  # fmt: skip
            models[workload] = model
    out = HERE / "out" / "acceptance.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({k: m.to_dict() for k, m in models.items()}, indent=2))
    names = list(models)
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores; commit {commit_label(info)}, "
        f"{info['date']}. Default pair (qwen2.5-coder-0.5b drafting for qwen2.5-coder-1.5b "
        f"Q4_K_M), local mode, greedy, windows of 8 drafts; {args.prompts} tuning-split prompts "
        f"per workload x {args.max_new_tokens} new tokens. Command: `.venv/bin/python "
        f"bench/bench_acceptance.py --prompts {args.prompts} --max-new-tokens "
        f"{args.max_new_tokens}`. Each cell: acceptance rate (judged drafts).",
        "",
        "| draft confidence | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    bins = next(iter(models.values())).bins
    for b in range(bins):
        cells = []
        for name in names:
            m = models[name]
            n = m.trials[b] - m.prior
            cells.append(f"{m.hits[b] / m.trials[b]:.2f} ({n:.0f})" if n >= 1 else "–")
        lines.append(f"| {b / bins:.1f}-{(b + 1) / bins:.1f} | " + " | ".join(cells) + " |")
    rates = ", ".join(f"{k} {m.mean_rate():.2f}" for k, m in models.items() if m.mean_rate())
    lines += ["", f"Mean acceptance of judged drafts: {rates}."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_block("acceptance", "## Acceptance by draft confidence", text)


if __name__ == "__main__":
    main()
