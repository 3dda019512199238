"""What every benchmark here shares: the machine it ran on, core pinning, RESULTS.md blocks."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from pipesd.tune import pin

__all__ = ["HERE", "RESULTS_MD", "commit_label", "machine", "pin", "write_block"]

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"


def machine() -> dict[str, Any]:
    """CPU model, cores, Python, the git commit (and whether the tree differs), date, load."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE).stdout

    commit = git("rev-parse", "--short", "HEAD").strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit or "uncommitted",
        # The results file itself is rewritten by every benchmark; it does not make code dirty.
        "dirty": bool(commit)
        and bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!RESULTS.md")),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": os.getloadavg()[0],
    }


def commit_label(m: dict[str, Any]) -> str:
    return str(m["commit"]) + (" with uncommitted changes" if m.get("dirty") else "")


def write_block(name: str, heading: str, body: str, *, after: str | None = None) -> None:
    """Replaces the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in RESULTS.md.

    A missing block is added under ``heading``: before the section that follows the heading
    ``after`` if given and present, else at the end. The file is read right before writing, so
    blocks other benchmarks wrote meanwhile stay.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body}\n{end}"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        RESULTS_MD.write_text(head + block + rest.split(end, 1)[1])
        return
    section = f"{heading}\n\n{block}\n"
    lines = text.splitlines(keepends=True)
    start = None
    if after is not None:
        start = next((i for i, ln in enumerate(lines) if ln.startswith(after)), None)
    nxt = None
    if start is not None:
        nxt = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), None)
    if nxt is None:
        text = text.rstrip() + "\n\n" + section
    else:
        text = "".join(lines[:nxt]).rstrip() + "\n\n" + section + "\n" + "".join(lines[nxt:])
    RESULTS_MD.write_text(text)
