"""Every bad input a user can give gets one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipesd import ModelError, models

PIPESD = [sys.executable, "-m", "pipesd.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PIPESD, *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("pipesd: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_unknown_model_name() -> None:
    proc = run_cli("generate", "--draft", "no-such-model", "--policy", "draft-only", "hi")
    assert_one_error_line(proc, "unknown model 'no-such-model'", "qwen2.5-coder-0.5b")


def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    proc = run_cli("generate", "--draft", str(missing), "--policy", "draft-only", "hi")
    assert_one_error_line(proc, "model file not found", str(missing))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    proc = run_cli("generate", "--draft", str(junk), "--policy", "draft-only", "hi")
    assert_one_error_line(proc, "not a GGUF model file")


def test_truncated_gguf(tmp_path: Path, smollm_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as src:
        cut.write_bytes(src.read(5_000_000))
    proc = run_cli("generate", "--draft", str(cut), "--policy", "draft-only", "hi")
    assert_one_error_line(proc, "could not load", str(cut))


def test_corrupt_cached_model(tmp_path: Path, smollm_path: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    with open(smollm_path, "rb") as src:
        (home / "models" / "smollm2-135m.gguf").write_bytes(src.read(1_000_000))
    proc = run_cli(
        "generate", "--draft", "smollm2-135m", "--policy", "draft-only", "hi",
        env={"PIPESD_HOME": str(home)},
    )  # fmt: skip
    assert_one_error_line(proc, "corrupt", "pipesd models fetch --force smollm2-135m")


def test_tokenizer_mismatch(smollm_path: Path, real_draft_path: Path) -> None:
    proc = run_cli("generate", "--draft", str(smollm_path), "--target", str(real_draft_path), "hi")
    assert_one_error_line(proc, "do not share a tokenizer", "vocabulary sizes 49152 and 151936")


def test_prompt_longer_than_context(smollm_path: Path) -> None:
    proc = run_cli(
        "generate", "--draft", str(smollm_path), "--target", str(smollm_path), "--ctx", "64",
        "--max-new-tokens", "8", "word " * 200,
    )  # fmt: skip
    assert_one_error_line(proc, "exceeds the context of 64")


def test_unknown_model_to_fetch() -> None:
    proc = run_cli("models", "fetch", "gpt-17")
    assert_one_error_line(proc, "unknown model 'gpt-17'")


def test_checksum_mismatch_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPESD_HOME", str(tmp_path))
    spec = models.REGISTRY["smollm2-135m"]
    monkeypatch.setitem(models.REGISTRY, spec.name, dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ModelError, match="checksum mismatch for smollm2-135m"):
        models.fetch(spec.name, progress=False)
    assert not list((tmp_path / "models").glob("smollm2*")), "a bad download was left behind"


def test_fetch_and_list_from_a_fresh_cache(tmp_path: Path) -> None:
    env = {"PIPESD_HOME": str(tmp_path)}
    proc = run_cli("models", "fetch", "smollm2-135m", env=env)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "models" / "smollm2-135m.gguf"
    assert path.stat().st_size == models.REGISTRY["smollm2-135m"].size
    again = run_cli("models", "fetch", "--verify", "smollm2-135m", env=env)
    assert again.returncode == 0 and "(cached)" in again.stdout
    listing = run_cli("models", "list", env={**env, "COLUMNS": "200"})
    assert listing.returncode == 0
    row = next(ln for ln in listing.stdout.splitlines() if "smollm2-135m" in ln)
    assert "yes" in row


def test_tune_and_thresholds_errors(tmp_path: Path) -> None:
    proc = run_cli("tune", "--budget", "0")
    assert_one_error_line(proc, "--budget must be >= 1")
    proc = run_cli("tune", "--workload", str(tmp_path / "none.jsonl"))
    assert_one_error_line(proc, "workload file not found")
    proc = run_cli("generate", "--thresholds", str(tmp_path / "th.json"), "hi")
    assert_one_error_line(proc, "thresholds file", "not found", "pipesd tune")
