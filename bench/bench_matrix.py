"""The full benchmark matrix: every policy x every scenario x HumanEval and GSM8K.

Runs ``pipesd bench`` (cloud on core 1, edge and link on core 0, s2/s3 CPU-limited with cgroup
v1) and writes its tables into bench/RESULTS.md with the machine, the commit and the sizes,
and its plots into bench/figures/.

    .venv/bin/python bench/bench_matrix.py --prompts 1 --max-new-tokens 32
    .venv/bin/python bench/bench_matrix.py --write-only    # the block again from a finished run
    .venv/bin/python bench/bench_matrix.py --policies auto,target-only,pipesd --scenarios s1 \
        --target qwen2.5-coder-1.5b-f16 --block matrix-f16 --out bench/out/matrix-f16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import HERE, commit_label, machine, write_block

THRESHOLDS = HERE / "thresholds-humaneval-paper5g.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1, help="report-split prompts per workload")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "matrix")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--policies", default="all", help="as pipesd bench --policies")
    ap.add_argument("--scenarios", default="all", help="as pipesd bench --scenarios")
    ap.add_argument("--target", default=None, help="target model (default: the default pair's)")
    ap.add_argument("--block", default="matrix", help="the RESULTS.md block to write")
    ap.add_argument("--title", default="## Benchmark matrix (pipesd bench)")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "pipesd.cli", "bench", "--policies", args.policies,
           "--scenarios", args.scenarios, "--workload",
           f"humaneval:{args.prompts},gsm8k:{args.prompts}",
           "--max-new-tokens", str(args.max_new_tokens), "--thresholds", str(THRESHOLDS),
           "--out", str(args.out)]  # fmt: skip
    if args.target:
        cmd += ["--target", args.target]
    info = machine()
    meta_path = args.out / "matrix-meta.json"
    if not args.write_only:
        t0 = time.time()
        subprocess.run(cmd, check=True)
        meta = {"machine": info, "elapsed_s": time.time() - t0}
        meta_path.write_text(json.dumps(meta, indent=2))
    else:
        subprocess.run([*cmd, "--report-only"], check=True)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"machine": info}
    m = meta["machine"]
    figures = HERE / "figures" if args.block == "matrix" else HERE / "figures" / args.block
    figures.mkdir(exist_ok=True)
    for png in ("time_per_token.png", "energy_per_token.png", "timeline.png"):
        if (args.out / png).is_file():
            shutil.copyfile(args.out / png, figures / png)
    th = json.loads(THRESHOLDS.read_text())
    elapsed = meta.get("elapsed_s")
    md = (args.out / "results.md").read_text().split("\n", 2)[2]  # drop its title
    md = md.replace("\n## ", "\n### ")
    head = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; commit "
        f"{commit_label(m)}, {m['date']}. Edge worker (draft, llama.cpp, 1 thread) and the link "
        "emulator pinned to core 0, `pipesd cloud` (target, llama.cpp, 1 thread) pinned to "
        "core 1. Command: `.venv/bin/python bench/bench_matrix.py "
        + " ".join(sys.argv[1:])
        + f"` (which runs `pipesd bench --policies {args.policies} --scenarios "
        f"{args.scenarios} --workload humaneval:{args.prompts},gsm8k:{args.prompts} "
        f"--max-new-tokens {args.max_new_tokens}"
        + (f" --target {args.target}" if args.target else "")
        + "`).",
        "",
        f"Sizes: {args.prompts} prompt(s) of each workload's report split (the first half of "
        f"the set) x {args.max_new_tokens} new tokens, each policy x scenario, one run "
        "each after a per-worker warm-up"
        + (f"; the whole matrix took {elapsed / 60:.0f} min" if elapsed else "")
        + ". PipeSD used thresholds tuned on the HumanEval tuning split in `paper-5g` "
        f"(R1 = {th['r1']:.3f}, R2 = {th['r2']:.3f}, `bench/thresholds-humaneval-paper5g.json`) "
        "for every scenario and both workloads.",
        "",
        "Plots: [time per token](figures/time_per_token.png), "
        "[energy per token](figures/energy_per_token.png), "
        "[timeline of rounds, pipesd vs vanilla](figures/timeline.png).",
        "",
        "",
    ]
    links = "figures" if args.block == "matrix" else f"figures/{args.block}"
    text = "\n".join(head).replace("(figures/", f"({links}/") + md
    write_block(args.block, args.title, text)


if __name__ == "__main__":
    main()
