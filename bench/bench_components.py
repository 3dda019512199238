"""Component timings: the draft per token; per target the pass-size curve, verify-k, decode per
token, and target-only decoding against a bare llama.cpp loop on the same file.

One thread per model; the draft is pinned to one core and each target to another. Each figure
is the median of --repeats timed repetitions after one warm-up.

Parts (--parts, comma-separated; default all):

  draft        the draft model, one token per forward pass (median per token)
  decode       target-only decoding through the backend object (``LlamaCppModel`` /
               ``TorchTarget``): one forward pass per token (median per token)
  verify       one target forward pass over [last committed token, k drafts] with the logits of
               every position, plus greedy acceptance, then the KV rollback (k = 1, 2, 4, 8, 16)
  curve        the pass-size curve: one forward pass of n tokens with the logits of every row
               after the fixed prompt context, then the KV rollback (n = --sizes, default
               1..32; --torch-sizes for the torch backend, also 1..32 by default)
  bare         llama.cpp files only: a bare loop of one-token ``llama_cpp.llama_decode`` calls
               (greedy argmax on llama.cpp's own logits buffer), no pipesd code
  target-only  ``pipesd.Generator(policy="target-only")`` with the target in this process
  cloud        the same through a ``pipesd cloud`` child process on 127.0.0.1 (cloud on core
               1, this edge on core 0)

bare, target-only and cloud decode --tokens tokens after the prompt and count the time per token
after the first output token (``(wall - TTFT) / (tokens - 1)``), --path-repeats times. Their
repeats are interleaved (bare, local, cloud, bare, ...) and each ratio is the median of the
per-repeat ratios, so it compares runs made back to back: this VM's speed drifts by 10-30%
over seconds (the same loop, alone on an idle machine), and an F16 target, bound by memory
bandwidth, slows by half when the other core streams memory.

Targets (--targets, comma-separated; default all that exist):

  llama.cpp      the shipped target GGUF (Q4_K_M) on llama.cpp
  llama.cpp-f16  the same model converted to F16 (--f16 PATH; by default the first
                 ``$PIPESD_HOME/models/*1.5b*f16*.gguf``), skipped when absent
  torch          the shipped GGUF dequantised to fp32 on the torch CPU backend

A run of some parts or targets only is merged into the previous --out/components.json (unless
--fresh), so RESULTS.md keeps the figures of the parts not run; every target records when and
under what load each part was measured.

Usage: .venv/bin/python bench/bench_components.py [--repeats 5] [--out bench/out]
       [--parts curve,bare,target-only] [--targets llama.cpp,llama.cpp-f16] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import commit_label, machine, pin, write_block
from rich.console import Console
from rich.table import Table

from pipesd import models
from pipesd.cloud.verifier import verify_greedy
from pipesd.workloads import humaneval_prompts

VERIFY_SIZES = (1, 2, 4, 8, 16)
DECODE_TOKENS = 16
PARTS = ("draft", "decode", "verify", "curve", "bare", "target-only", "cloud")
TARGETS = ("llama.cpp", "llama.cpp-f16", "torch")
DEFAULT_SIZES = tuple(range(1, 33))
DEFAULT_TORCH_SIZES = DEFAULT_SIZES
EDGE_CORE, TARGET_CORE = 0, 1


def median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- model parts
def bench_decode(model: Any, prompt: list[int], repeats: int) -> float:
    """Median ms per token of one-token greedy decoding after the prompt."""
    per_token = []
    for r in range(repeats + 1):  # the first is the warm-up
        model.truncate(0)
        model.decode(prompt[:-1], all_logits=False)
        last = prompt[-1]
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            row = model.decode([last], all_logits=False)[-1]
            last = int(np.argmax(row))
        if r:
            per_token.append((time.perf_counter() - t0) / DECODE_TOKENS)
    return median_ms(per_token)


def bench_verify(model: Any, prompt: list[int], repeats: int) -> dict[int, float]:
    model.truncate(0)
    model.decode(prompt[:-1], all_logits=False)
    base = model.kv_len
    drafts_pool = prompt[: max(VERIFY_SIZES)]
    out = {}
    for k in VERIFY_SIZES:
        samples = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            logits = model.decode([prompt[-1], *drafts_pool[:k]], all_logits=True)
            verify_greedy(logits, drafts_pool[:k])
            model.truncate(base)
            if r:
                samples.append(time.perf_counter() - t0)
        out[k] = median_ms(samples)
    return out


def bench_curve(
    model: Any, prompt: list[int], sizes: Sequence[int], repeats: int
) -> dict[int, float]:
    """ms of one forward pass of n tokens (logits for every row) after the prompt context.

    Sizes are measured round-robin (each repeat walks every size once) so that a change of load
    during the run spreads over the whole curve instead of bending part of it.
    """
    model.truncate(0)
    model.decode(prompt[:-1], all_logits=False)
    base = model.kv_len
    pool = (prompt * (max(sizes) // len(prompt) + 1))[: max(sizes)]
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(repeats + 1):
        for n in sizes:
            t0 = time.perf_counter()
            model.decode(pool[:n], all_logits=True)
            dt = time.perf_counter() - t0
            model.truncate(base)
            if r:
                samples[n].append(dt)
    return {n: median_ms(s) for n, s in samples.items()}


# ------------------------------------------------------------------------------ bare loop
class BareLlama:
    """llama.cpp through llama-cpp-python's C API only: one-token llama_decode calls.

    llama.cpp's defaults except the context size and one thread; the settings used are in
    ``settings``.
    """

    def __init__(self, path: Path, n_ctx: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        with _quiet_fd2():
            self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
            if not self.model:
                raise RuntimeError(f"llama.cpp could not load {path}")
            cp = lc.llama_context_default_params()
            cp.n_ctx = n_ctx
            cp.n_threads = cp.n_threads_batch = 1
            self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.settings = {
            "n_ctx": n_ctx,
            "n_batch": int(cp.n_batch),
            "n_ubatch": int(cp.n_ubatch),
            "threads": 1,
            "flash_attn_type": int(cp.flash_attn_type),
            "load_mode": int(mp.load_mode),
        }
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.memory = lc.llama_get_memory(self.ctx)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buf = (self.lc.llama_token * (len(data) + 16))()
        n = self.lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        return list(buf[:n])

    def run(self, prompt: list[int], tokens: int) -> float:
        """Prefill all prompt tokens but the last, then ``tokens`` greedy one-token decodes;
        returns seconds per token after the first (the same count as the Generator's)."""
        lc = self.lc
        lc.llama_memory_clear(self.memory, True)
        head = (lc.llama_token * (len(prompt) - 1))(*prompt[:-1])
        if lc.llama_decode(self.ctx, lc.llama_batch_get_one(head, len(prompt) - 1)) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        tok = (lc.llama_token * 1)(prompt[-1])
        t0 = 0.0
        for i in range(tokens):
            if i == 1:
                t0 = time.perf_counter()
            if lc.llama_decode(self.ctx, lc.llama_batch_get_one(tok, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            row = np.ctypeslib.as_array(
                lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)
            )
            tok[0] = int(np.argmax(row))
        return (time.perf_counter() - t0) / (tokens - 1)

    def close(self) -> None:
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def _quiet_fd2() -> Any:
    """llama.cpp's C-level logging silenced (pipesd's own helper)."""
    from pipesd.llama_backend import _quiet_stderr

    return _quiet_stderr()


def _per_token_after_first(stats: Any) -> float:
    if stats.new_tokens < 2:
        raise RuntimeError(f"target-only produced {stats.new_tokens} tokens; need at least 2")
    return float(stats.wall_s - stats.ttft_s) / (stats.new_tokens - 1)


def bench_paths(
    *,
    path: Path,
    backend: str,
    prompt_text: str,
    parts: set[str],
    tokens: int,
    repeats: int,
    n_ctx: int,
) -> dict[str, Any]:
    """bare / target-only / cloud, repeats interleaved; ms per token and the ratios."""
    from pipesd import Generator
    from pipesd.tune import cloud_child

    out: dict[str, Any] = {}
    samples: dict[str, list[float]] = {
        p: [] for p in ("bare", "target-only", "cloud") if p in parts
    }
    with contextlib.ExitStack() as stack:
        pin(TARGET_CORE)
        bare = None
        if "bare" in samples:
            bare = BareLlama(path, n_ctx)
            stack.callback(bare.close)
            out["bare_settings"] = bare.settings
        local = None
        if "target-only" in samples:
            local = stack.enter_context(
                Generator(
                    target=str(path),
                    target_backend=backend,
                    policy="target-only",
                    n_ctx=n_ctx,
                    target_threads=1,
                )
            )
        cloud = None
        cloud_pid = None
        if "cloud" in samples:
            address, cloud_pid = stack.enter_context(
                cloud_child(str(path), ctx=n_ctx, backend=backend, core=TARGET_CORE)
            )
            pin(EDGE_CORE)
            cloud = stack.enter_context(Generator(cloud=address, policy="target-only", n_ctx=n_ctx))
        made: dict[str, int] = {}
        for r in range(repeats + 1):
            if bare is not None:
                pin(TARGET_CORE)
                prompt = bare.tokenize(prompt_text)
                dt = bare.run(prompt, tokens)
                if r:
                    samples["bare"].append(dt)
            for name, gen, core in (
                ("target-only", local, TARGET_CORE),
                ("cloud", cloud, EDGE_CORE),
            ):
                if gen is None:
                    continue
                pin(core)
                res = gen.generate(prompt_text, max_new_tokens=tokens)
                made[name] = res.stats.new_tokens
                if r:
                    samples[name].append(_per_token_after_first(res.stats))
        if cloud_pid is not None:
            out["cloud_cpu_s"] = _cpu_seconds(cloud_pid)
    pin(TARGET_CORE)
    for name, s in samples.items():
        key = {"bare": "bare", "target-only": "target_only", "cloud": "cloud"}[name]
        out[f"{key}_ms_per_token"] = median_ms(s)
        out[f"{key}_samples_ms"] = [round(1000 * x, 2) for x in s]
        if name in made:
            out[f"{key}_tokens"] = made[name]
    out["tokens"] = tokens
    if "bare" in samples:
        # Each repeat ran the paths back to back: the median of the per-repeat ratios cancels
        # the drift of this machine's speed between repeats (often 10-30% on this VM).
        for name, key in (("target-only", "target_only"), ("cloud", "cloud")):
            if name in samples:
                pairs = zip(samples[name], samples["bare"], strict=True)
                out[f"{key}_vs_bare"] = statistics.median(a / b for a, b in pairs)
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- driving
def default_f16() -> Path | None:
    found = sorted((models.pipesd_home() / "models").glob("*1.5b*f16*.gguf"))
    return found[0] if found else None


def target_files(names: Sequence[str], f16: Path | None) -> dict[str, tuple[str, Path]]:
    """label -> (pipesd backend, file) for every requested target that exists."""
    shipped = models.resolve(models.DEFAULT_TARGET)
    out: dict[str, tuple[str, Path]] = {}
    for name in names:
        if name == "llama.cpp":
            out[name] = ("llama.cpp", shipped)
        elif name == "torch":
            out[name] = ("torch", shipped)
        elif name == "llama.cpp-f16":
            if f16 is not None and f16.is_file():
                out[name] = ("llama.cpp", f16)
            else:
                print(f"skipping {name}: no F16 file (--f16 PATH; looked for {f16 or 'none'})")
    return out


def load_target(backend: str, path: Path, n_ctx: int) -> Any:
    if backend == "torch":
        from pipesd.cloud.targets import TorchTarget

        return TorchTarget(path, n_ctx=n_ctx, threads=1)
    from pipesd.llama_backend import LlamaCppModel

    return LlamaCppModel(path, n_ctx=n_ctx, n_threads=1)


def run(
    *,
    repeats: int,
    out_dir: Path,
    parts: set[str],
    targets: Sequence[str],
    f16: Path | None,
    sizes: Sequence[int],
    torch_sizes: Sequence[int],
    tokens: int,
    n_ctx: int,
    fresh: bool,
    path_repeats: int,
) -> dict[str, Any]:
    prompt_text = humaneval_prompts()[0]
    out_file = out_dir / "components.json"
    result: dict[str, Any] = {}
    if not fresh and out_file.exists():
        with contextlib.suppress(ValueError):
            result = json.loads(out_file.read_text())
    result.setdefault("targets", {})
    result.update(
        machine=machine(), repeats=repeats, path_repeats=path_repeats, threads=1, n_ctx=n_ctx
    )
    with contextlib.suppress(ImportError):
        import torch

        result["machine"]["torch"] = torch.__version__
    import llama_cpp

    result["machine"]["llama_cpp_python"] = llama_cpp.__version__
    result["machine"]["llama_cpp_system"] = llama_cpp.llama_print_system_info().decode().strip()

    from pipesd.llama_backend import LlamaCppModel

    tok = LlamaCppModel(models.resolve(models.DEFAULT_DRAFT), vocab_only=True)
    prompt = tok.tokenize(prompt_text)
    tok.close()
    result["prompt_tokens"] = len(prompt)

    if "draft" in parts:
        pin(EDGE_CORE)
        draft = LlamaCppModel(models.resolve(models.DEFAULT_DRAFT), n_ctx=n_ctx, n_threads=1)
        result["draft_ms_per_token"] = bench_decode(draft, prompt, repeats)
        result["draft_measured"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": load_now()}
        draft.close()

    for label, (backend, path) in target_files(targets, f16).items():
        entry: dict[str, Any] = result["targets"].setdefault(label, {})
        entry.update(backend=backend, file=path.name, file_bytes=path.stat().st_size)
        measured = entry.setdefault("measured", {})
        model_parts = parts & {"decode", "verify", "curve"}
        if model_parts:
            pin(TARGET_CORE)
            print(f"{label}: {', '.join(sorted(model_parts))}", flush=True)
            t0 = time.perf_counter()
            target = load_target(backend, path, n_ctx)
            entry["load_s"] = time.perf_counter() - t0
            if "decode" in parts:
                entry["decode_ms_per_token"] = bench_decode(target, prompt, repeats)
            if "verify" in parts:
                entry["verify_ms"] = bench_verify(target, prompt, repeats)
            if "curve" in parts:
                entry["pass_ms"] = bench_curve(
                    target, prompt, torch_sizes if backend == "torch" else sizes, repeats
                )
            for p in model_parts:
                measured[p] = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": load_now()}
            if hasattr(target, "close"):
                target.close()
            del target
            gc.collect()
        path_parts = parts & {"bare", "target-only", "cloud"}
        if backend == "torch":
            path_parts.discard("bare")
        if path_parts:
            print(f"{label}: {', '.join(sorted(path_parts))}", flush=True)
            load0 = load_now()
            entry.update(
                bench_paths(
                    path=path,
                    backend=backend,
                    prompt_text=prompt_text,
                    parts=path_parts,
                    tokens=tokens,
                    repeats=path_repeats,
                    n_ctx=n_ctx,
                )
            )
            for p in path_parts:
                measured[p] = {
                    "date": time.strftime("%Y-%m-%d %H:%M"),
                    "load": [load0, load_now()],
                }
            gc.collect()
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------- reports
def _get(d: dict[str, Any], key: str, k: int) -> float | None:
    """A size-keyed figure; JSON turns the integer keys into strings."""
    table = d.get(key) or {}
    v = table.get(k, table.get(str(k)))
    return None if v is None else float(v)


def _cell(v: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def table_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch "
        f"{m.get('torch', '-')}, llama-cpp-python {m.get('llama_cpp_python', '-')}; commit "
        f"{commit_label(m)}, {m['date']}. One thread per model, draft pinned to core 0, target "
        f"to core 1; median of {r['repeats']} repeats after a warm-up; context "
        f"{r.get('n_ctx', 1024)}; prompt HumanEval/0 ({r['prompt_tokens']} tokens). Command: "
        "`.venv/bin/python bench/bench_components.py`.",
        "",
    ]
    if "draft_ms_per_token" in r:
        lines += [
            f"Draft `{models.DEFAULT_DRAFT}` (llama.cpp): **{r['draft_ms_per_token']:.1f} "
            "ms/token**.",
            "",
        ]
    targets: dict[str, Any] = r["targets"]
    lines += [
        "| target (`"
        + models.DEFAULT_TARGET
        + "`) | file | decode ms/token | "
        + " | ".join(f"verify {k}" for k in VERIFY_SIZES)
        + " | load s |",
        "|---|---|---:|" + "---:|" * len(VERIFY_SIZES) + "---:|",
    ]
    for name, t in targets.items():
        cells = " | ".join(_cell(_get(t, "verify_ms", k)) for k in VERIFY_SIZES)
        lines.append(
            f"| {name} | `{t.get('file', '')}` | {_cell(t.get('decode_ms_per_token'), '{:.1f}')} "
            f"| {cells} | {_cell(t.get('load_s'), '{:.1f}')} |"
        )
    lines += [
        "",
        "Verify times in ms: one forward pass over the last committed token and k drafts.",
    ]

    paths = {
        n: t
        for n, t in targets.items()
        if "target_only_ms_per_token" in t or "bare_ms_per_token" in t or "cloud_ms_per_token" in t
    }
    if paths:
        lines += [
            "",
            "Target-only against a bare loop: ms per token after the first output token, median "
            f"of {r.get('path_repeats', r['repeats'])} repeats run back to back (bare, local, "
            "cloud, bare, ...); ratio: the median of the per-repeat ratios to the bare loop. "
            "Bare: one-token `llama_cpp.llama_decode` calls with llama.cpp's default settings "
            "and greedy argmax, no pipesd code; cloud: `pipesd cloud` on core 1, the edge on "
            "core 0.",
            "",
            "| target | bare `llama_decode` loop | target-only, local | ratio | "
            "target-only, through `pipesd cloud` | ratio | tokens |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in paths.items():
            ratio_l = t.get("target_only_vs_bare")
            ratio_c = t.get("cloud_vs_bare")
            lines.append(
                f"| {name} | {_cell(t.get('bare_ms_per_token'), '{:.1f}')} | "
                f"{_cell(t.get('target_only_ms_per_token'), '{:.1f}')} | "
                f"{_cell(ratio_l, '{:.3f}')} | {_cell(t.get('cloud_ms_per_token'), '{:.1f}')} | "
                f"{_cell(ratio_c, '{:.3f}')} | {t.get('tokens', '–')} |"
            )
    curves = {n: t for n, t in targets.items() if t.get("pass_ms")}
    if curves:
        all_sizes = sorted({int(k) for t in curves.values() for k in t["pass_ms"]})
        lines += [
            "",
            "Pass-size curve: ms of one forward pass of n tokens with the logits of every row "
            "after the prompt (n x one-token decode in brackets where measured):",
            "",
            "| n | " + " | ".join(curves) + " |",
            "|---:|" + "---:|" * len(curves),
        ]
        for n in all_sizes:
            cells = []
            for t in curves.values():
                v = _get(t, "pass_ms", n)
                one = _get(t, "pass_ms", 1)
                cells.append(
                    "–"
                    if v is None
                    else f"{v:.0f}" + (f" ({n * one:.0f})" if one and n > 1 else "")
                )
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``1-32`` or ``1,2,4,8`` (or a mix: ``1-8,12,16``)."""
    out: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        lo, _, hi = piece.partition("-")
        a, b = int(lo), int(hi or lo)
        if a < 1 or b < a:
            raise argparse.ArgumentTypeError(f"bad size range {piece!r}")
        out.update(range(a, b + 1))
    if not out:
        raise argparse.ArgumentTypeError("no sizes")
    return tuple(sorted(out))


def parse_list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--path-repeats",
        type=int,
        default=9,
        help="repeats of bare / target-only / cloud (default 9; ratios need more than speeds)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("out"))
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument(
        "--parts",
        type=parse_list(PARTS),
        default=PARTS,
        help=f"comma-separated, from {','.join(PARTS)} (default all)",
    )
    ap.add_argument(
        "--targets",
        type=parse_list(TARGETS),
        default=TARGETS,
        help=f"comma-separated, from {','.join(TARGETS)} (default all present)",
    )
    ap.add_argument(
        "--f16",
        type=Path,
        default=None,
        help="the F16 GGUF of the target (default: $PIPESD_HOME/models/*1.5b*f16*.gguf)",
    )
    ap.add_argument(
        "--sizes",
        type=parse_sizes,
        default=DEFAULT_SIZES,
        help="pass sizes of the curve for llama.cpp (default 1-32)",
    )
    ap.add_argument(
        "--torch-sizes",
        type=parse_sizes,
        default=DEFAULT_TORCH_SIZES,
        help="pass sizes for torch (default 1-32: about 4 minutes at 5 repeats; fp32 on one core)",
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=32,
        help="tokens decoded by bare / target-only / cloud (default 32)",
    )
    ap.add_argument("--ctx", type=int, default=1024, help="context size of every model")
    ap.add_argument(
        "--fresh", action="store_true", help="do not merge into the previous components.json"
    )
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")
    r = run(
        repeats=args.repeats,
        out_dir=args.out,
        parts=set(args.parts),
        targets=args.targets,
        f16=args.f16 if args.f16 is not None else default_f16(),
        sizes=args.sizes,
        torch_sizes=args.torch_sizes,
        tokens=args.tokens,
        n_ctx=args.ctx,
        fresh=args.fresh,
        path_repeats=args.path_repeats,
    )
    table = Table(title="PipeSD components (ms)")
    table.add_column("what")
    table.add_column("ms", justify="right")
    if "draft_ms_per_token" in r:
        table.add_row("draft per token", f"{r['draft_ms_per_token']:.1f}")
    for name, t in r["targets"].items():
        if "decode_ms_per_token" in t:
            table.add_row(f"{name} decode per token", f"{t['decode_ms_per_token']:.1f}")
        for k, v in (t.get("verify_ms") or {}).items():
            table.add_row(f"{name} verify {k}", f"{v:.0f}")
        for key, what in (
            ("bare", "bare llama_decode loop"),
            ("target_only", "target-only local"),
            ("cloud", "target-only via cloud"),
        ):
            if f"{key}_ms_per_token" in t:
                extra = f" ({t[key + '_vs_bare']:.3f}x bare)" if f"{key}_vs_bare" in t else ""
                table.add_row(f"{name} {what} per token", f"{t[key + '_ms_per_token']:.1f}{extra}")
        if t.get("pass_ms"):
            curve = ", ".join(f"{k}:{v:.0f}" for k, v in t["pass_ms"].items())
            table.add_row(f"{name} pass n:ms", curve)
    Console().print(table)
    if not args.no_write:
        write_block("components", "## Components", table_markdown(r))


if __name__ == "__main__":
    main()
