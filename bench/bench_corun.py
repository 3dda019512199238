"""Co-running models on one host: what one model's forward pass costs while the other model
decodes on the other core.

``pipesd bench`` runs the edge (drafter) and the cloud (target) on the two cores of one
machine, so they share its memory bandwidth and last-level cache, which a split deployment
(a phone and a server) does not. Speculation drafts while the target verifies; target-only
decoding leaves the edge idle. This measures how much each side slows the other: the
foreground model (the drafter on the edge core, or a target on the cloud core) times passes of
n tokens after a fixed context, alternately with the other core idle and with the background
model decoding there in a loop (a child process, paused with SIGSTOP between busy phases, so
loading it costs nothing and the phases interleave: this VM's speed drifts over seconds).

Each figure is the median over --rounds phases of each kind, each phase at least --samples passes
and 1.5 s long, after one warm-up pass.

Usage: .venv/bin/python bench/bench_corun.py [--rounds 3] [--samples 6] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import commit_label, machine, pin, write_block

from pipesd import models

EDGE_CORE, CLOUD_CORE = 0, 1
CONTEXT = 64
PHASE_S = 1.5
HEADING = "## Co-running models on one host (bench/bench_corun.py)"


def _ids(vocab: int, n: int) -> list[int]:
    return [(7919 * i + 13) % vocab for i in range(n)]


def _load(path: Path) -> Any:
    from pipesd.llama_backend import LlamaCppModel

    m = LlamaCppModel(path, n_threads=1, n_ctx=512)
    m.decode(_ids(m.vocab_size, CONTEXT), all_logits=False)
    return m


def _pass_s(m: Any, size: int) -> float:
    """One pass of ``size`` tokens after the context (logits of every row), rolled back."""
    feed = _ids(m.vocab_size, CONTEXT + size)[CONTEXT:]
    t0 = time.perf_counter()
    m.decode(feed, all_logits=size > 1)
    dt = time.perf_counter() - t0
    m.truncate(CONTEXT)
    return dt


def background(path: str, size: int, core: int) -> None:
    """The child: decodes passes of ``size`` on ``core`` until killed."""
    pin(core)
    m = _load(Path(path))
    print("ready", flush=True)
    while True:
        _pass_s(m, size)


class Background:
    def __init__(self, path: Path, size: int, core: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--background", str(path), str(size), str(core)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"bench_corun: the background model {path.name} did not load")
        self.pause()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # let its last pass's memory traffic end

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        time.sleep(0.3)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def measure(fg: Path, sizes: list[int], bg: Path, bg_size: int, fg_core: int, bg_core: int,
            rounds: int, samples: int) -> list[dict[str, Any]]:  # fmt: skip
    pin(fg_core)
    m = _load(fg)
    for size in sizes:
        _pass_s(m, size)  # warm-up
    other = Background(bg, bg_size, bg_core)
    quiet: dict[int, list[float]] = {s: [] for s in sizes}
    busy: dict[int, list[float]] = {s: [] for s in sizes}
    try:
        for _ in range(rounds):
            for phase in (quiet, busy):
                if phase is busy:
                    other.resume()
                for size in sizes:
                    # At least `samples` passes and PHASE_S seconds: a phase spans several of
                    # the background's passes however short the foreground's are.
                    t0, n = time.perf_counter(), 0
                    while n < samples or time.perf_counter() - t0 < PHASE_S:
                        phase[size].append(_pass_s(m, size))
                        n += 1
                if phase is busy:
                    other.pause()
    finally:
        other.close()
        m.close()
    rows = []
    for size in sizes:
        q, b = statistics.median(quiet[size]), statistics.median(busy[size])
        rows.append({"model": fg.stem, "size": size, "background": f"{bg.stem}, passes of "
                     f"{bg_size}", "quiet_ms": 1000 * q, "busy_ms": 1000 * b})  # fmt: skip
    return rows


def markdown(m: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        f"Machine: {m['cpu']}, {m['cores']} cores; {commit_label(m)}, {m['date']}. Command: "
        f"`.venv/bin/python bench/bench_corun.py --rounds {args.rounds} --samples "
        f"{args.samples}`. One thread per model; the drafter on core {EDGE_CORE}, targets on "
        f"core {CLOUD_CORE}, as `pipesd bench` pins them. Context {CONTEXT} tokens; median "
        f"over {args.rounds} interleaved phases of each kind (each at least {args.samples} "
        f"passes and {PHASE_S} s).\n\n"
        "| model | pass of | other core | alone, ms | other core busy, ms | slowdown |\n"
        "|---|---:|---|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['size']} | {r['background']} | {r['quiet_ms']:.1f} | "
        f"{r['busy_ms']:.1f} | {r['busy_ms'] / r['quiet_ms']:.2f}x |\n"
        for r in rows
    )
    return head + body.rstrip()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--background":
        background(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("out"))
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    draft = models.resolve("qwen2.5-coder-0.5b")
    q4 = models.resolve("qwen2.5-coder-1.5b")
    f16 = models.resolve("qwen2.5-coder-1.5b-f16")
    rows: list[dict[str, Any]] = []
    kw = {"rounds": args.rounds, "samples": args.samples}
    for target, verify in ((q4, 4), (f16, 4)):
        rows += measure(draft, [1], target, verify, EDGE_CORE, CLOUD_CORE, **kw)
        rows += measure(target, [1, 4, 8], draft, 1, CLOUD_CORE, EDGE_CORE, **kw)
    m = machine()
    text = markdown(m, rows, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corun.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    if not args.no_write:
        write_block("corun", HEADING, text)


if __name__ == "__main__":
    main()
