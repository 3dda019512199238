"""Model configuration and fp32 weights for the Llama/Qwen2 decoder family.

Two sources are supported: GGUF files (dequantised with ``gguf.quants`` and
cached on disk as safetensors) and Hugging Face directories holding a
``config.json`` plus ``*.safetensors`` shards.  Both produce a state dict
keyed by :class:`pipesd.cloud.torch_model.DecoderLM` parameter names, with
PyTorch ``Linear`` layout ``[out_features, in_features]``.

GGUF metadata is parsed by a small reader in this module rather than by
``gguf.GGUFReader``: the latter decodes every tokenizer string into Python
objects, which takes 10-20 s for a 150k-token vocabulary and would dominate
a cached load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2")

# Bump when the cached tensor names, layout or dtype change.
CACHE_FORMAT_VERSION = 1

_GGUF_MAGIC = b"GGUF"
_MIB = 1 << 20
# Dequantise at most this many output elements at once to bound peak memory.
_DEQUANT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a Llama/Qwen2-style decoder."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context_length: int
    qkv_bias: bool
    tie_embeddings: bool
    rope_interleaved: bool


# --------------------------------------------------------------------------
# State-dict naming and validation
# --------------------------------------------------------------------------

_GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

_GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_param_name(name: str) -> str:
    """Map a GGUF tensor name to the DecoderLM parameter name."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        suffix = _GGUF_LAYER_NAMES.get(parts[2])
        if suffix is not None:
            return f"layers.{int(parts[1])}.{suffix}"
    raise ValueError(f"unsupported GGUF tensor {name!r}")


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes that a state dict for ``config`` must have."""
    d, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (config.vocab_size, d),
        "norm.weight": (d,),
    }
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q_out)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, d)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, d)
        shapes[p + "mlp.down_proj.weight"] = (d, config.intermediate_size)
    return shapes


def check_state(
    config: DecoderConfig,
    shapes: dict[str, tuple[int, ...]],
    source: str | os.PathLike[str],
) -> None:
    """Raise ValueError unless ``shapes`` (name -> shape) matches ``config``."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = sorted(
        f"{k} {tuple(shapes[k])} != {want[k]}"
        for k in set(want) & set(shapes)
        if tuple(shapes[k]) != want[k]
    )
    problems = []
    if missing:
        problems.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    if wrong:
        problems.append(f"bad shape {wrong[:3]}{'...' if len(wrong) > 3 else ''}")
    if problems:
        raise ValueError(f"{source}: weights do not match config: {'; '.join(problems)}")


# --------------------------------------------------------------------------
# Minimal GGUF reader (metadata + tensor directory, little-endian v2/v3)
# --------------------------------------------------------------------------

