"""The Python API: sync and async streams agree with generate(); results carry statistics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from pipesd import GenerationResult, Generator, PromptTooLongError


@pytest.fixture(scope="module")
def gen(mild_draft, smollm_path):
    with Generator(
        draft=str(mild_draft), target=str(smollm_path), target_backend="llama.cpp",
        policy="vanilla", draft_len=4, n_ctx=512,
    ) as g:  # fmt: skip
        yield g


def test_stream_generate_and_astream_agree(gen: Generator) -> None:
    prompt = "def greet(name):"
    stream = gen.stream(prompt, max_new_tokens=32)
    with pytest.raises(RuntimeError):
        _ = stream.result  # not finished yet
    events = list(stream)
    result = stream.result
    assert [e.token for e in events if e.token >= 0] == result.tokens
    assert "".join(e.text for e in events) == result.text
    assert result.text == gen.detokenize(result.tokens)
    again = gen.generate(prompt, max_new_tokens=32)
    assert again.tokens == result.tokens

    async def collect() -> tuple[list[int], GenerationResult]:
        toks = [e.token async for e in gen.astream(prompt, max_new_tokens=32) if e.token >= 0]
        return toks, await gen.agenerate(prompt, max_new_tokens=32)

    toks, res = asyncio.run(collect())
    assert toks == result.tokens == res.tokens


def test_statistics_are_consistent(gen: Generator) -> None:
    r = gen.generate("for i in range(10):", max_new_tokens=40)
    s = r.stats
    assert s.new_tokens == len(r.tokens) <= 40
    assert s.stop_reason in ("eos", "length")
    assert s.verifications > 0 and s.submitted >= s.accepted
    # Every committed token came from an accepted draft, a verdict's own token, the prefill's
    # first token or the target decoding alone.
    assert s.accepted + s.verifications + 1 + s.alone_tokens >= s.new_tokens
    assert 0.0 <= s.acceptance_rate <= 1.0
    assert s.wall_s > 0 and s.tokens_per_s > 0 and 0 < s.ttft_s <= s.wall_s
    assert s.drafted == s.submitted  # stop-and-wait: every draft goes to the verifier


def test_policies_share_loaded_models(gen: Generator) -> None:
    ref = gen.generate("x = [", max_new_tokens=16, policy="target-only")
    assert ref.stats.policy == "target-only" and ref.stats.drafted == 0
    draft = gen.generate("x = [", max_new_tokens=16, policy="draft-only")
    assert draft.stats.verifications == 0 and draft.stats.drafted == len(draft.tokens)
    with pytest.raises(PromptTooLongError):
        gen.generate("word " * 600, max_new_tokens=8)


def test_cli_json_output(mild_draft, smollm_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipesd.cli", "generate", "--json", "--draft", str(mild_draft),
         "--target", str(smollm_path), "--max-new-tokens", "12", "def add(a, b):"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert set(obj) == {"text", "tokens", "stats"}
    assert len(obj["tokens"]) == obj["stats"]["new_tokens"] <= 12
    for key in ("tokens_per_s", "ms_per_token", "acceptance_rate", "verifications",
                "mean_accepted"):  # fmt: skip
        assert key in obj["stats"]


def test_cli_streams_text_then_one_stats_line(mild_draft, smollm_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipesd.cli", "generate", "--draft", str(mild_draft),
         "--target", str(smollm_path), "--max-new-tokens", "12", "def add(a, b):"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    stats = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(stats) == 1 and "tok/s" in stats[0] and stats[0].startswith("[auto]")
    # The default policy either speculated or chose the target alone, and says which.
    assert "acceptance" in stats[0] or "by the target alone" in stats[0]
