"""Shared fixtures: the real models (fetched through the registry) and perturbed copies."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipesd import bench, models
from pipesd.cloud.weights import read_gguf

F32 = 0  # ggml type id of float32 tensors

#: What the test session shares with the user's cache: fetched models, measured costs and
#: dequantised torch weights (expensive to make, the same for every test).
SHARED_CACHE = ("models", "costs", "torch-cache")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A $PIPESD_HOME for the session (child processes inherit it) linking the user's models,
    costs and torch cache, so what a Generator learns of a pair (``acceptance/``) and files a
    test writes there start empty and never reach the user's cache."""
    real = models.pipesd_home()
    home = tmp_path_factory.mktemp("pipesd-home")
    for name in SHARED_CACHE:
        (real / name).mkdir(parents=True, exist_ok=True)
        (home / name).symlink_to(real / name, target_is_directory=True)
    before = os.environ.get("PIPESD_HOME")
    os.environ["PIPESD_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("PIPESD_HOME", None)
    else:
        os.environ["PIPESD_HOME"] = before


def perturbed_copy(src: Path, dest: Path, *, sigma: float, seed: int) -> Path:
    """A copy of a GGUF model whose float32 norm weights are scaled by 1 + N(0, sigma).

    The quantised matrices stay byte-identical, so the copy is the same model family with a
    controllable amount of disagreement: a draft that often, or rarely, matches its original.
    """
    shutil.copyfile(src, dest)
    info = read_gguf(dest)
    rng = np.random.default_rng(seed)
    with open(dest, "r+b") as f:
        for t in info.tensors.values():
            if t.qtype != F32 or not t.name.endswith("norm.weight"):
                continue
            f.seek(t.offset)
            w = np.frombuffer(f.read(t.nbytes), dtype="<f4").copy()
            w *= 1.0 + sigma * rng.standard_normal(w.shape).astype(np.float32)
            f.seek(t.offset)
            f.write(w.astype("<f4").tobytes())
    return dest


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return models.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smollm_vocab(smollm_path: Path) -> tuple[int, str, list[int]]:
    """What a raw client says in HELLO for smollm2 (vocabulary size, tokenizer hash), and the
    token ids of a short prompt ("def is_prime(n):\n") to prefill with."""
    from pipesd.llama_backend import LlamaCppModel, tokenizer_fingerprint

    m = LlamaCppModel(smollm_path, vocab_only=True)
    texts = m.token_texts()
    ids = m.tokenize("def is_prime(n):\n")
    m.close()
    return len(texts), tokenizer_fingerprint(texts), ids


@pytest.fixture(scope="session")
def real_draft_path() -> Path:
    return models.resolve(models.DEFAULT_DRAFT)


@pytest.fixture(scope="session")
def real_target_path() -> Path:
    return models.resolve(models.DEFAULT_TARGET)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mild_draft(smollm_path: Path, model_dir: Path) -> Path:
    """smollm2 with mildly perturbed norms: agrees with the original most of the time."""
    return perturbed_copy(smollm_path, model_dir / "smollm2-mild.gguf", sigma=0.08, seed=1)


@pytest.fixture(scope="session")
def sampling_draft(smollm_path: Path, model_dir: Path) -> Path:
    """smollm2 with perturbed norms accepting ~40% of sampled drafts at temperature 1."""
    return perturbed_copy(smollm_path, model_dir / "smollm2-sampling.gguf", sigma=0.2, seed=1)


@pytest.fixture(scope="session")
def wild_draft(smollm_path: Path, model_dir: Path) -> Path:
    """smollm2 with strongly perturbed norms: disagrees with the original often."""
    return perturbed_copy(smollm_path, model_dir / "smollm2-wild.gguf", sigma=0.6, seed=2)


# A divergence between speculative and target-only greedy output is a genuine tie only when the
# target's top-two logits at that position are closer than the backend's batch-shape noise:
#   torch fp32: batched and one-token matmuls differ by ~1e-4 in the logits; margin 0.02.
#   llama.cpp: its CPU kernels differ by ubatch size class (1, 2-3, 4-7, 8+), measured up to
#     0.9 on the 1.5B Q4_K and 1.3 on smollm2 Q4_1 for the same position; margin 1.5.
TIE_MARGIN = {"torch": 0.02, "llama.cpp": 1.5}


def top2_margin(target, context: list[int]) -> float:
    """The target's top-1 minus top-2 logit for the token after ``context`` (one-token step)."""
    return bench.top2_margin(target, context)


def check_lossless(gen, prompt: list[int], n_new: int, backend: str, *, max_restarts: int = 3,
                   **spec_kwargs) -> tuple[int, list[tuple[int, float]], int]:  # fmt: skip
    """Compares speculative output with target-only output token for token.

    On a divergence, asserts it is a genuine tie (see TIE_MARGIN), then restarts both from the
    reference prefix so the rest of the budget is still checked. Returns (tokens compared,
    [(position, margin)] of ties, rollbacks seen).
    """
    compared, ties, rollbacks = 0, [], 0
    context, remaining = list(prompt), n_new
    for _ in range(max_restarts + 1):
        ref = gen.generate(context, max_new_tokens=remaining, policy="target-only").tokens
        res = gen.generate(context, max_new_tokens=remaining, **spec_kwargs)
        rollbacks += res.stats.rollbacks
        spec = res.tokens
        first = next((i for i, (a, b) in enumerate(zip(ref, spec, strict=False)) if a != b), None)
        if first is None:
            assert len(spec) == len(ref), f"lengths differ: {len(spec)} vs {len(ref)}"
            return compared + len(ref), ties, rollbacks
        margin = top2_margin(gen.target, context + ref[:first])
        pos = len(context) - len(prompt) + first
        assert margin <= TIE_MARGIN[backend], (
            f"divergence at new token {pos}: reference {ref[first]} vs speculative "
            f"{spec[first]}, top-two margin {margin:.4f} > {TIE_MARGIN[backend]} ({backend})"
        )
        ties.append((pos, margin))
        compared += first + 1
        context += ref[: first + 1]
        remaining -= first + 1
        if remaining <= 0:
            return compared, ties, rollbacks
    return compared, ties, rollbacks
