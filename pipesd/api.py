"""The Python API: a generator that embeds both models, with sync and async token streams.

Example::

    from pipesd import Generator

    with Generator(draft="qwen2.5-coder-0.5b", target="qwen2.5-coder-1.5b") as gen:
        for event in gen.stream("def fib(n):", max_new_tokens=64):
            print(event.text, end="", flush=True)
        result = gen.generate("def fib(n):", max_new_tokens=64)
        print(result.stats.summary())
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from pipesd import models
from pipesd.cloud.targets import load_target, pick_backend
from pipesd.decoding import (
    FirstTokenClock,
    GenerationResult,
    GenerationStats,
    LocalLink,
    SpecDecoder,
    TokenEvent,
    VerifyLink,
)
from pipesd.edge.drafter import Drafter, new_timings
from pipesd.errors import ModelError, TokenizerMismatchError
from pipesd.llama_backend import LlamaCppModel, tokenizer_fingerprint
from pipesd.policies import POLICIES, make_policy
from pipesd.policies.base import DraftPolicy
from pipesd.policies.calibration import (
    AcceptanceModel,
    learnt_acceptance_path,
    resolve_acceptance,
)
from pipesd.policies.pipesd import PipeSDPolicy, Thresholds, resolve_thresholds
from pipesd.sampling import SamplingParams

if TYPE_CHECKING:
    from pipesd.edge.client import CloudLink
    from pipesd.tune import OnlineRetuner

log = logging.getLogger(__name__)


def hf_token_texts(directory: Path) -> list[bytes]:
    """Token texts in id order from a Hugging Face ``tokenizer.json``."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{directory} has no tokenizer.json: cannot check its tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    by_id: dict[int, str] = {int(i): t for t, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
    size = max(by_id) + 1
    return [by_id.get(i, "").encode("utf-8") for i in range(size)]


def token_texts_of(path: Path) -> list[bytes]:
    if path.is_dir():
        return hf_token_texts(path)
    vocab = LlamaCppModel(path, vocab_only=True)
    try:
        return vocab.token_texts()
    finally:
        vocab.close()


def check_tokenizers(draft_texts: Sequence[bytes], target_texts: Sequence[bytes],
                     draft: str, target: str) -> None:  # fmt: skip
    """Refuses a draft/target pair whose vocabularies differ."""
    if tokenizer_fingerprint(draft_texts) == tokenizer_fingerprint(target_texts):
        return
    if len(draft_texts) != len(target_texts):
        detail = f"vocabulary sizes {len(draft_texts)} and {len(target_texts)}"
    else:
        pairs = enumerate(zip(draft_texts, target_texts, strict=True))
        first = next(i for i, (a, b) in pairs if a != b)
        detail = f"token {first} is {draft_texts[first]!r} vs {target_texts[first]!r}"
    raise TokenizerMismatchError(
        f"draft {draft} and target {target} do not share a tokenizer ({detail}); "
        "speculative decoding needs the same vocabulary on both sides"
    )


class TokenStream:
    """An iterator of TokenEvent; ``result`` is available once it is exhausted."""

    def __init__(self, events: Iterator[TokenEvent], finish: Any) -> None:
        self._events = events
        self._finish = finish
        self._result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        try:
            return next(self._events)
        except StopIteration:
            if self._result is None:
                self._result = self._finish()
            raise

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._result


