"""Each baseline's defining decision: when it triggers, how its threshold moves, what it
keeps after a rejection; and that each stays lossless on a real pair."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from cloudproc import CloudProcess
from conftest import TIE_MARGIN, top2_margin

from pipesd import Generator
from pipesd.cloud.verifier import Verdict
from pipesd.edge.drafter import DraftToken
from pipesd.link import Link
from pipesd.llama_backend import LlamaCppModel
from pipesd.policies import make_policy
from pipesd.policies.baselines import EdgeLLMPolicy, HSLPolicy, PicoSpecPolicy, SpecPPPolicy


def tok(confidence: float) -> DraftToken:
    return DraftToken(token=1, confidence=confidence, dist=None)


def verdict(drafted: int, accepted: int) -> Verdict:
    return Verdict(epoch=0, start=0, drafted=drafted, accepted=accepted, next_token=2,
                   verify_s=0.0)  # fmt: skip


def assert_same_or_tie(target_path: Path, prompt: str, reference: list[int],
                      tokens: list[int]) -> None:  # fmt: skip
    """Greedy output equals target-only's, or first differs at a genuine near-tie of
    llama.cpp's batch-shape-dependent arithmetic (conftest.TIE_MARGIN); anything else fails."""
    first = next((i for i, (a, b) in enumerate(zip(reference, tokens, strict=False)) if a != b),
                 None)  # fmt: skip
    if first is None:
        assert tokens == reference
        return
    target = LlamaCppModel(target_path, n_ctx=1024)
    margin = top2_margin(target, target.tokenize(prompt) + reference[:first])
    target.close()
    assert margin <= TIE_MARGIN["llama.cpp"], f"divergence at {first}, margin {margin}"


def fires_at(policy, confidences: list[float]) -> int | None:  # type: ignore[no-untyped-def]
    """The window position (1-based) at which the policy triggers, or None."""
    for i, c in enumerate(confidences, 1):
        if policy.should_verify(i, tok(c)):
            return i
    return None


# ------------------------------------------------------------------------------- HSL
def test_hsl_triggers_on_the_first_token_below_its_threshold() -> None:
    code = make_policy("hsl", draft_len=6, task="code")
    math = make_policy("hsl", draft_len=4, task="math")
    assert isinstance(code, HSLPolicy) and code.threshold == 0.99
    assert isinstance(math, HSLPolicy) and math.threshold == 0.7
    confs = [0.999, 0.995, 0.98, 0.5]
    assert fires_at(HSLPolicy(0.99), confs) == 3  # 0.98 < 0.99
    assert fires_at(HSLPolicy(0.7), confs) == 4  # only 0.5 < 0.7
    # Confidence alone decides, not the count or the product: 30 confident drafts never fire.
    assert fires_at(HSLPolicy(0.7), [0.71] * 30) is None
    # The whole draft goes at once, and the edge waits for the verdict.
    assert not code.should_send(3) and code.wait_drafts == 0


# --------------------------------------------------------------------------- EdgeLLM
def test_edgellm_triggers_on_the_running_product() -> None:
    p = EdgeLLMPolicy(initial=0.5)
    # 0.9, 0.81, 0.729, 0.6561, 0.59, 0.531, 0.478 <= 0.5 at the 7th
    assert fires_at(p, [0.9] * 10) == 7
    # The product restarts after a trigger.
    assert fires_at(p, [0.9] * 10) == 7
    assert p.wait_drafts > 0  # it keeps drafting during verification


def test_edgellm_threshold_halves_after_full_acceptance_and_rises_after_rejection() -> None:
    p = EdgeLLMPolicy(initial=0.4)
    assert fires_at(p, [0.6, 0.6]) == 2  # C = 0.36
    p.on_verdict(verdict(2, 2))
    assert p.threshold == pytest.approx(0.2)
    assert fires_at(p, [0.5, 0.5, 0.5]) == 3  # C = 0.125 <= 0.2
    p.on_verdict(verdict(3, 1))  # R <- R / C^((N - N_acc) / N) = 0.2 / 0.125^(2/3)
    assert p.threshold == pytest.approx(0.2 / 0.125 ** (2 / 3))
    # A window cut without a trigger uses the running product, then restarts it.
    p.should_verify(1, tok(0.99))
    before = p.threshold
    p.on_verdict(verdict(1, 0))
    assert p.threshold == pytest.approx(min(0.999, before / 0.99))
    assert p.cumulative == 1.0


