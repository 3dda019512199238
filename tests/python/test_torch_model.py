"""Tests for the PyTorch Llama/Qwen2 target model (pipesd.cloud.torch_model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from pipesd.cloud import torch_model, weights
from pipesd.cloud.torch_model import DecoderLM, KVCache, load_decoder
from pipesd.cloud.weights import (
    DecoderConfig,
    config_from_gguf,
    config_from_hf,
    gguf_cache_path,
    gguf_to_param_name,
    load_gguf_state,
)

PROMPT = b"The quick brown fox jumps over the lazy dog. Once upon a time,"
GREEDY_STEPS = 24
# Fixed ids for tests that do not need a tokenizer (any ids < vocab size work).
TOKEN_IDS = [1, 504, 3485, 282, 4649, 314, 253, 1345, 28, 216, 1030, 3217, 30, 2114, 5, 17]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch-cache")


@pytest.fixture(scope="session")
def model(smollm_path: Path, cache_dir: Path) -> DecoderLM:
    return load_decoder(smollm_path, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def llama(smollm_path: Path) -> Iterator[Any]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(smollm_path), n_ctx=512, n_threads=1, logits_all=True, verbose=False
    )
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def prompt_ids() -> list[int]:
    return list(TOKEN_IDS)


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time q/k row permutation (interleaved -> rotate_half)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_hf_dir(model: DecoderLM, dest: Path, *, tied: bool) -> Path:
    """Write ``model`` as an HF llama checkpoint (rotate_half q/k layout)."""
    from safetensors.torch import save_file

    c = model.config
    dest.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("self_attn.q_proj.weight"):
            tensor = _unpermute_rope_rows(tensor, c.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = _unpermute_rope_rows(tensor, c.num_kv_heads)
        tensors["model." + name] = tensor.clone().contiguous()
    if not tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    # Two shards, to exercise multi-file loading.
    names = sorted(tensors)
    half = len(names) // 2
    for i, shard in enumerate((names[:half], names[half:]), start=1):
        shard_path = dest / f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k] for k in shard}, str(shard_path))
    (dest / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_eps,
                "vocab_size": c.vocab_size,
                "tie_word_embeddings": tied,
                "max_position_embeddings": c.context_length,
                "torch_dtype": "float32",
            }
        )
    )
    return dest


def _greedy(model: DecoderLM, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode; returns generated ids and logits for every position."""
    cache = model.new_cache(len(prompt) + steps)
    logits = [model(torch.tensor(prompt), cache)]
    out: list[int] = []
    for _ in range(steps):
        tok = int(logits[-1][-1].argmax())
        out.append(tok)
        logits.append(model(torch.tensor([tok]), cache))
    return out, torch.cat(logits)[: len(prompt) + steps - 1]


# --------------------------------------------------------------------------
# Agreement with llama.cpp
# --------------------------------------------------------------------------


def _llama_cpp_greedy(llm: Any, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode with llama.cpp; returns generated ids and logits for every position."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(steps):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    n = len(prompt) + steps - 1
    return out, torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))


