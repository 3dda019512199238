"""The edge keeps drafting while a verdict is pending (through a real cloud and a slow link):
drafts made during the wait are kept after a fully accepted window whose bonus matches them,
thrown away otherwise, and the output stays the target's."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cloudproc import CloudProcess
from conftest import TIE_MARGIN, top2_margin

from pipesd import Generator
from pipesd.link import Link
from pipesd.llama_backend import LlamaCppModel
from pipesd.policies.base import FixedLengthPolicy

PROMPT = "def merge_sort(items):\n"
N_NEW = 96


class DraftWhileWaiting(FixedLengthPolicy):
    name = "fixed-4-wait-6"
    wait_drafts = 6


def test_wait_drafts_kept_and_discarded_output_exact(smollm_path: Path, mild_draft: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    with Generator(draft=str(mild_draft), target=str(smollm_path), n_ctx=1024) as local:
        reference = local.generate(PROMPT, max_new_tokens=N_NEW, policy="target-only").tokens
        prompt_ids = local.tokenize(PROMPT)
    with contextlib.ExitStack() as stack:
        cloud = stack.enter_context(
            CloudProcess(smollm_path, tmp_path / "cloud.log", args=("--ctx", "1024"))
        )
        link = stack.enter_context(Link(("127.0.0.1", cloud.port), "wan"))
        address = f"127.0.0.1:{link.port}"
        gen = stack.enter_context(Generator(draft=str(mild_draft), cloud=address, n_ctx=1024))
        gen.cloud.reply_timeout = 60  # a dropped verify request fails the test, not hangs it
        res = gen.generate(PROMPT, max_new_tokens=N_NEW, policy=DraftWhileWaiting(4))
        # The same session again, twice: the next sequences start after drafts of the last one
        # were still in flight, and must not be mistaken for them.
        for _ in range(2):
            again = gen.generate(PROMPT, max_new_tokens=N_NEW, policy=DraftWhileWaiting(4))
            assert again.tokens == res.tokens and again.stats.reconnects == 0
    st = res.stats
    print(f"\nwait-drafted {st.wait_drafted}, kept {st.wait_kept}, rollbacks {st.rollbacks}, "
          f"verifications {st.verifications}")  # fmt: skip
    assert st.wait_drafted > 0
    assert st.wait_kept > 0, "no round kept its wait drafts"
    assert st.rollbacks > 0, "no round threw drafts away"
    # Windows vary in size here, so llama.cpp's batch-shape noise may flip a genuine tie (see
    # conftest.TIE_MARGIN); anything else is a bug.
    first = next(
        (i for i, (a, b) in enumerate(zip(reference, res.tokens, strict=False)) if a != b), None
    )
    if first is None:
        assert res.tokens == reference
    else:
        target = LlamaCppModel(smollm_path, n_ctx=1024)
        margin = top2_margin(target, prompt_ids + reference[:first])
        target.close()
        assert margin <= TIE_MARGIN["llama.cpp"], f"divergence at {first}, margin {margin}"