class Generator:
    """Speculative decoding with a llama.cpp draft here and a target here or in the cloud.

    Args:
        draft: a registry name (``pipesd models list``) or a GGUF path; fetched if missing.
        target: a registry name, a GGUF path or a Hugging Face directory (local mode).
        cloud: ``HOST:PORT`` of a ``pipesd cloud`` server: the target runs there instead, and
            ``target``, ``target_backend``, ``device`` and ``target_threads`` are the server's
            business. The connection is made (and the tokenizers compared) at construction.
        auth_token: the cloud's shared secret, if it requires one.
        reconnect_timeout: seconds a lost cloud connection is retried before an error.
        target_backend: ``auto`` (torch on CUDA, llama.cpp on CPU), ``torch`` or ``llama.cpp``.
        device: ``cpu`` or ``cuda[:N]`` for the torch backend.
        policy: ``auto`` (default: cost-aware speculation, docs/policies.md), ``pipesd`` and
            its ablations, the baselines, ``target-only`` or ``draft-only``
            (``pipesd.policies.POLICIES``).
        draft_len: drafts per verification for ``vanilla`` and ``pipesd-fixed-trigger``.
        thresholds: the PipeSD trigger's (R1, R2): a ``Thresholds``, a file written by
            ``pipesd tune``, or None for ``$PIPESD_HOME/thresholds.json`` if it exists, else
            the built-in values.
        retune_drift: re-tune the thresholds online when time per token rises by more than
            this fraction over what it was (``pipesd.tune.OnlineRetuner``); None: never.
        n_ctx: context size (prompt plus new tokens) of both models.
        draft_threads, target_threads: CPU threads for each model.
        calibrate: measure the local target's cost of a pass of 1..32 tokens when it loads
            (once per model file and settings: the table is cached in
            ``$PIPESD_HOME/costs``); ``auto`` chooses its windows from it. Without it the
            costs are learnt from the passes run.
        acceptance: the draft/target pair's acceptance calibration that ``auto`` starts from:
            an ``AcceptanceModel`` or a file written by ``pipesd tune`` (read, never
            written), or None: what earlier Generators learnt of this pair
            (``$PIPESD_HOME/acceptance/KEY.json``, each bin weighed as at most 64 drafts),
            else ``$PIPESD_HOME/acceptance.json`` if present, else an empty one. ``auto``
            learns it in place, so each sequence starts from what the Generator's earlier
            ones learnt (``Generator.acceptance``); with None, what it learnt is written
            back to the pair's file after every sequence.
    """

    def __init__(
        self,
        *,
        draft: str = models.DEFAULT_DRAFT,
        target: str = models.DEFAULT_TARGET,
        target_backend: str = "auto",
        device: str = "cpu",
        policy: str = "auto",
        draft_len: int = 6,
        thresholds: Thresholds | str | Path | None = None,
        retune_drift: float | None = None,
        n_ctx: int = 4096,
        draft_threads: int = 1,
        target_threads: int = 1,
        cloud: str | None = None,
        auth_token: str = "",
        reconnect_timeout: float = 30.0,
        calibrate: bool = True,
        acceptance: AcceptanceModel | str | Path | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy_name = policy
        self.draft_len = draft_len
        self.thresholds = resolve_thresholds(thresholds)
        # An explicit calibration is read (and a bad file refused) before anything loads.
        given = resolve_acceptance(acceptance) if acceptance is not None else None
        self.retuner: OnlineRetuner | None = None
        if retune_drift is not None:
            from pipesd.tune import OnlineRetuner

            self.retuner = OnlineRetuner(self.thresholds, drift=retune_drift)
        # Validates the arguments before anything loads.
        make_policy(policy, draft_len=draft_len, thresholds=self.thresholds)
        draft_path = models.resolve(draft)
        if draft_path.is_dir():
            raise ModelError(f"the draft runs in llama.cpp and needs a GGUF file, got {draft_path}")
        self.draft_name, self.target_name = draft, target
        self.lock = threading.Lock()
        needs_target = policy != "draft-only"
        needs_draft = policy != "target-only"
        target_path = models.resolve(target) if needs_target and cloud is None else None
        if target_path is not None:
            chosen = pick_backend(target_backend, device, target_path)
            # Tokenizers are compared before anything heavy is loaded.
            draft_vocab = LlamaCppModel(draft_path, vocab_only=True)
            check_tokenizers(draft_vocab.token_texts(), token_texts_of(target_path), draft, target)
            draft_vocab.close()
        self.drafting = needs_draft
        self.draft_model = LlamaCppModel(
            draft_path, n_ctx=n_ctx, n_threads=draft_threads, vocab_only=not needs_draft
        )
        self.target_backend = chosen if target_path is not None else None
        self.target = (
            load_target(
                target_path, backend=chosen, device=device, n_ctx=n_ctx, threads=target_threads
            )
            if target_path is not None
            else None
        )
        self.n_ctx = n_ctx
        self.pass_costs: list[float] = []
        self.draft_costs = (0.0, 0.0)
        self.draft_timings = new_timings()  # the drafter's recent speed, across sequences
        self.first_clock = FirstTokenClock()  # when first tokens came, across sequences
        if needs_draft and calibrate:
            from pipesd.costs import cached_draft_costs

            self.draft_costs = cached_draft_costs(
                self.draft_model, self.draft_model.vocab_size, path=draft_path,
                threads=draft_threads,
            )  # fmt: skip
        if self.target is not None and calibrate:
            from pipesd.costs import cached_calibration

            assert target_path is not None
            self.pass_costs = cached_calibration(
                self.target, self.target.vocab_size, path=target_path, backend=chosen,
                device=device, threads=target_threads,
            )  # fmt: skip
        self.cloud: CloudLink | None = None
        if cloud is not None:
            from pipesd.edge.client import CloudLink

            texts = self.draft_model.token_texts()
            self.cloud = CloudLink(
                cloud,
                vocab_size=len(texts),
                tokenizer_hash=tokenizer_fingerprint(texts),
                auth_token=auth_token,
                reconnect_timeout=reconnect_timeout,
            )
            self.target_backend = f"cloud {cloud} ({self.cloud.model_fingerprint})"
        # What this Generator learns of the pair is kept for the next one (acceptance=None).
        ident = (
            self.cloud.model_fingerprint if self.cloud is not None
            else f"{target_path.name}:{chosen}:{device}" if target_path is not None
            else ""
        )  # fmt: skip
        self._learnt = (
            learnt_acceptance_path(draft_path.name, ident)
            if acceptance is None and ident and needs_draft
            else None
        )
        self.acceptance = given or resolve_acceptance(None, self._learnt) or AcceptanceModel()
        self._learnt_seen = self.acceptance.observations

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.cloud is not None:
            self.cloud.close()
        self.draft_model.close()
        if isinstance(self.target, LlamaCppModel):
            self.target.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    # ------------------------------------------------------------------- decoding
    def tokenize(self, text: str) -> list[int]:
        return self.draft_model.tokenize(text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.draft_model.detokenize(tokens).decode("utf-8", errors="replace")

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        policy: str | DraftPolicy | None = None,
        draft_len: int | None = None,
        trace: list[tuple[str, float, float]] | None = None,
    ) -> TokenStream:
        """Streams output tokens as they are committed. One stream at a time per Generator.

        ``policy`` and ``draft_len`` override the Generator's for this call, so one set of
        loaded models serves every policy (``target-only`` needs the target loaded, the others
        the draft). ``policy`` may also be a ``DraftPolicy`` instance of your own. ``trace``:
        a list that receives the decoder's timeline events (see ``SpecDecoder``).
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        rule: DraftPolicy | None
        if isinstance(policy, DraftPolicy):
            name, rule = policy.name, policy
        else:
            name = policy or self.policy_name
            th = self.retuner.current if self.retuner is not None else self.thresholds
            rule = make_policy(name, draft_len=draft_len or self.draft_len, thresholds=th,
                               acceptance=self.acceptance)  # fmt: skip
            if isinstance(rule, PipeSDPolicy) and self.retuner is not None:
                rule.retuner = self.retuner
        if name != "target-only" and not self.drafting:
            raise ValueError(f"policy {name} needs the draft model, loaded as tokenizer only")
        link: VerifyLink | None = None
        if name != "draft-only":
            if self.cloud is not None:
                link = cast(VerifyLink, self.cloud)
            elif self.target is not None:
                link = LocalLink(self.target, self.pass_costs)
        decoder = SpecDecoder(
            tokenizer=self.draft_model,
            drafter=(
                Drafter(self.draft_model, params, self.draft_costs, self.draft_timings)
                if name != "target-only"
                else None
            ),
            link=link,
            params=params,
            policy_name=name,
            policy=rule,
            trace=trace,
            first_clock=self.first_clock,
        )
        stats = GenerationStats(policy=name)
        tokens: list[int] = []
        pieces: list[str] = []

        def events() -> Iterator[TokenEvent]:
            if not self.lock.acquire(blocking=False):
                raise RuntimeError("this Generator is already streaming; use one per request")
            try:
                for ev in decoder.stream(prompt_ids, max_new_tokens=max_new_tokens, stats=stats):
                    if ev.token >= 0:
                        tokens.append(ev.token)
                    pieces.append(ev.text)
                    yield ev
            finally:
                try:
                    self._keep_learnt()
                finally:
                    self.lock.release()

        def finish() -> GenerationResult:
            return GenerationResult("".join(pieces), tokens, stats, prompt_ids)

        return TokenStream(events(), finish)

    def _keep_learnt(self) -> None:
        """Writes the pair's calibration back if this sequence taught it anything."""
        seen = self.acceptance.observations
        if self._learnt is None or seen <= self._learnt_seen:
            return
        try:
            self.acceptance.save(self._learnt)
        except OSError as e:  # a read-only cache costs the next process its head start only
            log.debug("could not keep the acceptance calibration in %s: %s", self._learnt, e)
        self._learnt_seen = seen

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        """Decodes to the end and returns text, token ids and statistics."""
        s = self.stream(prompt, **kwargs)
        for _ in s:
            pass
        return s.result

    async def astream(
        self, prompt: str | Sequence[int], **kwargs: Any
    ) -> AsyncIterator[TokenEvent]:
        """The same stream for asyncio: decoding runs in a worker thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()

        def work() -> None:
            try:
                for ev in self.stream(prompt, **kwargs):
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
            except BaseException as e:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, work)
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
        await worker

    async def agenerate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerationResult:
        """``generate`` for asyncio: decoding runs in a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.generate(prompt, **kwargs))
