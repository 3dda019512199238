"""PyTorch Llama/Qwen2 decoder used as the cloud target model.

Single-sequence (batch 1) inference with a preallocated, O(1)-truncatable
KV cache, so that draft tokens can be verified in one forward pass and the
rejected suffix rolled back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipesd.cloud.weights import (
    DecoderConfig,
    config_from_gguf,
    config_from_hf,
    load_gguf_state,
    load_hf_state,
)

# Upper bound on attention-score elements materialised per query chunk.
_ATTN_CHUNK_ELEMENTS = 1 << 25


class KVCache:
    """Preallocated key/value cache for one sequence.

    ``k`` and ``v`` are ``[num_layers, num_kv_heads, max_len, head_dim]`` so
    that each head's keys are contiguous for attention.  Only positions
    ``< length`` are meaningful; entries beyond it are stale and overwritten.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions; O(1), stale entries are overwritten later."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate cache of length {self.length} to {n}")
        self.length = n

    def reset(self) -> None:
        """Empty the cache."""
        self.length = 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [T, in]``, in the faster GEMM form on CPU if T > 1."""
    if x.shape[0] == 1 or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    # MKL's small-M sgemm is 2-4x faster (measured, T = 4..16, AMD EPYC) when
    # called as W @ x^T than in F.linear's x @ W^T form; never slower for large T.
    out = torch.mm(weight, x.t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous()


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by per-position angles ``cos/sin [T, 1, head_dim/2]``.

    Interleaved rotates pairs ``(2i, 2i+1)`` (llama.cpp "normal" rope on
    permuted GGUF llama weights); otherwise pairs ``(i, i + d/2)`` (HF
    ``rotate_half`` / NEOX).
    """
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention writing into a :class:`KVCache` layer."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = hd
        self.groups = config.num_heads // config.num_kv_heads
        self.interleaved = config.rope_interleaved
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        t = x.shape[0]
        kvh, g, hd = self.num_kv_heads, self.groups, self.head_dim
        q = linear(x, self.q_proj.weight, self.q_proj.bias).view(t, self.num_heads, hd)
        k = linear(x, self.k_proj.weight, self.k_proj.bias).view(t, kvh, hd)
        v = linear(x, self.v_proj.weight, self.v_proj.bias).view(t, kvh, hd)
        q = apply_rope(q, cos, sin, self.interleaved)
        k = apply_rope(k, cos, sin, self.interleaved)
        end = start + t
        k_cache[:, start:end] = k.transpose(0, 1)
        v_cache[:, start:end] = v.transpose(0, 1)

        # Query head h uses kv head h // g, so group queries per kv head:
        # [t, kvh, g, hd] -> [kvh, g * t, hd]; row index is gi * t + ti.
        q = q.view(t, kvh, g, hd).permute(1, 2, 0, 3).reshape(kvh, g * t, hd)
        if t == 1:
            # A single query attends to every cached position: no mask needed.
            out = F.scaled_dot_product_attention(
                q[None], k_cache[None, :, :end], v_cache[None, :, :end]
            )[0]
        else:
            out = self._chunked_causal(q, k_cache, v_cache, start, t)
        out = out.reshape(kvh, g, t, hd).permute(2, 0, 1, 3).reshape(t, self.num_heads * hd)
        return linear(out, self.o_proj.weight)

    def _chunked_causal(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, t: int
    ) -> torch.Tensor:
        """Causal attention for ``t`` new queries, chunked over queries to bound memory."""
        kvh, g, hd = self.num_kv_heads, self.groups, self.head_dim
        q = q.view(kvh, g, t, hd)
        out = torch.empty_like(q)
        chunk = max(1, _ATTN_CHUNK_ELEMENTS // (self.num_heads * (start + t)))
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            n_keys = start + c1
            q_pos = torch.arange(start + c0, start + c1, device=q.device)
            k_pos = torch.arange(n_keys, device=q.device)
            mask = (k_pos[None, :] <= q_pos[:, None]).repeat(g, 1)  # [g * c, n_keys]
            qc = q[:, :, c0:c1].reshape(kvh, g * (c1 - c0), hd)
            oc = F.scaled_dot_product_attention(
                qc[None], k_cache[None, :, :n_keys], v_cache[None, :, :n_keys], attn_mask=mask
            )[0]
            out[:, :, c0:c1] = oc.reshape(kvh, g, c1 - c0, hd)
        return out.view(kvh, g * t, hd)


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight)
        return linear(h, self.down_proj.weight)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """Llama/Qwen2 causal language model over a single sequence."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.num_heads % config.num_kv_heads:
            raise ValueError(
                f"num_heads {config.num_heads} is not a multiple of "
                f"num_kv_heads {config.num_kv_heads}"
            )
        if config.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # A plain CPU float64 tensor, not a buffer, so that Module.to(dtype)
        # cannot degrade it; cos/sin stay accurate at large positions.
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float64, device="cpu")
        self.inv_freq = config.rope_theta ** (-exponents / config.head_dim)

    @classmethod
    def from_state_dict(
        cls,
        config: DecoderConfig,
        state: dict[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DecoderLM:
        """Build a model that adopts ``state``'s tensors (no copy when dtype/device already match).

        ``state`` is emptied as its tensors are taken over.
        """
        with torch.device("meta"):
            model = cls(config)
        converted: dict[str, torch.Tensor] = {}
        for name in list(state):
            # Pop as we go so a dtype/device conversion does not double peak memory.
            converted[name] = state.pop(name).to(device=device, dtype=dtype)
        model.load_state_dict(converted, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, max_len: int) -> KVCache:
        """A fresh, empty KV cache able to hold ``max_len`` positions."""
        c = self.config
        return KVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, max_len, device=self.device, dtype=self.dtype
        )

    def _rope_tables(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + t, dtype=torch.float64)
        angles = torch.outer(pos, self.inv_freq).unsqueeze(1)  # [t, 1, head_dim/2]
        return (
            angles.cos().to(device=self.device, dtype=self.dtype),
            angles.sin().to(device=self.device, dtype=self.dtype),
        )

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cache: KVCache, *, last_only: bool = False
    ) -> torch.Tensor:
        """Append ``input_ids [T]`` at ``cache.length..``; return fp32 logits ``[T, vocab]``
        (``[1, vocab]`` for the last position only with ``last_only``)."""
        if input_ids.dim() != 1 or input_ids.dtype != torch.long:
            raise ValueError(
                "input_ids must be a 1-D LongTensor, "
                f"got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        t = input_ids.shape[0]
        if t == 0:
            raise ValueError("input_ids is empty")
        c = self.config
        if (
            cache.k.shape[:2] != (c.num_layers, c.num_kv_heads)
            or cache.k.shape[3] != c.head_dim
            or cache.k.dtype != self.dtype
            or cache.k.device != self.device
        ):
            raise ValueError("KV cache was not created for this model (use DecoderLM.new_cache)")
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {t} tokens > max_len {cache.max_len}")
        input_ids = input_ids.to(self.device)
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope_tables(start, t)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start)
        if last_only:  # a prefill needs the next-token logits only; skip [T, vocab]
            x = x[-1:]
        x = self.norm(x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(x, head)
        # Only advance once everything succeeded; stale writes past length are harmless.
        cache.length = start + t
        return logits.float()


def default_cache_dir() -> Path:
    """``$PIPESD_HOME/torch-cache`` (PIPESD_HOME defaults to ``~/.cache/pipesd``)."""
    from pipesd.models import pipesd_home

    return pipesd_home() / "torch-cache"


def load_decoder(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DecoderLM:
    """Load a decoder from a ``.gguf`` file or a Hugging Face directory.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA; GGUF weights
    are dequantised once and cached under ``cache_dir`` (default
    :func:`default_cache_dir`).
    """
    p = Path(path)
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if p.is_dir():
        config = config_from_hf(p)
        state = load_hf_state(p)
    elif p.exists():
        config = config_from_gguf(p)
        state = load_gguf_state(p, cache_dir if cache_dir is not None else default_cache_dir())
    else:
        raise FileNotFoundError(
            f"{p}: no such file or directory (expected a .gguf file or HF model directory)"
        )
    return DecoderLM.from_state_dict(config, state, device=dev, dtype=dtype)


__all__ = ["KVCache", "DecoderLM", "load_decoder", "default_cache_dir", "apply_rope"]
