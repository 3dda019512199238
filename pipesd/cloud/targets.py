"""Target backends behind one verification contract (see verifier.TargetBackend).

``torch``: the PyTorch decoder (CUDA in bf16 when present, fp32 on CPU), the default on a GPU.
``llama.cpp``: the same GGUF run by llama.cpp, the faster verifier on CPU-only machines.
Whatever the backend, what it computes is the reference the output must equal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipesd.errors import ModelError, PromptTooLongError
from pipesd.llama_backend import LlamaCppModel

BACKENDS = ("auto", "torch", "llama.cpp")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def pick_backend(backend: str, device: str, path: Path) -> str:
    """``auto``: torch on CUDA (or for a Hugging Face directory), llama.cpp on a CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown target backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if path.is_dir() or device.startswith("cuda"):
        return "torch"
    return "llama.cpp"


class TorchTarget:
    """The PyTorch decoder with a preallocated KV cache (O(1) rollback)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        import torch

        from pipesd.cloud.torch_model import load_decoder

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available here")
        if threads is not None and not device.startswith("cuda"):
            torch.set_num_threads(threads)
        self._torch = torch
        try:
            self.model = load_decoder(path, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise ModelError(str(e)) from None
        self.vocab_size = self.model.config.vocab_size
        self.n_ctx = n_ctx
        self.cache = self.model.new_cache(n_ctx)
        self.device = device

    def fork(self) -> TorchTarget:
        """Another target over the same weights with its own (empty) KV cache."""
        other = object.__new__(TorchTarget)
        other.__dict__.update(self.__dict__)
        other.cache = self.model.new_cache(self.n_ctx)
        return other

    @property
    def kv_len(self) -> int:
        return int(self.cache.length)

    def _forward(self, tokens: Sequence[int], *, all_rows: bool) -> Any:
        if self.cache.length + len(tokens) > self.n_ctx:
            raise PromptTooLongError(
                f"sequence of {self.cache.length + len(tokens)} tokens exceeds the context "
                f"of {self.n_ctx}"
            )
        ids = self._torch.tensor(list(tokens), dtype=self._torch.long)
        return self.model.forward(ids, self.cache, last_only=not all_rows)

    def decode(self, tokens: Sequence[int], *, all_logits: bool) -> npt.NDArray[np.float32]:
        return self._forward(tokens, all_rows=all_logits).cpu().numpy()  # type: ignore[no-any-return]

    def decode_argmax(self, tokens: Sequence[int], *, all_rows: bool) -> npt.NDArray[np.int64]:
        """Each row's argmax, computed where the logits are (on the GPU with CUDA)."""
        top = self._forward(tokens, all_rows=all_rows).argmax(dim=-1)
        return top.cpu().numpy().astype(np.int64)  # type: ignore[no-any-return]

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)


def load_target(
    path: Path, *, backend: str, device: str, n_ctx: int, threads: int | None
) -> TorchTarget | LlamaCppModel:
    chosen = pick_backend(backend, device, path)
    if chosen == "torch":
        return TorchTarget(path, n_ctx=n_ctx, device=device, threads=threads)
    if path.is_dir():
        raise ModelError(f"the llama.cpp backend needs a GGUF file, got directory {path}")
    if device != "cpu":
        raise ModelError(f"the llama.cpp target backend runs on the CPU; got --device {device}")
    return LlamaCppModel(path, n_ctx=n_ctx, n_threads=threads or 1)