def _max_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Largest per-position KL(ref || ours)."""
    p = torch.log_softmax(ref_logits, -1)
    q = torch.log_softmax(logits, -1)
    return (p.exp() * (p - q)).sum(-1).max().item()


def test_greedy_matches_llama_cpp(model: DecoderLM, llama: Any) -> None:
    prompt = llama.tokenize(PROMPT, add_bos=True)
    assert len(prompt) > 8
    ref_tokens, ref_logits = _llama_cpp_greedy(llama, prompt, GREEDY_STEPS)
    tokens, logits = _greedy(model, prompt, GREEDY_STEPS)
    assert tokens == ref_tokens

    diff = (logits - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    kl = _max_kl(ref_logits, logits)
    print(
        f"\nquantised GGUF: max |torch - llama.cpp| {diff:.4f} "
        f"(max |logit| {scale:.2f}), max KL {kl:.2e}"
    )
    # llama.cpp quantises activations to 8 bits inside its quantised matmuls,
    # so agreement is close but not exact (see the F32 test for exactness).
    assert diff < 0.1 * scale
    assert kl < 0.15


def _write_f32_gguf(src: Path, dest: Path, state: dict[str, torch.Tensor]) -> None:
    """Copy ``src``'s metadata and write ``state`` (our dequantised weights) as F32 tensors."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, state[gguf_to_param_name(t.name)].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_logits_match_llama_cpp_exactly_on_f32_weights(
    smollm_path: Path, model: DecoderLM, tmp_path: Path
) -> None:
    """F32 weights and KV cache make llama.cpp do plain fp32 math: logits must agree tightly."""
    import llama_cpp

    f32_path = tmp_path / "f32.gguf"
    _write_f32_gguf(smollm_path, f32_path, model.state_dict())
    llm = llama_cpp.Llama(
        model_path=str(f32_path),
        n_ctx=512,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,  # GGML_TYPE_F32: no f16 rounding of the KV cache
    )
    try:
        prompt = llm.tokenize(PROMPT, add_bos=True)
        ref_tokens, ref_logits = _llama_cpp_greedy(llm, prompt, GREEDY_STEPS)
    finally:
        llm.close()
    tokens, logits = _greedy(model, prompt, GREEDY_STEPS)
    assert tokens == ref_tokens
    diff = (logits - ref_logits).abs().max().item()
    print(f"\nF32 GGUF: max |torch - llama.cpp| {diff:.2e}")
    assert diff < 2e-3
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


# --------------------------------------------------------------------------
# Loading paths
# --------------------------------------------------------------------------


def test_config_matches_gguf_reader(smollm_path: Path) -> None:
    cfg = config_from_gguf(smollm_path)
    reader = gguf.GGUFReader(smollm_path)

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert cfg.arch == "llama"
    assert cfg.num_layers == field("llama.block_count")
    assert cfg.hidden_size == field("llama.embedding_length")
    assert cfg.intermediate_size == field("llama.feed_forward_length")
    assert cfg.num_heads == field("llama.attention.head_count")
    assert cfg.num_kv_heads == field("llama.attention.head_count_kv")
    assert cfg.head_dim == field("llama.rope.dimension_count")
    assert cfg.rope_theta == pytest.approx(field("llama.rope.freq_base"))
    assert cfg.rms_eps == pytest.approx(field("llama.attention.layer_norm_rms_epsilon"))
    assert cfg.context_length == field("llama.context_length")
    assert cfg.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_interleaved


def test_gguf_state_matches_gguf_reader(smollm_path: Path, model: DecoderLM) -> None:
    reader = gguf.GGUFReader(smollm_path)
    state = model.state_dict()
    assert len(reader.tensors) == len(state)
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        got = state[gguf_to_param_name(t.name)]
        # GGUF lists dims fastest-first; ours must be the reverse (Linear layout).
        assert tuple(got.shape) == tuple(int(d) for d in reversed(t.shape))
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy(), ref.reshape(got.shape)), t.name


