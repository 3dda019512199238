"""The ``pipesd`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

from pipesd import link, models
from pipesd.cloud.server import MiB, ServerLimits
from pipesd.cloud.targets import BACKENDS
from pipesd.errors import PipesdError
from pipesd.policies import POLICIES


def _add_generate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "generate",
        help="generate text with speculative decoding",
        description="Generate a continuation of PROMPT. Text streams to stdout, then one "
        "statistics line on stderr (or one JSON object with --json).",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; '-' reads standard input")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--local", action="store_true", help="run draft and target in this process (default)"
    )
    mode.add_argument("--cloud", metavar="HOST:PORT",
                      help="verify on a `pipesd cloud` server (or a `pipesd link` in front of "
                      "it); the server chooses the target")  # fmt: skip
    p.add_argument("--auth-token-file", metavar="FILE",
                   help="--cloud: file holding the server's auth token")  # fmt: skip
    p.add_argument("--reconnect-timeout", type=float, default=30.0, metavar="S",
                   help="--cloud: seconds to retry a lost connection (default 30)")  # fmt: skip
    p.add_argument("--draft", default=models.DEFAULT_DRAFT, help="draft model name or GGUF path")
    p.add_argument("--target", default=None,
                   help="target model name, GGUF path or Hugging Face directory "
                   f"(default {models.DEFAULT_TARGET})")  # fmt: skip
    p.add_argument("--target-backend", choices=BACKENDS, default="auto",
                   help="auto: torch on CUDA, llama.cpp on CPU (default auto)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch target device: cpu or cuda[:N]")
    p.add_argument("--policy", choices=list(POLICIES), default="auto",
                   help="; ".join(f"{k}: {v}" for k, v in POLICIES.items()))  # fmt: skip
    p.add_argument("--draft-len", type=int, default=6,
                   help="drafts per verification (vanilla, pipesd-fixed-trigger)")  # fmt: skip
    p.add_argument("--retune-drift", type=float, default=None, metavar="F",
                   help="pipesd: re-tune R1/R2 online when time per token rises by more than "
                   "this fraction (e.g. 0.3); default: never")  # fmt: skip
    p.add_argument("--thresholds", metavar="FILE",
                   help="PipeSD's R1/R2 from `pipesd tune` (default: $PIPESD_HOME/thresholds.json "
                   "if present, else built-in)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=40, help="sampling: top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="sampling: top-p")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible runs)")
    p.add_argument("--ctx", type=int, default=4096, help="context size (prompt + new tokens)")
    p.add_argument("--draft-threads", type=int, default=1)
    p.add_argument("--target-threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_cloud(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cloud",
        help="serve the target model to edge clients over TCP",
        description="Load the target once and verify drafts for edge sessions "
        "(`pipesd generate --cloud HOST:PORT`) until SIGINT/SIGTERM.",
    )
    p.add_argument("--target", default=models.DEFAULT_TARGET,
                   help="target model name, GGUF path or Hugging Face directory")  # fmt: skip
    p.add_argument("--target-backend", choices=BACKENDS, default="auto",
                   help="auto: torch on CUDA, llama.cpp on CPU (default auto)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="torch target device: cpu or cuda[:N]")
    p.add_argument("--listen", default="127.0.0.1:7070", metavar="HOST:PORT",
                   help="listen address (default 127.0.0.1:7070; port 0: any)")  # fmt: skip
    p.add_argument("--auth-token-file", metavar="FILE",
                   help="file holding the shared secret every client must present; "
                   "required when listening off loopback")  # fmt: skip
    p.add_argument("--max-sessions", type=int, default=8, help="sessions served at once")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip measuring the verification cost of passes of 1..32 tokens at "
                   "start (it is cached per model file; edges then learn the costs only from "
                   "the passes served)")  # fmt: skip
    p.add_argument("--ctx", type=int, default=4096, help="context size per session")
    p.add_argument("--target-threads", type=int, default=1)
    lim = p.add_argument_group("limits (README, Limits)")
    d = ServerLimits()
    lim.add_argument("--max-window", type=int, default=d.max_window, metavar="N",
                     help=f"most drafts one verification covers (default {d.max_window}); "
                     "announced to edges, which keep their windows within it")  # fmt: skip
    lim.add_argument("--max-dist", type=int, default=d.max_dist, metavar="N",
                     help="most entries of one draft distribution in sampled decoding "
                     f"(default {d.max_dist}); announced to edges")  # fmt: skip
    lim.add_argument("--hello-timeout", type=float, default=d.hello_timeout, metavar="S",
                     help=f"seconds a new connection has to say HELLO (default "
                     f"{d.hello_timeout:g})")  # fmt: skip
    lim.add_argument("--idle-timeout", type=float, default=d.idle_timeout, metavar="S",
                     help=f"seconds a session may stay silent (default {d.idle_timeout:g}); "
                     "the edge reconnects by itself when it needs the cloud again")  # fmt: skip
    lim.add_argument("--max-pending", type=int, default=d.max_pending, metavar="N",
                     help=f"connections waiting for HELLO at once (default {d.max_pending}); "
                     "one more closes the oldest")  # fmt: skip
    lim.add_argument("--memory-budget", type=int, default=d.memory // MiB, metavar="MIB",
                     help="MiB of frames all connections may have queued together (default "
                     f"{d.memory // MiB}); past it the cloud stops reading until it catches "
                     "up")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="log every session event")


def read_token_file(path: str) -> str:
    """The auth token in a file (surrounding whitespace ignored); one-line errors."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read auth token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"auth token file {path} is not UTF-8 text") from None
    if not token:
        raise ValueError(f"auth token file {path} is empty")
    return token