_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_DTYPES: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFStringArray:
    """A string array whose elements were skipped; only its length is kept."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Location and type of one tensor in a GGUF file."""

    name: str
    shape: tuple[int, ...]  # PyTorch order: outermost dimension first
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """Parsed GGUF header: metadata key/values and the tensor directory."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ValueError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                # Skip the strings: decoding 150k vocab entries is slow.
                for _ in range(count):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                return GGUFStringArray(count)
            if etype not in _NUMPY_DTYPES:
                raise ValueError(f"{self.path}: unsupported GGUF array type {etype}")
            dtype = np.dtype(_NUMPY_DTYPES[etype])
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr
        raise ValueError(f"{self.path}: unsupported GGUF value type {vtype}")


def _check_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (expected {what})")
    if not p.is_file():
        raise ValueError(f"{p}: not a regular file (expected {what})")
    return p


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the header of a GGUF file (metadata and tensor directory)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = _check_file(path, "a GGUF model file")
    with open(p, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{p}: not a GGUF file (bad magic, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, p)
            cur.pos = 4
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"{p}: unsupported GGUF version {version} (expected 2 or 3)")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.unpack("<I"))
            raw_infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("<I")
                dims = [cur.unpack("<Q") for _ in range(n_dims)]
                raw_infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
            alignment = int(metadata.get("general.alignment", 32))
            data_start = -(-cur.pos // alignment) * alignment
            file_size = len(buf)
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, qtype, rel in raw_infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ValueError(f"{p}: tensor {name!r} has unknown ggml type {qtype}") from None
        n_rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        nbytes = n_rows * (dims[0] // block) * type_size
        offset = data_start + rel
        if offset + nbytes > file_size:
            raise ValueError(f"{p}: tensor {name!r} extends past end of file (truncated?)")
        # ggml lists the fastest-varying dimension first; PyTorch wants it last.
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, nbytes)
    return GGUFFile(p, metadata, tensors)


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def _config_from_parsed(g: GGUFFile) -> DecoderConfig:
    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{g.path}: unsupported architecture {arch!r} (expected one of {SUPPORTED_ARCHS})"
        )

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full in md:
            value = md[full]
            if isinstance(value, np.ndarray):
                if value.size == 0 or not np.all(value == value.flat[0]):
                    raise ValueError(f"{g.path}: per-layer {full} is not supported")
                value = value.flat[0].item()
            return value
        if default is None:
            raise ValueError(f"{g.path}: GGUF metadata key {full!r} is missing")
        return default

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    num_kv_heads = int(get("attention.head_count_kv", num_heads))
    head_dim = int(get("attention.key_length", 0)) or hidden // num_heads
    rope_dim = int(get("rope.dimension_count", head_dim))
    if arch == "llama" and f"{arch}.attention.key_length" not in md:
        head_dim = rope_dim
    if rope_dim != head_dim:
        raise ValueError(
            f"{g.path}: partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim})"
            " are not supported"
        )
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{g.path}: value head size differs from key head size; not supported")
    if md.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear") or float(
        md.get(f"{arch}.rope.scaling.factor", 1.0)
    ) not in (0.0, 1.0):
        raise ValueError(f"{g.path}: RoPE scaling is not supported")

    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{g.path}: GGUF has no token_embd.weight tensor")
    # The metadata vocabulary ({arch}.vocab_size or the token list) can be
    # shorter than a padded embedding matrix; logits span the matrix's rows.
    vocab = emb.shape[0]
    meta_vocab = md.get(f"{arch}.vocab_size", md.get("tokenizer.ggml.tokens"))
    if (
        meta_vocab is not None
        and (len(meta_vocab) if isinstance(meta_vocab, GGUFStringArray) else int(meta_vocab))
        > vocab
    ):
        raise ValueError(f"{g.path}: vocabulary is larger than token_embd.weight ({vocab} rows)")

    return DecoderConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        context_length=int(get("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        tie_embeddings="output.weight" not in g.tensors,
        # llama.cpp's converter permutes q/k rows for llama (interleaved-pair
        # rope) but not for qwen2 (NEOX / rotate_half rope).
        rope_interleaved=(arch == "llama"),
    )


def config_from_gguf(path: str | os.PathLike[str]) -> DecoderConfig:
    """Read the decoder configuration from a GGUF file's metadata."""
    return _config_from_parsed(read_gguf(path))


def config_from_hf(path: str | os.PathLike[str]) -> DecoderConfig:
    """Read the decoder configuration from a Hugging Face model directory."""
    d = Path(path)
    cfg_path = d / "config.json"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory (expected a Hugging Face model directory)")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no such file (expected a Hugging Face config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{cfg_path}: unsupported model_type {arch!r} (expected one of {SUPPORTED_ARCHS})"
        )
    scaling = cfg.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ValueError(f"{cfg_path}: rope_scaling {scaling} is not supported")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{cfg_path}: mlp_bias is not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{cfg_path}: sliding-window attention is not supported")
    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        return DecoderConfig(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            context_length=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_interleaved=False,
        )
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing required key {e.args[0]!r}") from None


# --------------------------------------------------------------------------
# GGUF weights with an on-disk fp32 cache
# --------------------------------------------------------------------------


