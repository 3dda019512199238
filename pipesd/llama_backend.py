"""A llama.cpp model (via llama-cpp-python) with explicit control of its KV cache.

Both the edge drafter and the llama.cpp target backend stand on this. It drives llama.cpp's
public C API (``llama_decode`` with its own batch, ``llama_memory_seq_rm``) rather than
``Llama.eval``, so that logits are copied only for the positions that need them and rolling
back the KV cache is a single call with no re-evaluation of the prefix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipesd.errors import ModelError, PromptTooLongError


@contextlib.contextmanager
def _quiet_stderr():  # type: ignore[no-untyped-def]
    """llama.cpp logs through C stdio; silence fd 2 while a model loads."""
    fd = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


class LlamaCppModel:
    """One llama.cpp model and context holding a single sequence."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int = 1,
        n_batch: int = 512,
        vocab_only: bool = False,
        verbose: bool = False,
    ) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.path = Path(path)
        self.n_threads = n_threads
        ctx = contextlib.nullcontext() if verbose else _quiet_stderr()
        try:
            with ctx:
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_ubatch=n_batch,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    vocab_only=vocab_only,
                    logits_all=False,
                    verbose=verbose,
                )
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"llama.cpp could not load {self.path}: {e}") from None
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.kv_len = 0
        self._batch = None
        if not vocab_only:
            self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
            self._memory = llama_cpp.llama_get_memory(self.llm.ctx)
            # The logits row as llama.cpp stores it (number of vocabulary entries it outputs).
            self._n_logits = int(self.llm.n_vocab())

    def close(self) -> None:
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ----------------------------------------------------------------- tokenizer
    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return bytes(self.llm.detokenize(list(tokens)))

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, int(token)))

    @functools.cached_property
    def eog_tokens(self) -> frozenset[int]:
        """Every end-of-generation token (EOS, EOT, ...), as llama.cpp's vocabulary marks them."""
        return frozenset(t for t in range(self.vocab_size) if self.is_eog(t))

    def token_texts(self) -> list[bytes]:
        get = self._lc.llama_vocab_get_text
        return [get(self.vocab, i) or b"" for i in range(self.vocab_size)]

    # --------------------------------------------------------------------- KV cache
    def truncate(self, n: int) -> None:
        """Keeps the first n positions of the KV cache (O(1) in the prefix length)."""
        if not 0 <= n <= self.kv_len:
            raise ValueError(f"cannot truncate KV cache of {self.kv_len} positions to {n}")
        if n < self.kv_len:
            self._lc.llama_memory_seq_rm(self._memory, 0, n, -1)
        self.kv_len = n

    def decode(self, tokens: Sequence[int], *, all_logits: bool) -> npt.NDArray[np.float32]:
        """Evaluates tokens after the cache; returns logits [T, V] (all) or [1, V] (last)."""
        return self._run(tokens, all_logits, _copy_rows)

    def decode_argmax(self, tokens: Sequence[int], *, all_rows: bool) -> npt.NDArray[np.int64]:
        """As ``decode``, but only each row's argmax: read in place from llama.cpp's logits
        buffer, nothing of size T x V copied."""
        return self._run(tokens, all_rows, _argmax_rows)

    def _run(self, tokens: Sequence[int], all_logits: bool, take: Any) -> Any:
        n = len(tokens)
        if n == 0:
            raise ValueError("decode needs at least one token")
        if self.kv_len + n > self.n_ctx:
            raise PromptTooLongError(
                f"sequence of {self.kv_len + n} tokens exceeds the context of {self.n_ctx}"
            )
        b = self._batch
        assert b is not None, "model loaded with vocab_only"
        out: list[Any] = []
        for start in range(0, n, self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last_chunk = start + self.n_batch >= n
            m = len(chunk)
            b.n_tokens = m
            for i, t in enumerate(chunk):
                b.token[i] = int(t)
                b.pos[i] = self.kv_len + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (last_chunk and i == m - 1)
            rc = self._lc.llama_decode(self.llm.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self.kv_len += m
            if all_logits:
                ptr = self._lc.llama_get_logits(self.llm.ctx)
                out.append(take(ptr, m, self._n_logits))
            elif last_chunk:
                ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
                out.append(take(ptr, 1, self._n_logits))
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)


def _copy_rows(ptr: ctypes._Pointer, rows: int, cols: int) -> npt.NDArray[np.float32]:  # type: ignore[type-arg]
    return np.ctypeslib.as_array(ptr, shape=(rows, cols)).copy()


def _argmax_rows(ptr: ctypes._Pointer, rows: int, cols: int) -> npt.NDArray[np.int64]:  # type: ignore[type-arg]
    return np.ctypeslib.as_array(ptr, shape=(rows, cols)).argmax(axis=1).astype(np.int64)


def tokenizer_fingerprint(texts: Sequence[bytes]) -> str:
    """A hash of the vocabulary: its size and every token's text in id order."""
    h = hashlib.sha256(str(len(texts)).encode())
    for t in texts:
        h.update(len(t).to_bytes(4, "little"))
        h.update(t)
    return h.hexdigest()
