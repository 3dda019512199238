"""Rejection and rollback, hundreds of times, on a pair that often disagrees.

Draft: smollm2-135m with strongly perturbed norms; target: smollm2-135m (torch, fp32). Most
windows are rejected part-way, so both KV caches roll back constantly; the output must still be
the target's own, token for token.
"""

from __future__ import annotations

from conftest import check_lossless

from pipesd import Generator

PROMPTS = [
    "def is_prime(n):",
    "The three primary colors are",
    "import numpy as np\n\ndef moving_average(x, k):",
    "Once upon a time, in a small village,",
    "SELECT name, COUNT(*) FROM orders",
    "class Stack:\n    def __init__(self):",
]


def test_hundreds_of_rollbacks_keep_target_output(wild_draft, smollm_path) -> None:
    with Generator(
        draft=str(wild_draft), target=str(smollm_path), target_backend="torch",
        policy="vanilla", draft_len=4, n_ctx=512, target_threads=1,
    ) as gen:  # fmt: skip
        total_rollbacks, compared, all_ties = 0, 0, []
        for prompt in PROMPTS:
            n, ties, rollbacks = check_lossless(gen, gen.tokenize(prompt), 64, "torch")
            compared += n
            total_rollbacks += rollbacks
            all_ties += ties
    print(f"\n{total_rollbacks} rollbacks over {compared} tokens; ties {all_ties}")
    assert total_rollbacks >= 200