def gguf_cache_key(path: str | os.PathLike[str]) -> str:
    """Content key of a GGUF file: its size plus a hash of its first and last MiB."""
    p = _check_file(path, "a GGUF model file")
    size = p.stat().st_size
    h = hashlib.sha256(f"pipesd-gguf-v{CACHE_FORMAT_VERSION}:{size}:".encode())
    with open(p, "rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(0, size - _MIB))
        h.update(f.read(_MIB))
    return h.hexdigest()[:32]


def gguf_cache_path(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> Path:
    """Where the fp32 cache of a GGUF file lives inside ``cache_dir``."""
    return Path(cache_dir) / f"{Path(path).stem}-{gguf_cache_key(path)}.safetensors"


def _dequantize(buf: mmap.mmap, info: GGUFTensorInfo) -> torch.Tensor:
    """Dequantise one GGUF tensor to a float32 tensor of PyTorch shape."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    cols = info.shape[-1]
    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
    row_bytes = cols // block * type_size
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    raw = raw.reshape(rows, row_bytes)
    out = torch.empty(rows, cols, dtype=torch.float32)
    out_np = out.numpy()
    step = max(1, _DEQUANT_CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        try:
            chunk = dequantize(raw[r : r + step], qtype)
        except NotImplementedError:
            raise ValueError(
                f"tensor {info.name!r}: ggml type {qtype.name} cannot be dequantised"
            ) from None
        out_np[r : r + step] = chunk.reshape(-1, cols)
    return out.reshape(info.shape)


def _write_safetensors_streaming(
    dest: Path,
    shapes: dict[str, tuple[int, ...]],
    produce: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
) -> None:
    """Write fp32 tensors as safetensors one at a time, atomically.

    The header is written first from ``shapes``, so the whole state never has
    to be serialised into one in-memory buffer (that would double peak RAM).
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets: dict[str, int] = {}
    pos = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            base = f.tell()
            for name, tensor in produce:
                if f.tell() - base != offsets[name] or tuple(tensor.shape) != shapes[name]:
                    raise RuntimeError(f"internal error writing {name} to {dest}")
                f.write(tensor.contiguous().numpy().data.cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _load_gguf_uncached(g: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    with open(g.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name, info in g.tensors.items():
            yield gguf_to_param_name(name), _dequantize(buf, info)


def load_gguf_state(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None,
) -> dict[str, torch.Tensor]:
    """Dequantise a GGUF file to an fp32 state dict, caching it under ``cache_dir``.

    A cache hit skips dequantisation entirely; ``cache_dir=None`` disables the
    cache.  Raises FileNotFoundError/ValueError for missing, non-GGUF or
    unsupported files.
    """
    from safetensors.torch import load_file

    g = read_gguf(path)
    config = _config_from_parsed(g)
    shapes = {gguf_to_param_name(n): t.shape for n, t in g.tensors.items()}
    check_state(config, shapes, g.path)

    cache_file = gguf_cache_path(g.path, cache_dir) if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            cached: dict[str, torch.Tensor] | None = load_file(str(cache_file))
        except Exception:  # unreadable cache: fall through and rebuild it
            cached = None
        if cached is not None and {k: tuple(v.shape) for k, v in cached.items()} == shapes:
            return cached

    state: dict[str, torch.Tensor] = {}

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in _load_gguf_uncached(g):
            state[name] = tensor
            yield name, tensor

    if cache_file is None:
        for _ in produce():
            pass
        return state
    metadata = {
        "format": "pt",
        "pipesd_cache_version": str(CACHE_FORMAT_VERSION),
        "source": g.path.name,
    }
    _write_safetensors_streaming(cache_file, shapes, produce(), metadata)
    return state


# --------------------------------------------------------------------------
# Hugging Face safetensors directories
# --------------------------------------------------------------------------


def load_hf_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a Hugging Face directory's ``*.safetensors`` weights (dtype as stored)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    config = config_from_hf(d)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors files (expected Hugging Face weights)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        for name, tensor in shard.items():
            if name.startswith("model."):
                name = name[len("model.") :]
            elif name != "lm_head.weight":
                raise ValueError(f"{f}: unexpected tensor {name!r}")
            if name.endswith("rotary_emb.inv_freq"):
                continue
            state[name] = tensor
    if config.tie_embeddings:
        # Some checkpoints store the tied head anyway; it duplicates the embedding.
        state.pop("lm_head.weight", None)
    check_state(config, {k: tuple(v.shape) for k, v in state.items()}, d)
    return state