def test_gguf_cache_is_used(
    smollm_path: Path, cache_dir: Path, model: DecoderLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = gguf_cache_path(smollm_path, cache_dir)
    assert cached.is_file()
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("dequantised although a cache file exists")

    monkeypatch.setattr(weights, "_dequantize", boom)
    state = load_gguf_state(smollm_path, cache_dir)
    ref = model.state_dict()
    assert set(state) == set(ref)
    for k, v in state.items():
        assert torch.equal(v, ref[k]), k


@pytest.mark.parametrize("tied", [True, False])
def test_hf_directory_matches_gguf(
    model: DecoderLM, prompt_ids: list[int], tmp_path: Path, tied: bool
) -> None:
    hf_dir = _write_hf_dir(model, tmp_path / "hf", tied=tied)
    cfg = config_from_hf(hf_dir)
    assert not cfg.rope_interleaved and cfg.tie_embeddings == tied
    hf_model = load_decoder(hf_dir)
    # q/k rows really were permuted: the HF weights differ from the GGUF ones.
    assert not torch.equal(
        hf_model.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight
    )
    ids = torch.tensor(prompt_ids)
    ref = model(ids, model.new_cache(len(ids)))
    got = hf_model(ids, hf_model.new_cache(len(ids)))
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------------
# KV cache semantics
# --------------------------------------------------------------------------


def test_batched_equals_incremental(model: DecoderLM, prompt_ids: list[int]) -> None:
    ids = torch.tensor(prompt_ids)
    batched_cache = model.new_cache(64)
    batched = model(ids, batched_cache)
    assert batched.shape == (len(ids), model.config.vocab_size)
    assert batched.dtype == torch.float32
    assert batched_cache.length == len(ids)

    step_cache = model.new_cache(64)
    steps = torch.cat([model(ids[i : i + 1], step_cache) for i in range(len(ids))])
    assert step_cache.length == len(ids)
    assert torch.allclose(batched, steps, atol=1e-3, rtol=0), (batched - steps).abs().max()

    # Mixed: prefix as a batch, then a multi-token chunk on top of a non-empty cache.
    mixed_cache = model.new_cache(64)
    split = len(ids) // 3
    mixed = torch.cat([model(ids[:split], mixed_cache), model(ids[split:], mixed_cache)])
    assert torch.allclose(batched, mixed, atol=1e-3, rtol=0), (batched - mixed).abs().max()


def test_chunked_prefill_matches_single_chunk(
    model: DecoderLM, prompt_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = torch.tensor(prompt_ids * 3)
    ref = model(ids, model.new_cache(len(ids) + 4))
    # Force query chunks of a few rows each.
    monkeypatch.setattr(torch_model, "_ATTN_CHUNK_ELEMENTS", model.config.num_heads * len(ids) * 5)
    cache = model.new_cache(len(ids) + 4)
    got = torch.cat([model(ids[:7], cache), model(ids[7:], cache)])
    assert torch.allclose(got, ref, atol=1e-3, rtol=0), (got - ref).abs().max()


def test_truncate_rollback_reproduces_logits(model: DecoderLM, prompt_ids: list[int]) -> None:
    ids = torch.tensor(prompt_ids)
    cache = model.new_cache(64)
    model(ids, cache)
    draft = torch.tensor([42, 1000, 7, 31000, 5])
    first = model(draft, cache)
    assert cache.length == len(ids) + len(draft)

    # Reject everything after the second draft token, then continue differently.
    cache.truncate(len(ids) + 2)
    assert cache.length == len(ids) + 2
    other = torch.tensor([9, 99, 999])
    alt = model(other, cache)

    fresh = model.new_cache(64)
    ref_alt = model(torch.cat([ids, draft[:2], other]), fresh)[-len(other) :]
    assert torch.allclose(alt, ref_alt, atol=1e-3, rtol=0)

    # Roll back again and replay the original draft: same logits as the first time.
    cache.truncate(len(ids))
    again = model(draft, cache)
    assert torch.allclose(again, first, atol=1e-4, rtol=0)
    assert not torch.allclose(alt[0], first[2], atol=1e-3)


def test_truncate_bounds(model: DecoderLM) -> None:
    cache = model.new_cache(8)
    assert isinstance(cache, KVCache) and cache.max_len == 8 and cache.length == 0
    model(torch.tensor([1, 2, 3]), cache)
    with pytest.raises(ValueError):
        cache.truncate(4)
    with pytest.raises(ValueError):
        cache.truncate(-1)
    cache.truncate(3)
    cache.truncate(0)
    assert cache.length == 0


def test_cache_overflow_raises(model: DecoderLM) -> None:
    cache = model.new_cache(6)
    model(torch.tensor([1, 2, 3, 4]), cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.tensor([5, 6, 7]), cache)
    assert cache.length == 4  # a failed call leaves the cache untouched
    model(torch.tensor([5, 6]), cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.tensor([7]), cache)
    with pytest.raises(ValueError):
        model(torch.tensor([[1, 2]]), model.new_cache(6))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        config_from_gguf(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf_state(missing, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_decoder(missing, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_decoder(tmp_path)


def test_non_gguf_file_raises(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        config_from_gguf(bogus)
    with pytest.raises(ValueError, match="not a GGUF"):
        load_decoder(bogus, cache_dir=tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF"):
        config_from_gguf(empty)


def test_truncated_gguf_raises(smollm_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm_path, "rb") as f:
        cut.write_bytes(f.read(4 << 20))
    with pytest.raises(ValueError, match="past end of file|truncated"):
        load_gguf_state(cut, tmp_path)


def test_unsupported_architecture_raises(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        config_from_gguf(path)
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_decoder(path, cache_dir=tmp_path)


def test_unsupported_hf_model_type_raises(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        load_decoder(tmp_path)


def test_hf_directory_without_weights_raises(model: DecoderLM, tmp_path: Path) -> None:
    hf_dir = _write_hf_dir(model, tmp_path / "hf", tied=True)
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_decoder(hf_dir)


def test_rope_layouts_are_consistent() -> None:
    """Interleaved rope on permuted rows equals rotate_half rope on the original rows."""
    torch.manual_seed(0)
    t, h, d = 5, 3, 8
    x = torch.randn(t, h, d)
    angles = torch.rand(t, 1, d // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    # Interleaved layout of x: pairs (2i, 2i+1) hold the rotate_half pair (i, i + d/2).
    perm = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), -1).flatten()
    half = torch_model.apply_rope(x, cos, sin, interleaved=False)
    inter = torch_model.apply_rope(x[..., perm], cos, sin, interleaved=True)
    assert torch.allclose(inter, half[..., perm], atol=1e-6)
    # Position 0 (angle 0) is the identity; rotation preserves norms.
    zero = torch.zeros(1, 1, d // 2)
    assert torch.equal(torch_model.apply_rope(x[:1], zero.cos(), zero.sin(), False), x[:1])
    assert torch.allclose(half.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_config_is_frozen(model: DecoderLM) -> None:
    assert isinstance(model.config, DecoderConfig)
    with pytest.raises(AttributeError):
        model.config.num_layers = 3  # type: ignore[misc]


# --------------------------------------------------------------------------
# A Hugging Face directory as the target of the user-facing API
# --------------------------------------------------------------------------


def _write_tokenizer_json(dest: Path, texts: list[bytes], *, rename: int | None = None) -> None:
    vocab = {t.decode("utf-8"): i for i, t in enumerate(texts)}
    if rename is not None:
        vocab = {(k + "_x" if i == rename else k): i for k, i in vocab.items()}
    (dest / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))


def test_hf_directory_as_generator_target(
    model: DecoderLM, smollm_path: Path, tmp_path: Path
) -> None:
    from pipesd import Generator, TokenizerMismatchError
    from pipesd.llama_backend import LlamaCppModel

    hf = _write_hf_dir(model, tmp_path / "hf", tied=True)
    vocab = LlamaCppModel(smollm_path, vocab_only=True)
    texts = vocab.token_texts()
    vocab.close()
    _write_tokenizer_json(hf, texts)
    prompt = "def fibonacci(n):"
    with Generator(
        draft=str(smollm_path), target=str(hf), n_ctx=256, policy="vanilla", draft_len=3
    ) as gen:
        assert gen.target_backend == "torch"  # auto picks torch for a directory
        from_hf = gen.generate(prompt, max_new_tokens=16)
    with Generator(
        draft=str(smollm_path), target=str(smollm_path), target_backend="torch", n_ctx=256,
        policy="vanilla", draft_len=3,
    ) as gen:  # fmt: skip
        from_gguf = gen.generate(prompt, max_new_tokens=16)
    assert from_hf.tokens == from_gguf.tokens
    assert from_hf.stats.verifications > 0

    _write_tokenizer_json(hf, texts, rename=1000)
    with pytest.raises(TokenizerMismatchError, match="token 1000"):
        Generator(draft=str(smollm_path), target=str(hf), n_ctx=256)
