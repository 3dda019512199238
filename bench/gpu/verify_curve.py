"""The torch target's verification cost by pass size on a GPU, with random weights.

For a machine with CUDA where model files cannot travel: the decoder of ``pipesd`` (the
same ``DecoderLM`` the cloud's torch backend runs) is built with random weights of the
Qwen2.5 1.5B and 7B shapes, in bf16, and each pass of 1..32 tokens is timed after a context
of ``--context`` tokens, as the cloud's calibration does (one pass = forward + argmax of
every row on the device). A tiny synthetic model checks the CUDA path against fp32 on the
CPU first.

Run from the repository root (needs torch and numpy only; the compiled core is not
imported)::

    python bench/gpu/verify_curve.py --out "$OUT"

Writes OUT/verify_curve.json (everything) and OUT/curve-SHAPE.json (``{"verify_s": [...]}``,
the cost-table format of the cloud's calibration cache) and prints a Markdown table. On a
machine without CUDA, ``--device cpu --shapes tiny`` runs the same code as a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _import_decoder() -> Any:
    """``pipesd.cloud.torch_model`` without running ``pipesd/__init__`` (which loads the
    compiled core and llama.cpp, neither of which this script needs)."""
    for name, sub in (("pipesd", "pipesd"), ("pipesd.cloud", "pipesd/cloud")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(ROOT / sub)]
            sys.modules[name] = pkg
    import pipesd.cloud.torch_model as tm

    return tm


def shapes(tm: Any) -> dict[str, Any]:
    cfg = tm.DecoderConfig
    common = dict(arch="qwen2", rope_theta=1e6, rms_eps=1e-6, context_length=32768,
                  qkv_bias=True, rope_interleaved=False)  # fmt: skip
    return {
        "tiny": cfg(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=352,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            tie_embeddings=True,
            **common,
        ),  # fmt: skip
        "qwen2.5-1.5b": cfg(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            head_dim=128,
            tie_embeddings=True,
            **common,
        ),  # fmt: skip
        "qwen2.5-7b": cfg(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            tie_embeddings=False,
            **common,
        ),  # fmt: skip
    }


def random_model(tm: Any, config: Any, *, device: str, dtype: Any, seed: int) -> Any:
    """A DecoderLM with N(0, 0.02) weights (norms at 1), made directly on ``device``."""
    import torch

    with torch.device("meta"):
        model = tm.DecoderLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pass_curve(tm: Any, config: Any, *, device: str, dtype: Any, context: int,
               max_pass: int, repeats: int) -> dict[str, Any]:  # fmt: skip
    """Median wall time of a pass of n tokens (forward + every row's argmax), n = 1..max_pass,
    each after the same ``context`` tokens."""
    import torch

    t0 = time.perf_counter()
    model = random_model(tm, config, device=device, dtype=dtype, seed=0)
    sync(device)
    build_s = time.perf_counter() - t0
    cache = model.new_cache(context + max_pass + 1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (context + max_pass,), generator=gen)
    model.forward(ids[:context], cache, last_only=True)
    window = ids[context:]

    def one(n: int) -> float:
        cache.truncate(context)
        sync(device)
        t = time.perf_counter()
        top = model.forward(window[:n], cache).argmax(dim=-1)
        top.cpu()
        sync(device)
        return time.perf_counter() - t

    for n in range(1, max_pass + 1):  # warm-up: kernels chosen and compiled per shape
        one(n)
    pass_s = [statistics.median(one(n) for _ in range(repeats)) for n in range(1, max_pass + 1)]
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "build_s": build_s, "verify_s": pass_s}


def check_against_cpu(tm: Any, device: str) -> dict[str, Any]:
    """The tiny model's logits on ``device`` (fp32 and bf16) against fp32 on the CPU, for one
    pass of 24 tokens and for the same tokens as a prefill of 16 and a pass of 8."""
    import torch

    config = shapes(tm)["tiny"]
    ref = random_model(tm, config, device="cpu", dtype=torch.float32, seed=3)
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(4))
    want = ref.forward(ids, ref.new_cache(32))
    out: dict[str, Any] = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        m = tm.DecoderLM.from_state_dict(config, state, device=device, dtype=dtype)
        got = m.forward(ids, m.new_cache(32)).cpu()
        cache = m.new_cache(32)
        m.forward(ids[:16], cache, last_only=True)
        split = m.forward(ids[16:], cache).cpu()
        out[label] = {
            "max_abs_diff": float((got - want).abs().max()),
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            "split_vs_one_pass_max_abs_diff": float((split - got[16:]).abs().max()),
        }
    out["fp32_ok"] = out["fp32"]["max_abs_diff"] < 1e-3 and out["fp32"]["argmax_agree"] == 1.0
    return out


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b")
    ap.add_argument("--context", type=int, default=64, help="tokens before each pass")
    ap.add_argument("--max-pass", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("verify_curve: no CUDA device here; use --device cpu --shapes tiny", file=sys.stderr)
        return 2
    tm = _import_decoder()
    known = shapes(tm)
    wanted = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        print(f"verify_curve: unknown shape(s) {', '.join(unknown)}; choose from "
              f"{', '.join(known)}", file=sys.stderr)  # fmt: skip
        return 2
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "context": args.context,
        "repeats": args.repeats,
        "check": check_against_cpu(tm, args.device),
        "shapes": {},
    }
    print(f"check against fp32 CPU: {json.dumps(result['check'])}", flush=True)
    for name in wanted:
        curve = pass_curve(tm, known[name], device=args.device, dtype=dtype, context=args.context,
                           max_pass=args.max_pass, repeats=args.repeats)  # fmt: skip
        curve["config"] = dataclasses.asdict(known[name])
        result["shapes"][name] = curve
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the last shape's weights are gone: the next one fits
        (args.out / f"curve-{name}.json").write_text(json.dumps({"verify_s": curve["verify_s"]}))
        v = curve["verify_s"]
        print(f"{name}: {curve['params'] / 1e9:.2f} B parameters, built in "
              f"{curve['build_s']:.1f} s; pass of 1: {1e3 * v[0]:.2f} ms, of {len(v)}: "
              f"{1e3 * v[-1]:.2f} ms", flush=True)  # fmt: skip
    (args.out / "verify_curve.json").write_text(json.dumps(result, indent=1))
    sizes = [1, 2, 4, 8, 12, 16, 24, 32]
    sizes = [n for n in sizes if n <= args.max_pass]
    print(f"\n| shape ({result['device']}, {result['dtype']}) | "
          + " | ".join(str(n) for n in sizes) + " |")  # fmt: skip
    print("|---|" + "---:|" * len(sizes))
    for name, curve in result["shapes"].items():
        v = curve["verify_s"]
        print(f"| {name}, ms | " + " | ".join(f"{1e3 * v[n - 1]:.2f}" for n in sizes) + " |")
    return 0 if result["check"]["fp32_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
