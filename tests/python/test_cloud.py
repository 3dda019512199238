"""The split system on the real pair: edge and cloud in separate processes, through the link
emulator in every named scenario, equal to local mode token for token; and faults (the link cut
mid-round, the cloud killed and restarted mid-generation) that end with the uncut output."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cloudproc import PIPESD, CloudProcess, free_port

from pipesd import Generator
from pipesd.link import SCENARIOS, Link
from pipesd.workloads import humaneval_prompts

N_PROMPTS = 5  # the prompts of the local-mode lossless test
N_NEW = 64
COMMON = (
    "--ctx",
    "1024",
    "--policy",
    "vanilla",
    "--draft-len",
    "6",
    "--max-new-tokens",
    str(N_NEW),
)


def cli_generate(*args: str, prompt: str) -> dict[str, Any]:
    proc = subprocess.run([*PIPESD, "generate", "--json", *args, *COMMON, "-"], input=prompt,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return humaneval_prompts()[:N_PROMPTS]


@pytest.fixture(scope="module")
def local_outputs(prompts, real_draft_path: Path, real_target_path: Path) -> list[dict[str, Any]]:
    return [
        cli_generate(
            "--local", "--draft", str(real_draft_path), "--target", str(real_target_path), prompt=p
        )  # fmt: skip
        for p in prompts
    ]


@pytest.fixture(scope="module")
def real_cloud(real_target_path: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    log = tmp_path_factory.mktemp("real-cloud") / "cloud.log"
    with CloudProcess(real_target_path, log, args=("--ctx", "1024")) as c:
        yield c


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_cloud_output_equals_local_mode(scenario: str, real_cloud, prompts, local_outputs,
                                        real_draft_path: Path) -> None:  # fmt: skip
    with Link(("127.0.0.1", real_cloud.port), scenario) as link:
        address = f"127.0.0.1:{link.port}"
        for i, (prompt, ref) in enumerate(zip(prompts, local_outputs, strict=True)):
            out = cli_generate("--cloud", address, "--draft", str(real_draft_path), prompt=prompt)
            assert out["tokens"] == ref["tokens"], f"{scenario}: prompt {i} differs"
            assert out["text"] == ref["text"]
            stats = out["stats"]
            assert stats["verifications"] == ref["stats"]["verifications"]
            assert stats["bytes_up"] > 0 and stats["bytes_down"] > 0
            assert stats["reconnects"] == 0
        link_stats = link.stats()
    assert link_stats["connections"] == N_PROMPTS
    print(f"\n[{scenario}] link: {link_stats}")


def arm_after_verifies(gen: Generator, n: int, action: Callable[[], None],
                       delay_s: float) -> threading.Event:  # fmt: skip
    """Runs ``action`` ``delay_s`` after the edge sent its n-th window: while it is in flight."""
    link = gen.cloud
    assert link is not None
    original = link.send
    sent = 0
    fired = threading.Event()

    def send(*args: Any, verify: bool, **kwargs: Any) -> None:
        nonlocal sent
        original(*args, verify=verify, **kwargs)
        if verify:
            sent += 1
            if sent == n:
                threading.Timer(delay_s, lambda: (action(), fired.set())).start()

    link.send = send  # type: ignore[method-assign]
    return fired


def test_link_cut_mid_round_resumes_exactly(real_cloud, prompts, local_outputs,
                                            real_draft_path: Path) -> None:  # fmt: skip
    with (
        Link(("127.0.0.1", real_cloud.port), "paper-5g") as link,
        Generator(
            draft=str(real_draft_path), cloud=f"127.0.0.1:{link.port}", n_ctx=1024, policy="vanilla"
        ) as gen,
    ):
        # The verify pass takes over a second on this machine: 100 ms after the window left,
        # it is with the cloud.
        fired = arm_after_verifies(gen, 3, link.cut, 0.1)
        res = gen.generate(prompts[0], max_new_tokens=N_NEW)
    assert fired.is_set()
    assert res.stats.reconnects >= 1
    assert res.tokens == local_outputs[0]["tokens"]
    assert link.stats()["connections"] >= 2


def test_cloud_killed_and_restarted_mid_generation(
    real_target_path: Path, real_draft_path: Path, prompts, local_outputs, tmp_path: Path
) -> None:
    cloud = CloudProcess(real_target_path, tmp_path / "cloud.log", port=free_port(),
                         args=("--ctx", "1024"))  # fmt: skip
    try:
        with Generator(
            draft=str(real_draft_path), cloud=cloud.address, n_ctx=1024, policy="vanilla"
        ) as gen:

            def crash_and_restart() -> None:
                cloud.kill()  # SIGKILL while it verifies the window
                cloud.start()  # the same port; loading takes seconds, the edge retries

            fired = arm_after_verifies(gen, 4, crash_and_restart, 0.2)
            res = gen.generate(prompts[1], max_new_tokens=N_NEW)
        assert fired.is_set()
        assert res.stats.reconnects == 1
        assert res.tokens == local_outputs[1]["tokens"]
        assert cloud.log().count("listening on") == 2
    finally:
        cloud.stop()


def test_reconnect_gives_up_with_a_clear_error(smollm_path: Path, mild_draft: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    from pipesd.errors import TransportError

    cloud = CloudProcess(smollm_path, tmp_path / "cloud.log", args=("--ctx", "1024"))
    try:
        with Generator(draft=str(mild_draft), cloud=cloud.address, n_ctx=1024,
                       reconnect_timeout=1.0) as gen:  # fmt: skip
            fired = arm_after_verifies(gen, 2, cloud.kill, 0.0)
            with pytest.raises(TransportError, match=r"could not reconnect within 1 s"):
                gen.generate("def fib(n):", max_new_tokens=200)
        assert fired.is_set()
    finally:
        cloud.stop()
