"""``pipesd bench`` end to end on the small pair: every policy through local, the emulated link
and a CPU-limited edge; the outputs it writes; resuming after an interruption; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TIE_MARGIN

from pipesd import bench
from pipesd.policies import POLICIES

POLICY_SET = "target-only,draft-only,vanilla,hsl,edgellm,picospec,specpp,pipesd"
SCENARIOS = "local,s1,s3"
PROMPTS = [
    "def add(a, b):\n",
    "def is_prime(n):\n",
    "def reverse_words(text):\n",
    "def count_vowels(s):\n",
]


def run_bench(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipesd.cli", "bench", *args],
                          capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def bench_run(smollm_path: Path, mild_draft: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("bench")
    workload = tmp / "mine.jsonl"
    workload.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp / "out"
    args = ["--policies", POLICY_SET, "--scenarios", SCENARIOS, "--workload", f"{workload}:2",
            "--max-new-tokens", "12", "--out", str(out), "--draft", str(mild_draft),
            "--target", str(smollm_path), "--ctx", "1024"]  # fmt: skip
    proc = run_bench(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return args, out


def test_every_run_recorded_with_every_metric(bench_run: tuple[list[str], Path]) -> None:
    _, out = bench_run
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    # 8 policies x 3 scenarios x 2 prompts (the report split of 4 prompts is the first 2)
    assert len(runs) == 8 * 3 * 2
    keys = {(r["policy"], r["scenario"], r["prompt_index"]) for r in runs}
    assert len(keys) == len(runs)
    for r in runs:
        missing = set(bench.METRICS) - set(r)
        assert not missing, f"{r['policy']} {r['scenario']} lacks {missing}"
        assert r["workload"] == "mine" and r["task"] == "code"
        assert r["new_tokens"] > 0 and r["edge_energy_j"] > 0
        assert "modelled" in r["energy_source"]["edge"]
        assert "modelled" in r["energy_source"]["cloud"]
        if r["scenario"] == "local":
            assert r["bytes_up"] == 0 and r["bytes_down"] == 0
        elif r["policy"] != "draft-only":
            assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["cloud_cpu_s"] > 0
    by = {(r["policy"], r["scenario"], r["prompt_index"]): r for r in runs}
    # Parallel drafting happens only with a link to wait on.
    assert sum(by[("picospec", "s1", i)]["wait_drafted"] for i in (0, 1)) > 0
    assert sum(by[("picospec", "local", i)]["wait_drafted"] for i in (0, 1)) == 0
    # Greedy outputs: identical to target-only, or a genuine near-tie of llama.cpp.
    for r in runs:
        if r["policy"] in ("target-only", "draft-only"):
            assert r["matches_target_only"] is not None
            continue
        if not r["matches_target_only"]:
            margin = r["divergence"]["target_margin"]
            assert margin is not None and margin <= TIE_MARGIN["llama.cpp"], r["divergence"]


def test_reports_and_plots(bench_run: tuple[list[str], Path]) -> None:
    _, out = bench_run
    md = (out / "results.md").read_text()
    for sc in ("local", "s1", "s3"):
        assert f"## mine, {sc}:" in md
    assert "Speed-up of the row's policy over the column's" in md
    assert "| pipesd | " in md and "| specpp | " in md
    assert "modelled" in md
    for png in ("time_per_token.png", "energy_per_token.png", "timeline.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png


def test_resumes_without_repeating_finished_runs(bench_run: tuple[list[str], Path]) -> None:
    args, out = bench_run
    jsonl = out / "results.jsonl"
    lines = jsonl.read_text().splitlines()
    # Nothing left to do: no run repeats.
    proc = run_bench(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert jsonl.read_text().splitlines() == lines
    # Interrupted: the last two runs lost, the one before half-written.
    jsonl.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][: len(lines[-3]) // 2])
    proc = run_bench(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = bench.load_records(jsonl)
    assert len(records) == len(lines)
    assert {bench.run_key(r) for r in records} == {bench.run_key(json.loads(x)) for x in lines}


def test_cpu_limit_throttles_a_process() -> None:
    with bench.cpu_limit(0.2, "test") as group:
        assert group is not None
        assert (group / "cpu.cfs_quota_us").read_text().strip() == "20000"
        assert (group / "cpu.cfs_period_us").read_text().strip() == "100000"
        child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                                  "while time.time() - t < 0.6: pass"])  # fmt: skip
        bench.join_cgroup(group, child.pid)
        cgroup = Path(f"/proc/{child.pid}/cgroup").read_text()
        assert f"cpu:/{group.name}" in cgroup.replace(",cpuacct", "")
        child.wait()
        stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
        assert int(stat["nr_throttled"]) > 0
    assert not group.exists()
    with bench.cpu_limit(1.0, "none") as none:
        assert none is None


def test_cpu_limit_unavailable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr(bench, "CGROUP_CPU", tmp_path / "no-cgroup")
    limit = bench.cpu_limit(0.5, "x")
    with pytest.raises(bench.BenchError, match="cannot limit the edge to 0.5 of a core"):
        limit.__enter__()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policies", "vanilla,nope"], "unknown policies nope"),
        (["--scenarios", "s9"], "unknown scenarios s9"),
        (["--workload", "/nonexistent/prompts.jsonl"], "workload file not found"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--thresholds", "/nonexistent/t.json"], "thresholds file not found"),
    ],
)
def test_bad_input_one_line(extra: list[str], message: str, tmp_path: Path) -> None:
    args = ["--policies", "vanilla", "--scenarios", "local", "--workload", "gsm8k:1",
            "--out", str(tmp_path / "o"), *extra]  # fmt: skip
    proc = run_bench(args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "o" / "results.jsonl")


def test_gsm8k_ships_with_the_package_and_is_math() -> None:
    from pipesd import workloads

    assert len(workloads.load("gsm8k")) == 100
    assert workloads.task_of("gsm8k:4") == "math" and workloads.task_of("humaneval") == "code"
    assert workloads.load("gsm8k:3", split="report") == workloads.load("gsm8k")[:3]
    assert set(POLICIES) >= {"hsl", "edgellm", "picospec", "specpp"}


def test_every_metric_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "bench.md").read_text()
    for name in bench.METRICS:
        assert f"| `{name}` |" in doc, name


def test_report_only_covers_the_prompts_asked(bench_run: tuple[list[str], Path]) -> None:
    args, out = bench_run
    narrowed = list(args)
    i = narrowed.index("--workload")
    narrowed[i + 1] = narrowed[i + 1].rsplit(":", 1)[0] + ":1"
    proc = run_bench([*narrowed, "--report-only", "--no-plots"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 8 * 3 and {r["prompt_index"] for r in runs} == {0}