def _add_tune(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pipesd.link import SCENARIOS

    p = sub.add_parser(
        "tune",
        help="tune PipeSD's thresholds R1, R2 on measured time per token",
        description="Run PipeSD through the split system (a cloud process with the target, the "
        "link emulator in SCENARIO, the draft here) on the workload's tuning split and let a "
        "Bayesian optimiser (Nevergrad BO) pick (R1, R2) with the lowest time per token. "
        "Writes a thresholds file that `generate --thresholds` reads (by default the one "
        "`generate` uses).",
    )
    p.add_argument("--scenario", choices=list(SCENARIOS), default="paper-5g")
    p.add_argument("--workload", default="humaneval:8",
                   help="humaneval[:N] or PATH.jsonl[:N]; its tuning split is used")  # fmt: skip
    p.add_argument("--budget", type=int, default=16, help="trials (default 16)")
    p.add_argument("--draft", default=models.DEFAULT_DRAFT)
    p.add_argument("--target", default=models.DEFAULT_TARGET)
    p.add_argument("--cloud", metavar="HOST:PORT",
                   help="tune against this running cloud instead of starting one")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE",
                   help="thresholds file (default $PIPESD_HOME/thresholds.json)")  # fmt: skip


def _add_bench(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pipesd.bench import BENCH_SCENARIOS

    scen = ", ".join(f"{k} ({v.description})" for k, v in BENCH_SCENARIOS.items())
    p = sub.add_parser(
        "bench",
        help="compare policies across scenarios and workloads (time, energy, plots)",
        description="Run every (policy, scenario, prompt) through the real split system: a "
        "cloud process with the target on core 1, the link emulator, and an edge process with "
        "the draft on core 0 (CPU-limited with cgroup v1 in s2, s3). Finished runs are kept "
        "in OUT/results.jsonl, so an interrupted bench resumes; writes results.json, "
        "results.md and PNG plots. Scenarios: " + scen + ".",
    )
    p.add_argument(
        "--policies",
        default="all",
        help="comma-separated policies, or all (default): " + ", ".join(POLICIES),
    )
    p.add_argument(
        "--scenarios",
        default="all",
        help="comma-separated scenarios, or all (default): " + ", ".join(BENCH_SCENARIOS),
    )
    p.add_argument(
        "--workload",
        action="append",
        metavar="NAME[:N]",
        help="humaneval[:N], gsm8k[:N] or PATH.jsonl[:N] (objects with a 'prompt' "
        "field); the first N prompts of its report split; repeat or comma-separate "
        "for several (default humaneval:2)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="runs per (policy, scenario, prompt)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--thresholds",
        metavar="FILE",
        help="PipeSD thresholds (default: the tuned file if any, else built-in)",
    )
    p.add_argument("--draft", default=models.DEFAULT_DRAFT)
    p.add_argument("--target", default=models.DEFAULT_TARGET)
    p.add_argument("--target-backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the reports from OUT/results.jsonl without running anything",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipesd import bench

    policies = bench.parse_list(args.policies, list(POLICIES), "policies")
    scenarios = bench.parse_list(args.scenarios, list(bench.BENCH_SCENARIOS), "scenarios")
    specs = [w.strip() for arg in (args.workload or ["humaneval:2"]) for w in arg.split(",")
             if w.strip()]  # fmt: skip
    out = Path(args.out)
    if args.report_only:
        records = bench.load_records(out / "results.jsonl")
        if not records:
            raise bench.BenchError(f"no finished runs in {out / 'results.jsonl'}")
        result = bench.report(records, out, policies=policies, scenarios=scenarios,
                              specs=specs, max_new_tokens=args.max_new_tokens,
                              target=str(models.resolve(args.target)),
                              plots=not args.no_plots)  # fmt: skip
    else:
        result = bench.run(
            policies=policies, scenarios=scenarios, specs=specs,
            max_new_tokens=args.max_new_tokens, out=out, repeats=args.repeats,
            thresholds=Path(args.thresholds) if args.thresholds else None, ctx=args.ctx,
            draft=args.draft, target=args.target, target_backend=args.target_backend,
            device=args.device, plots=not args.no_plots,
        )  # fmt: skip
    print(f"pipesd bench: {len(result['runs'])} runs; wrote {out / 'results.md'}",
          file=sys.stderr)  # fmt: skip
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipesd.tune import tune

    result, path = tune(
        scenario=args.scenario, workload=args.workload, budget=args.budget, draft=args.draft,
        target=args.target, cloud=args.cloud, ctx=args.ctx, max_new_tokens=args.max_new_tokens,
        seed=args.seed, out=Path(args.out) if args.out else None,
    )  # fmt: skip
    th = result.thresholds
    print(
        f"R1 = {th.r1:.4f}, R2 = {th.r2:.4f}: {result.ms_per_token:.1f} ms/token on "
        f"{args.workload} (tuning split), {args.scenario}; optimiser {result.tuner_s:.2f} s of "
        f"{result.wall_s:.0f} s; written to {path} (acceptance calibration for auto: "
        f"{path.with_name('acceptance.json')})"
    )
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="list, fetch or convert the registry's models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="the registry and what is in the cache")
    f = msub.add_parser("fetch", help="download, assemble and verify models")
    f.add_argument("names", nargs="*", metavar="NAME",
                   help=f"default: {models.DEFAULT_DRAFT} {models.DEFAULT_TARGET}")  # fmt: skip
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    f.add_argument("--verify", action="store_true",
                   help="recompute the SHA-256 of cached models too")  # fmt: skip
    c = msub.add_parser(
        "convert",
        help="re-quantise a model into the cache (f16, q8_0, q4_0)",
        description="Re-quantise NAME (a registry name, a converted name or a GGUF path) with "
        "llama.cpp's quantiser into $PIPESD_HOME/models as NAME-FORMAT.gguf, with its SHA-256 "
        "in NAME-FORMAT.gguf.json; NAME-FORMAT (e.g. qwen2.5-coder-1.5b-f16) then works "
        "wherever a model name does. 1-D tensors (norms, biases) stay F32.",
    )
    c.add_argument("name", metavar="NAME", help="registry name, converted name or GGUF path")
    c.add_argument("--to", required=True, metavar="FORMAT", help="f16, q8_0 or q4_0")
    c.add_argument("--force", action="store_true", help="convert again even if converted")
    c.add_argument("--threads", type=int, default=2, help="quantiser threads (default 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipesd", description="Cloud-edge speculative decoding with exact output."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_cloud(sub)
    link.add_parser(sub)
    _add_tune(sub)
    _add_bench(sub)
    _add_models(sub)
    return parser


def cmd_models(args: argparse.Namespace) -> int:
    if args.models_cmd == "convert":
        from pipesd import convert

        res = convert.convert(args.name, args.to, force=args.force, threads=args.threads,
                              verbose=args.debug)  # fmt: skip
        m = res.model
        if res.existed:
            print(f"{m.name}: {m.path} (already converted; --force converts again)")
        else:
            print(f"{m.name}: {m.path} ({m.size / 2**20:.0f} MiB, {m.format}, from {m.source}, "
                  f"{res.seconds:.1f} s; sha256 {m.sha256})")  # fmt: skip
        return 0
    if args.models_cmd == "list":
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"models (cache: {models.pipesd_home() / 'models'})")
        for col in ("name", "role", "size", "cached", "description"):
            table.add_column(col)
        for spec in models.REGISTRY.values():
            table.add_row(
                spec.name,
                spec.role,
                f"{spec.size / 2**20:.0f} MiB",
                "yes" if models.is_fetched(spec) else "no",
                spec.description,
            )
        from pipesd import convert

        for conv in convert.converted_models():
            table.add_row(
                conv.name,
                "converted",
                f"{conv.size / 2**20:.0f} MiB",
                "yes" if conv.complete else "incomplete",
                f"{conv.source} re-quantised to {conv.format} (`models convert`)",
            )
        Console().print(table)
        return 0
    names = args.names or [models.DEFAULT_DRAFT, models.DEFAULT_TARGET]
    for name in names:
        if name not in models.REGISTRY:
            raise models.ModelError(
                f"unknown model {name!r}; known: {', '.join(sorted(models.REGISTRY))}"
            )
    for name in names:
        cached = models.is_fetched(models.REGISTRY[name])
        path = models.fetch(name, force=args.force)
        if cached and not args.force and args.verify and not models.verify(name):
            raise models.ModelError(
                f"cached {name} fails its checksum; run `pipesd models fetch --force {name}`"
            )
        print(f"{name}: {path}" + (" (cached)" if cached and not args.force else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipesd.api import Generator

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.cloud is not None and args.target is not None:
        raise ValueError("--target is chosen by the cloud server (`pipesd cloud --target`)")
    if args.cloud is None and args.auth_token_file is not None:
        raise ValueError("--auth-token-file is for --cloud")
    token = read_token_file(args.auth_token_file) if args.auth_token_file else ""
    gen = Generator(
        draft=args.draft,
        target=args.target or models.DEFAULT_TARGET,
        cloud=args.cloud,
        auth_token=token,
        reconnect_timeout=args.reconnect_timeout,
        target_backend=args.target_backend,
        device=args.device,
        policy=args.policy,
        draft_len=args.draft_len,
        thresholds=args.thresholds,
        retune_drift=args.retune_drift,
        n_ctx=args.ctx,
        draft_threads=args.draft_threads,
        target_threads=args.target_threads,
    )
    with gen:
        stream = gen.stream(
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        for event in stream:
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        result = stream.result
    if args.json:
        stats = result.stats.to_dict()
        stats["target_backend"] = gen.target_backend
        if args.policy.startswith("pipesd"):
            stats["thresholds"] = gen.thresholds.to_dict()
            if gen.retuner is not None:
                stats["retunes"] = gen.retuner.retunes
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": stats}))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()  # the text ends before the statistics line on a shared terminal
        backend = f", target on {gen.target_backend}" if gen.target_backend else ""
        print(result.stats.summary() + backend, file=sys.stderr)
    return 0


def cmd_cloud(args: argparse.Namespace) -> int:
    import logging

    from pipesd.cloud.server import CloudServer, serve_forever

    # The log goes to a duplicate of descriptor 2: llama.cpp's loaders point descriptor 2 at
    # /dev/null while a target context opens (on another thread), and the server's lines
    # written meanwhile must not vanish with their output.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="pipesd cloud: %(message)s",
        stream=open(os.dup(2), "w", buffering=1, errors="backslashreplace"),  # noqa: SIM115
    )
    token = read_token_file(args.auth_token_file) if args.auth_token_file else None
    server = CloudServer(
        args.target,
        backend=args.target_backend,
        device=args.device,
        n_ctx=args.ctx,
        threads=args.target_threads,
        listen=args.listen,
        auth_token=token,
        max_sessions=args.max_sessions,
        calibrate=not args.no_calibrate,
        limits=ServerLimits(
            max_window=args.max_window,
            max_dist=args.max_dist,
            hello_timeout=args.hello_timeout,
            idle_timeout=args.idle_timeout,
            max_pending=args.max_pending,
            memory=args.memory_budget * MiB,
        ),  # fmt: skip
    )
    return serve_forever(server)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "models":
            return cmd_models(args)
        if args.command == "cloud":
            return cmd_cloud(args)
        if args.command == "link":
            return link.run(args)
        if args.command == "tune":
            return cmd_tune(args)
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_generate(args)
    except (PipesdError, ValueError) as e:
        if args.debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pipesd: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipesd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
