"""``pipesd models convert``: the re-quantised file, its record and name, and bad input.

Everything is written under a temporary $PIPESD_HOME whose cache holds a link to the real
smollm2-135m, so the user's cache is only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from pipesd import ModelError, convert, models
from pipesd.llama_backend import LlamaCppModel

PIPESD = [sys.executable, "-m", "pipesd.cli"]
SOURCE = "smollm2-135m"
PROMPT = "def add(a, b):\n    return"

F32 = GGMLQuantizationType.F32
MATRIX_TYPE = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}


def expected_type(name: str, n_dims: int, fmt: str) -> GGMLQuantizationType:
    """What llama.cpp's quantiser writes for smollm2-135m (its default mix, not --pure).

    1-D tensors (the norms) stay F32. For the quantised formats llama.cpp gives the output
    matrix (here the tied token_embd.weight) Q6_K unless the format is Q8_0, and falls back to
    Q8_0 when the row length (576) is not a multiple of Q6_K's 256-wide blocks.
    """
    if n_dims == 1:
        return F32
    if fmt == "q4_0" and name == "token_embd.weight":
        return GGMLQuantizationType.Q8_0
    return MATRIX_TYPE[fmt]


def make_home(root: Path, smollm_path: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / f"{SOURCE}.gguf").symlink_to(smollm_path)
    return root


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIPESD_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([*PIPESD, *args], capture_output=True, text=True, timeout=300, env=env)


def cache_files(home: Path) -> set[str]:
    return {p.name for p in (home / "models").iterdir()}


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("pipesd: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, smollm_path: Path) -> Path:
    return make_home(tmp_path_factory.mktemp("convert") / "home", smollm_path)


@pytest.fixture(scope="module")
def source_tokens(smollm_path: Path) -> list[int]:
    return greedy(smollm_path, 8)


def greedy(path: Path, n: int) -> list[int]:
    m = LlamaCppModel(path, n_ctx=256)
    try:
        out: list[int] = []
        step = m.tokenize(PROMPT)
        for _ in range(n):
            logits = m.decode(step, all_logits=False)
            assert logits.shape == (1, m.vocab_size) and np.isfinite(logits).all()
            out.append(int(np.argmax(logits[0])))
            step = [out[-1]]
        return out
    finally:
        m.close()


@pytest.fixture(scope="module", params=list(MATRIX_TYPE))
def converted(request: pytest.FixtureRequest, home: Path) -> tuple[str, Path]:
    fmt: str = request.param
    proc = run_cli(home, "models", "convert", SOURCE, "--to", fmt)
    assert proc.returncode == 0, proc.stderr
    path = home / "models" / f"{SOURCE}-{fmt}.gguf"
    assert proc.stdout.startswith(f"{SOURCE}-{fmt}: {path} ("), proc.stdout
    assert "llama_model" not in proc.stderr, "llama.cpp's log is not silenced"
    return fmt, path


def test_converted_file_has_the_format(converted: tuple[str, Path], home: Path) -> None:
    fmt, path = converted
    reader = GGUFReader(path)
    assert len(reader.tensors) == 272
    wrong = [
        (t.name, t.tensor_type.name)
        for t in reader.tensors
        if t.tensor_type != expected_type(t.name, len(t.shape), fmt)
    ]
    assert not wrong, wrong
    types = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    assert MATRIX_TYPE[fmt] in types

    record = json.loads((home / "models" / f"{path.name}.json").read_text())
    assert record["name"] == f"{SOURCE}-{fmt}" and record["format"] == fmt
    assert record["source"] == SOURCE
    assert record["size"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [n for n in cache_files(home) if n.startswith(".") or "partial" in n]


def test_converted_file_loads_and_decodes(
    converted: tuple[str, Path], source_tokens: list[int]
) -> None:
    fmt, path = converted
    tokens = greedy(path, 8)
    # The same model at another precision: the confident start of the continuation agrees.
    assert tokens[:3] == source_tokens[:3], (fmt, tokens, source_tokens)


def test_converted_name_resolves(
    converted: tuple[str, Path], home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt, path = converted
    monkeypatch.setenv("PIPESD_HOME", str(home))
    assert models.resolve(f"{SOURCE}-{fmt}") == path
    assert f"{SOURCE}-{fmt}" in {c.name for c in convert.converted_models()}


def ensure_converted(home: Path, fmt: str) -> Path:
    path = home / "models" / f"{SOURCE}-{fmt}.gguf"
    if not path.exists():
        proc = run_cli(home, "models", "convert", SOURCE, "--to", fmt)
        assert proc.returncode == 0, proc.stderr
    return path


def test_converted_name_in_list_and_generate(home: Path) -> None:
    fmt = "q8_0"
    ensure_converted(home, fmt)
    listing = run_cli(home, "models", "list")
    assert listing.returncode == 0, listing.stderr
    row = next(ln for ln in listing.stdout.splitlines() if f"{SOURCE}-{fmt} " in ln)
    assert "converted" in row and "yes" in row
    proc = run_cli(
        home, "generate", "--policy", "target-only", "--draft", SOURCE,
        "--target", f"{SOURCE}-{fmt}", "--target-backend", "llama.cpp", "--max-new-tokens", "4",
        PROMPT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(" a + b"), proc.stdout


def test_second_convert_keeps_the_file_force_redoes_it(home: Path) -> None:
    path = ensure_converted(home, "q8_0")
    before = path.stat()
    again = run_cli(home, "models", "convert", SOURCE, "--to", "q8_0")
    assert again.returncode == 0, again.stderr
    assert "already converted" in again.stdout
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
    forced = run_cli(home, "models", "convert", SOURCE, "--to", "q8_0", "--force")
    assert forced.returncode == 0, forced.stderr
    assert path.stat().st_ino != before.st_ino  # a new file renamed into place
    record = json.loads((home / "models" / f"{path.name}.json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_a_path(tmp_path: Path, smollm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(tmp_path / "home", smollm_path)
    src = tmp_path / "mini.gguf"
    src.symlink_to(smollm_path)
    proc = run_cli(home, "models", "convert", str(src), "--to", "q8_0")
    assert proc.returncode == 0, proc.stderr
    out = home / "models" / "mini-q8_0.gguf"
    assert proc.stdout.startswith(f"mini-q8_0: {out} ("), proc.stdout
    monkeypatch.setenv("PIPESD_HOME", str(home))
    assert models.resolve("mini-q8_0") == out
    assert json.loads((home / "models" / "mini-q8_0.gguf.json").read_text())["source"] == str(src)


@pytest.mark.parametrize(
    ("source", "fmt", "needles"),
    [
        (SOURCE, "q5_k", ["unknown target format 'q5_k'", "f16, q8_0, q4_0"]),
        ("no-such-model", "f16", ["unknown model 'no-such-model'"]),
        ("{tmp}/absent.gguf", "f16", ["model file not found", "absent.gguf"]),
        ("{tmp}/junk.gguf", "f16", ["is not a GGUF model file"]),
        ("{tmp}/cut.gguf", "q8_0", ["llama.cpp could not convert", "not within the file bounds"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    tmp_path: Path, smollm_path: Path, source: str, fmt: str, needles: list[str]
) -> None:
    home = make_home(tmp_path / "home", smollm_path)
    (tmp_path / "junk.gguf").write_bytes(b"this is not a model" * 1000)
    with open(smollm_path, "rb") as f:  # a valid header, tensor data cut off
        (tmp_path / "cut.gguf").write_bytes(f.read(5_000_000))
    proc = run_cli(home, "models", "convert", source.format(tmp=tmp_path), "--to", fmt)
    assert_one_error_line(proc, *needles)
    assert cache_files(home) == {f"{SOURCE}.gguf"}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ModelError])
def test_interrupted_or_failed_convert_leaves_no_partial_file(
    tmp_path: Path, smollm_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]
) -> None:
    home = make_home(tmp_path / "home", smollm_path)
    monkeypatch.setenv("PIPESD_HOME", str(home))

    def half_written(src: Path, dst: Path, fmt: str, **kwargs: object) -> None:
        dst.write_bytes(b"GGUF" + b"\0" * 1000)
        raise exc("stopped half way")

    monkeypatch.setattr(convert, "_quantize", half_written)
    with pytest.raises(exc):
        convert.convert(SOURCE, "f16", progress=False)
    assert cache_files(home) == {f"{SOURCE}.gguf"}


def test_unconverted_and_corrupt_names(
    tmp_path: Path, smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = make_home(tmp_path / "home", smollm_path)
    monkeypatch.setenv("PIPESD_HOME", str(home))
    with pytest.raises(ModelError, match=r"run `pipesd models convert smollm2-135m --to q4_0`"):
        models.resolve(f"{SOURCE}-q4_0")
    bad = home / "models" / f"{SOURCE}-f16.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelError, match="no record .* incomplete"):
        models.resolve(f"{SOURCE}-f16")
    record = {"name": bad.stem, "format": "f16", "source": SOURCE, "size": 999, "sha256": "0"}
    (home / "models" / f"{bad.name}.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match="corrupt; run `pipesd models convert --force"):
        models.resolve(f"{SOURCE}-f16")
