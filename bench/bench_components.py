"""Component timings: draft per token, and per target backend verify-k and decode per token.

One thread per model; the draft is pinned to one core and each target to another. Each figure
is the median of --repeats timed repetitions after one warm-up.

  verify k   one target forward pass over [last committed token, k drafts] with the logits of
             every position, plus greedy acceptance, then the KV rollback to where it started
  decode     target-only decoding: one forward pass per token (median per token)
  draft      the draft model, one token per forward pass (median per token)

Usage: .venv/bin/python bench/bench_components.py [--repeats 5] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine, pin, write_block
from rich.console import Console
from rich.table import Table

from pipesd import models
from pipesd.cloud.targets import TorchTarget
from pipesd.cloud.verifier import verify_greedy
from pipesd.llama_backend import LlamaCppModel
from pipesd.workloads import humaneval_prompts

VERIFY_SIZES = (1, 2, 4, 8, 16)
DECODE_TOKENS = 16


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def bench_decode(model: Any, prompt: list[int], repeats: int) -> float:
    """Median seconds per token of one-token greedy decoding after the prompt."""
    per_token = []
    for r in range(repeats + 1):  # the first is the warm-up
        model.truncate(0)
        model.decode(prompt[:-1], all_logits=False)
        last = prompt[-1]
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            row = model.decode([last], all_logits=False)[-1]
            last = int(np.argmax(row))
        if r:
            per_token.append((time.perf_counter() - t0) / DECODE_TOKENS)
    return median_ms(per_token)


def bench_verify(model: Any, prompt: list[int], repeats: int) -> dict[int, float]:
    model.truncate(0)
    model.decode(prompt[:-1], all_logits=False)
    base = model.kv_len
    drafts_pool = prompt[: max(VERIFY_SIZES)]
    out = {}
    for k in VERIFY_SIZES:
        samples = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            logits = model.decode([prompt[-1], *drafts_pool[:k]], all_logits=True)
            verify_greedy(logits, drafts_pool[:k])
            model.truncate(base)
            if r:
                samples.append(time.perf_counter() - t0)
        out[k] = median_ms(samples)
    return out


def run(repeats: int, out_dir: Path) -> dict[str, Any]:
    prompt_text = humaneval_prompts()[0]
    draft_path = models.resolve(models.DEFAULT_DRAFT)
    target_path = models.resolve(models.DEFAULT_TARGET)
    import torch

    result: dict[str, Any] = {"machine": machine(), "repeats": repeats, "threads": 1}
    result["machine"]["torch"] = torch.__version__

    pin(0)
    draft = LlamaCppModel(draft_path, n_ctx=1024, n_threads=1)
    prompt = draft.tokenize(prompt_text)
    result["prompt_tokens"] = len(prompt)
    result["draft_ms_per_token"] = bench_decode(draft, prompt, repeats)
    draft.close()

    pin(1)
    result["targets"] = {}
    for backend in ("llama.cpp", "torch"):
        t0 = time.perf_counter()
        if backend == "torch":
            target: Any = TorchTarget(target_path, n_ctx=1024, threads=1)
        else:
            target = LlamaCppModel(target_path, n_ctx=1024, n_threads=1)
        load_s = time.perf_counter() - t0
        result["targets"][backend] = {
            "load_s": load_s,
            "decode_ms_per_token": bench_decode(target, prompt, repeats),
            "verify_ms": bench_verify(target, prompt, repeats),
        }
        del target
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "components.json").write_text(json.dumps(result, indent=2))
    return result


def table_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}; "
        f"commit {m['commit']}, {m['date']}. One thread per model, draft pinned to core 0, "
        f"target to core 1; median of {r['repeats']} repeats after a warm-up; prompt "
        f"HumanEval/0 ({r['prompt_tokens']} tokens). Command: "
        "`.venv/bin/python bench/bench_components.py`.",
        "",
        f"Draft `{models.DEFAULT_DRAFT}` (llama.cpp): **{r['draft_ms_per_token']:.1f} ms/token**.",
        "",
        "| target backend (`"
        + models.DEFAULT_TARGET
        + "`) | decode ms/token | "
        + " | ".join(f"verify {k}" for k in VERIFY_SIZES)
        + " | load s |",
        "|---|---:|" + "---:|" * len(VERIFY_SIZES) + "---:|",
    ]
    for name, t in r["targets"].items():
        cells = " | ".join(f"{t['verify_ms'][k]:.0f}" for k in VERIFY_SIZES)
        lines.append(f"| {name} | {t['decode_ms_per_token']:.1f} | {cells} | {t['load_s']:.1f} |")
    lines.append("")
    lines.append("Verify times in ms: one forward pass over the last committed token and k drafts.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("out"))
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    r = run(args.repeats, args.out)
    table = Table(title="PipeSD components (ms)")
    table.add_column("what")
    table.add_column("ms", justify="right")
    table.add_row("draft per token", f"{r['draft_ms_per_token']:.1f}")
    for name, t in r["targets"].items():
        table.add_row(f"{name} decode per token", f"{t['decode_ms_per_token']:.1f}")
        for k, v in t["verify_ms"].items():
            table.add_row(f"{name} verify {k}", f"{v:.0f}")
    Console().print(table)
    if not args.no_write:
        write_block("components", "## Components", table_markdown(r))


if __name__ == "__main__":
    main()