def test_edgellm_learns_from_rejections_in_a_real_run(smollm_path: Path, mild_draft: Path) -> None:
    """The decoder reports a rejecting verdict before the rollback, so the threshold rises."""

    class Recording(EdgeLLMPolicy):
        moves: list[float] = []

        def adapt(self, c: float, n: int, n_acc: int) -> None:
            before = self.threshold
            super().adapt(c, n, n_acc)
            self.moves.append(self.threshold - before)

    with Generator(draft=str(mild_draft), target=str(smollm_path), n_ctx=1024) as gen:
        ref = gen.generate("def quicksort(arr):\n", max_new_tokens=96, policy="target-only")
        policy = Recording()
        res = gen.generate("def quicksort(arr):\n", max_new_tokens=96, policy=policy)
    assert res.stats.rollbacks > 0
    assert any(m > 0 for m in policy.moves), "no rejection raised the threshold"
    assert any(m < 0 for m in policy.moves), "no full acceptance lowered it"
    assert_same_or_tie(smollm_path, "def quicksort(arr):\n", ref.tokens, res.tokens)


# -------------------------------------------------------------------------- PicoSpec
def test_picospec_drafts_the_next_round_during_verification() -> None:
    p = make_policy("picospec", draft_len=4)
    assert isinstance(p, PicoSpecPolicy)
    assert p.wait_drafts == 4  # a whole next round is drafted while this one is verified
    assert fires_at(p, [0.1] * 10) == 4  # a fixed length, whatever the confidence


def test_picospec_keeps_wait_drafts_only_after_a_full_accept(smollm_path: Path,
                                                              mild_draft: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    prompt = "def merge_sort(items):\n"
    with Generator(draft=str(mild_draft), target=str(smollm_path), n_ctx=1024) as local:
        reference = local.generate(prompt, max_new_tokens=64, policy="target-only").tokens
    with contextlib.ExitStack() as stack:
        cloud = stack.enter_context(
            CloudProcess(smollm_path, tmp_path / "cloud.log", args=("--ctx", "1024"))
        )
        link = stack.enter_context(Link(("127.0.0.1", cloud.port), "wan"))
        gen = stack.enter_context(
            Generator(draft=str(mild_draft), cloud=f"127.0.0.1:{link.port}", n_ctx=1024)
        )
        res = gen.generate(prompt, max_new_tokens=64, policy=PicoSpecPolicy(4))
    st = res.stats
    assert st.wait_drafted > 0 and 0 < st.wait_kept < st.wait_drafted
    assert st.rollbacks > 0  # rejected rounds threw their parallel drafts away
    assert_same_or_tie(smollm_path, prompt, reference, res.tokens)


# ---------------------------------------------------------------------------- SpecPP
def test_specpp_stops_when_all_accepted_becomes_unlikely() -> None:
    p = SpecPPPolicy(threshold=0.4)
    # Fresh calibration: a draft of confidence 0.95 (bin 9, centre 0.95) is accepted w.p. 0.95.
    assert p.accept_prob(0.95) == pytest.approx(0.95)
    # 0.95^k < 0.4 first at k = 18.
    assert fires_at(p, [0.95] * 30) == 18
    # One unsure draft ends the window sooner: 0.95 * 0.95 * 0.35 < 0.4.
    assert fires_at(p, [0.95, 0.95, 0.35]) == 3


def test_specpp_calibrates_acceptance_from_verdicts() -> None:
    p = SpecPPPolicy(threshold=0.1)  # low enough that each 3-draft window runs to its end
    before_high, before_low = p.accept_prob(0.95), p.accept_prob(0.55)
    for _ in range(20):  # high-confidence drafts rejected, mid-confidence ones accepted
        fires_at(p, [0.55, 0.55, 0.95])
        p.on_verdict(verdict(3, 2))
    assert p.accept_prob(0.95) < before_high - 0.3
    assert p.accept_prob(0.55) > before_low + 0.3
    # Drafts after the first rejection were never judged: they do not move the table.
    q = SpecPPPolicy(threshold=0.01)
    assert fires_at(q, [0.15, 0.95]) is None
    q.on_verdict(verdict(2, 0))
    assert q.accept_prob(0.95) == pytest.approx(0.95)
    assert q.accept_prob(0.15) < 0.15
    # Calibrated this way, a high-confidence run now stops much sooner (fresh: at 45).
    assert fires_at(SpecPPPolicy(threshold=0.1), [0.95] * 60) == 45
    assert (fires_at(p, [0.95] * 30) or 99) < 6


@pytest.mark.parametrize("name", ["hsl", "edgellm", "picospec", "specpp"])
def test_baselines_are_lossless_locally(name: str, smollm_path: Path, mild_draft: Path) -> None:
    with Generator(draft=str(mild_draft), target=str(smollm_path), n_ctx=1024) as gen:
        ref = gen.generate("def fizzbuzz(n):\n", max_new_tokens=48, policy="target-only")
        res = gen.generate("def fizzbuzz(n):\n", max_new_tokens=48, policy=name)
    assert res.stats.verifications > 0 and res.stats.policy == name
    assert_same_or_tie(smollm_path, "def fizzbuzz(n):\n", ref.tokens, res.tokens)
