"""Target-only through a real cloud: requests for the next tokens are kept outstanding so the
cloud decodes without waiting a round trip per token, and answers still outstanding when a
sequence ends never leak into the next one."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cloudproc import CloudProcess

from pipesd import Generator
from pipesd.link import Link

PROMPT = "def merge_sort(items):\n"


def test_pipelined_target_only_exact_and_leftovers_dropped(smollm_path: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    model = str(smollm_path)
    with Generator(draft=model, target=model, n_ctx=1024) as local:
        reference = local.generate(PROMPT, max_new_tokens=40, policy="target-only").tokens
    with contextlib.ExitStack() as stack:
        cloud = stack.enter_context(
            CloudProcess(smollm_path, tmp_path / "cloud.log", args=("--ctx", "1024"))
        )
        link = stack.enter_context(Link(("127.0.0.1", cloud.port), "paper-5g"))
        gen = stack.enter_context(Generator(draft=model, cloud=f"127.0.0.1:{link.port}",
                                            n_ctx=1024))  # fmt: skip
        assert gen.cloud.max_inflight > 1
        trace: list[tuple[str, float, float]] = []
        res = gen.generate(PROMPT, max_new_tokens=40, policy="target-only", trace=trace)
        assert res.tokens == reference
        # Requests run ahead of answers: some request was sent before the answer to the
        # previous one arrived.
        outstanding, most = 0, 0
        for kind, _, _ in trace:
            outstanding += 1 if kind == "verify" else -1 if kind == "verdict" else 0
            most = max(most, outstanding)
        assert most > 1
        # A sequence that ends with requests outstanding (here sent by hand past its end):
        # their answers arrive during the next sequence and are dropped there.
        n = len(gen.tokenize(PROMPT)) + 40
        for k in range(3):
            gen.cloud.send(0, n + k, [], None, verify=True)
        again = gen.generate(PROMPT, max_new_tokens=40, policy="target-only")
        assert again.tokens == reference and again.stats.reconnects == 0
        for k in range(2):
            gen.cloud.send(0, n + k, [], None, verify=True)
        spec = gen.generate(PROMPT, max_new_tokens=40, policy="vanilla", draft_len=4)
        assert spec.tokens == reference and spec.stats.reconnects == 0
