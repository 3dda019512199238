"""Soak: up to 16 edge sessions against one `pipesd cloud`, through the link emulator, with cuts.

One `pipesd cloud -v` process (the target, llama.cpp, 1 thread, `--max-sessions 20 --ctx
1024`) runs pinned to core 1. The link emulator (`pipesd.link.Link`, scenario `lan` by default)
runs in a child process of its own in front of it, pinned to core 0: `pipesd link` stops only on
SIGINT or SIGTERM and cannot be told to drop its connections, so this script starts the same
emulator in a child that calls `Link.cut()` when asked on its stdin. This process, on core 0
too, runs the edge sessions: each request is one thread with its own
`pipesd.Generator(draft=..., cloud=LINK, policy=vanilla)`, made for that request and closed
after it, so every request opens and ends a cloud session. At most --sessions (16) run at once;
the rest queue in arrival order.

Arrivals: the trace's requests (gsm8k_arrivals.jsonl: request_id, arrival_ms, prompt_tokens,
target_tokens) keep their order and spacing, stretched by duration / (span + mean gap) so the
trace, taken as one period, fills --duration (400 requests 25 ms apart over 10 s become one
every 1.5 s over 600 s, x60). The first --sessions requests are released together at 0 s, so
the warm-up serves that many sessions at once and the cloud loads its target contexts (one per
concurrent session, kept for reuse). Request i asks GSM8K problem i (gsm8k_test.jsonl beside
the trace, else the copy shipped in pipesd) as "Question: ...\\nAnswer: Let's think step by
step." for new tokens mapped linearly from target_tokens onto --min/--max-new-tokens (32..64),
greedy.

Faults: --cuts times (default 3), at duration * k / (cuts + 1), every connection through the
link is reset at both ends (a cut that finds no connection waits up to 10 s for one); the edges
must reconnect and resume. Reconnects are counted from the Generator stats, and cross-checked
with the connections the link accepted.

Resources, sampled every 10 s: the cloud's VmRSS (with RssAnon and RssFile) from
/proc/PID/status, its open descriptors (/proc/PID/fd), its live sessions (TCP connections on
its port whose sockets it holds, from /proc/PID/net/tcp) and its target contexts (mappings of
the model file in /proc/PID/maps: each context loads the model once); descriptors and RSS of
the link and of this process too. Warm-up is the first min(60 s, 10% of --duration); it ends
with a drain (no new session starts until edge and cloud have been idle 2 s), then the
reference idle sample. After --duration no new session starts (those still queued are
counted, not run), those in flight finish, and the end idle sample is taken.

Verdict, on the cloud: (1) end idle against reference idle: RSS within +--rss-tol-mib (64 MiB)
plus, for each target context loaded meanwhile, the RSS one context cost in the warm-up;
descriptors within +--fd-tol (8); (2) every later sample against the first one after warm-up
with the same session and context counts, same tolerances (RSS depends on both: a context's
pages count once it has run); (3) no more target contexts than --max-sessions. Any session
error, or a session unfinished --drain-timeout after the end, fails the run too.

Writes OUT/results.json (every session, sample and cut), OUT/cloud.log, OUT/link.log and,
unless --no-write, the "soak" block of bench/RESULTS.md. Exit status 1 if the run failed.

    .venv/bin/python bench/bench_soak.py                      # 600 s, 3 cuts
    .venv/bin/python bench/bench_soak.py --duration 90 --cuts 1 --no-write
    .venv/bin/python bench/bench_soak.py --scenario paper-5g --policy auto --out bench/out/soak-5g
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from benchlib import HERE, commit_label, machine, pin, write_block

from pipesd import Generator, models
from pipesd.link import SCENARIOS, Link
from pipesd.netaddr import parse_hostport
from pipesd.policies import POLICIES
from pipesd.tune import stop_process
from pipesd.workloads import gsm8k_prompts, jsonl_prompts

DATASETS = HERE.parent.parent / "shared" / "datasets"
PROMPT_FORMAT = "Question: {q}\nAnswer: Let's think step by step."
CLOUD_CORE, EDGE_CORE = 1, 0
SAMPLE_S = 10.0
SETTLE_S = 2.0  # after the last session ends, before an idle sample
CUT_WAIT_S = 10.0
READY = re.compile(r"listening on (\S+):(\d+) ")
# The cloud's `-v` log: a session ended with an error code (BUSY, TIMEOUT, ...).
ERROR_CODE = re.compile(r"session \d+ from \S+: ([A-Z][A-Z_]{2,}): (.*)")


class StdStreams:
    """This process's stdout and stderr, kept while sessions load their models.

    A llama.cpp model load silences fds 1 and 2 (and ``sys.stdout``, ``sys.stderr``) and puts
    back what it found; loads in several threads at once can put back the silenced ones, so
    progress goes to copies made before any session starts, and ``restore`` puts them back.
    """

    def __init__(self) -> None:
        self._fds = (os.dup(1), os.dup(2))
        self.out = open(os.dup(1), "w", buffering=1)  # noqa: SIM115 (lives as long as the run)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def restore(self) -> None:
        os.dup2(self._fds[0], 1)
        os.dup2(self._fds[1], 2)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


STD = StdStreams()


# --------------------------------------------------------------------------- processes
def pinned(cmd: list[str], core: int) -> list[str]:
    """``cmd`` under ``taskset -c core`` where that works (the affinity holds from exec on)."""
    if shutil.which("taskset") and core < (os.cpu_count() or 1):
        return ["taskset", "-c", str(core), *cmd]
    return cmd


def proc_usage(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous and file-backed parts in MiB, and open descriptors."""
    kib = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                kib[key] = int(value.split()[0])
    return {
        "rss_mib": round(kib.get("VmRSS", 0) / 1024.0, 1),
        "anon_mib": round(kib.get("RssAnon", 0) / 1024.0, 1),
        "file_mib": round(kib.get("RssFile", 0) / 1024.0, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by what they are: socket, pipe, anon_inode:[eventfd], a file path."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[re.sub(r":\[\d+\]$", "", target)] += 1
    return dict(sorted(kinds.items()))


def held_connections(pid: int, port: int) -> int:
    """TCP connections on ``port`` whose socket process ``pid`` still holds open: its sessions,
    from the kernel's tables (those ended but not yet closed by the cloud count as live)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            col = row.split()
            listening = col[3] == "0A"
            if int(col[1].rsplit(":", 1)[1], 16) == port and not listening and col[9] in inodes:
                n += 1
    return n


class CloudLog:
    """What the cloud's log says about failures: sessions ended with an error code, internal
    errors. (Not a session count: lines the cloud logs while it loads a model are lost.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.failures: list[str] = []  # e.g. "BUSY: the cloud serves 20 sessions already"
        self.internal: list[str] = []  # tracebacks and internal errors

    def update(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        raw = (self._partial + data).split(b"\n")
        self._partial = raw.pop()  # a line still being written
        for line in (b.decode(errors="replace") for b in raw):
            if m := ERROR_CODE.search(line):
                self.failures.append(f"{m.group(1)}: {m.group(2)}")
            if "internal error" in line or line.startswith("Traceback"):
                self.internal.append(line.strip())


class CloudChild:
    """``pipesd cloud -v`` on 127.0.0.1 (a free port) with its log in a file."""

    def __init__(self, target: str, log_path: Path, *, args: list[str], timeout: float = 300.0):
        self.log_path = log_path
        cmd = [sys.executable, "-m", "pipesd.cli", "cloud", "--target", target,
               "--target-backend", "llama.cpp", "--listen", "127.0.0.1:0", "-v", *args]  # fmt: skip
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(pinned(cmd, CLOUD_CORE), stdout=subprocess.DEVNULL,
                                         stderr=log)  # fmt: skip
        if pinned([], CLOUD_CORE) == []:
            pin(CLOUD_CORE, self.proc.pid)
        deadline = time.monotonic() + timeout
        while not (m := READY.search(log_path.read_text(errors="replace"))):
            if self.proc.poll() is not None:
                raise RuntimeError(f"pipesd cloud exited with {self.proc.returncode}:\n"
                                   + log_path.read_text(errors="replace")[-2000:])  # fmt: skip
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pipesd cloud did not start within {timeout:g} s")
            time.sleep(0.05)
        self.port = int(m.group(2))
        self.address = f"127.0.0.1:{self.port}"
        self.log = CloudLog(log_path)
        self.target = os.path.realpath(target)  # as /proc/PID/maps names it
        self.sessions = 0

    def poll(self) -> int:
        """The sessions live now."""
        self.sessions = held_connections(self.proc.pid, self.port)
        return self.sessions

    def contexts(self) -> int:
        """Target models loaded: each pooled target context maps the model file once."""
        with open(f"/proc/{self.proc.pid}/maps") as f:
            return sum(1 for line in f if line.rstrip().endswith(self.target))

    def stop(self) -> int | None:
        return stop_process(self.proc)


class LinkChild:
    """The link emulator in a child process; ``cut`` and ``stats`` are asked on its stdin."""

    def __init__(self, upstream: str, scenario: str, log_path: Path) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-link", upstream,
               "--scenario", scenario]  # fmt: skip
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (kept for the child's life)
        self.proc = subprocess.Popen(pinned(cmd, EDGE_CORE), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     bufsize=1)  # fmt: skip
        if pinned([], EDGE_CORE) == []:
            pin(EDGE_CORE, self.proc.pid)
        first = self._reply()
        self.address = f"127.0.0.1:{first['port']}"
        self.final: dict[str, Any] = {}

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the link process ended (status {self.proc.poll()})")
        return dict(json.loads(line))

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.final = self.ask("quit")
                self.proc.wait(timeout=30)
            except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def serve_link(upstream: str, scenario: str) -> int:
    """The link child: one JSON line per command (``cut``, ``stats``, ``quit``) on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends it with "quit"
    link = Link(parse_hostport(upstream, what="--serve-link"), scenario).start()
    print(json.dumps({"port": link.port}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "cut":
            before = link.stats()["active"]
            t0 = time.perf_counter()
            link.cut()
            reply = {"connections": before, "cut_s": time.perf_counter() - t0}
        elif command == "quit":
            break
        else:
            reply = link.stats()
        print(json.dumps(reply), flush=True)
    stats = link.stats()
    link.close()
    print(json.dumps(stats), flush=True)
    return 0


# ----------------------------------------------------------------------------- workload
def load_requests(trace: Path, n: int | None, duration_s: float, burst: int,
                  min_new: int, max_new: int) -> tuple[list[dict[str, Any]], float]:  # fmt: skip
    """The trace's requests with their due times (s) on this run's clock, and the stretch."""
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: float(r["arrival_ms"]))
    rows = rows[:n] if n else rows
    if not rows:
        raise SystemExit(f"no requests in {trace}")
    t_first, t_last = float(rows[0]["arrival_ms"]), float(rows[-1]["arrival_ms"])
    gap = (t_last - t_first) / (len(rows) - 1) if len(rows) > 1 else 1000.0
    stretch = duration_s * 1000.0 / ((t_last - t_first + gap) or 1.0)
    targets = [int(r.get("target_tokens", max_new)) for r in rows]
    lo, hi = min(targets), max(targets)
    beside = trace.parent / "gsm8k_test.jsonl"
    prompts = jsonl_prompts(beside) if beside.is_file() else gsm8k_prompts()
    out = []
    for i, r in enumerate(rows):
        due = (float(r["arrival_ms"]) - t_first) * stretch / 1000.0
        frac = (targets[i] - lo) / (hi - lo) if hi > lo else 1.0
        out.append({
            "id": r.get("request_id", f"r{i}"),
            "due_s": 0.0 if i < burst else due,
            "prompt": PROMPT_FORMAT.format(q=prompts[i % len(prompts)]),
            "max_new_tokens": round(min_new + frac * (max_new - min_new)),
        })  # fmt: skip
    return out, stretch


# -------------------------------------------------------------------------------- soak
class Soak:
    """The queue of requests, the session threads, and what each session did."""

    def __init__(self, args: argparse.Namespace, draft: str, cloud_address: str) -> None:
        self.args = args
        self.draft = draft
        self.address = cloud_address
        self.cond = threading.Condition()
        self.ready: collections.deque[dict[str, Any]] = collections.deque()
        self.admitting = True
        self.closing = False
        self.active = 0  # sessions taken off the queue and not finished
        self.generating = 0  # of those, inside generate()
        self.records: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.threads = [
            threading.Thread(target=self._worker, name=f"soak-edge-{i}", daemon=True)
            for i in range(args.sessions)
        ]

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        for t in self.threads:
            t.start()

    def release(self, req: dict[str, Any]) -> None:
        with self.cond:
            self.ready.append(req)
            self.cond.notify()

    def set_admitting(self, on: bool) -> None:
        with self.cond:
            self.admitting = on
            self.cond.notify_all()

    def close(self) -> list[dict[str, Any]]:
        """No more sessions; returns the requests still queued."""
        with self.cond:
            self.closing = True
            left = list(self.ready)
            self.ready.clear()
            self.cond.notify_all()
        return left

    def _worker(self) -> None:
        while True:
            with self.cond:
                while not self.closing and not (self.admitting and self.ready):
                    self.cond.wait()
                if self.closing:
                    return
                req = self.ready.popleft()
                self.active += 1
            try:
                rec = self._session(req)
            finally:
                with self.cond:
                    self.active -= 1
                    self.cond.notify_all()
            with self.cond:
                self.records.append(rec)

    def _session(self, req: dict[str, Any]) -> dict[str, Any]:
        a = self.args
        rec: dict[str, Any] = {"id": req["id"], "due_s": req["due_s"], "start_s": self.now(),
                               "max_new_tokens": req["max_new_tokens"]}  # fmt: skip
        gen: Generator | None = None
        try:
            gen = Generator(draft=self.draft, cloud=self.address, policy=a.policy, n_ctx=a.ctx,
                            reconnect_timeout=a.reconnect_timeout)  # fmt: skip
            rec["gen_s"] = self.now()
            with self.cond:
                self.generating += 1
            try:
                res = gen.generate(req["prompt"], max_new_tokens=req["max_new_tokens"])
            finally:
                with self.cond:
                    self.generating -= 1
            s = res.stats
            rec.update(tokens=s.new_tokens, wall_s=s.wall_s, ms_per_token=s.ms_per_token,
                       reconnects=s.reconnects, stop=s.stop_reason,
                       prompt_tokens=s.prompt_tokens)  # fmt: skip
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["error_in"] = "Generator()" if gen is None else "generate"
            rec["error_s"] = self.now()
            if gen is not None and gen.cloud is not None:
                rec["reconnects"] = gen.cloud.reconnects
        finally:
            if gen is not None:
                try:
                    gen.close()
                except Exception as e:
                    rec.setdefault("error", f"close: {type(e).__name__}: {e}")
                    rec.setdefault("error_in", "close")
        rec["end_s"] = self.now()
        return rec


def sample(soak: Soak, cloud: CloudChild, link: LinkChild, phase: str) -> dict[str, Any]:
    cloud.log.update()
    c, li, e = (proc_usage(pid) for pid in (cloud.proc.pid, link.proc.pid, os.getpid()))
    with soak.cond:
        edge, queued, done = soak.active, len(soak.ready), len(soak.records)
    return {
        "t_s": round(soak.now(), 1), "phase": phase,
        "cloud_sessions": cloud.poll(), "contexts": cloud.contexts(),
        "edge_sessions": edge, "queued": queued, "done": done,
        "link_connections": link.ask("stats")["active"],
        "cloud_rss_mib": c["rss_mib"], "cloud_anon_mib": c["anon_mib"],
        "cloud_file_mib": c["file_mib"], "cloud_fds": c["fds"],
        "link_rss_mib": li["rss_mib"], "link_fds": li["fds"],
        "edge_rss_mib": e["rss_mib"], "edge_anon_mib": e["anon_mib"], "edge_fds": e["fds"],
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, drain to idle (reference sample), the run, drain to idle (end sample).

    Phases: ``warm-up`` until warmup_s, ``drain`` (no new session starts) until the edge and
    the cloud have been idle for SETTLE_S, ``run`` until --duration, ``end-drain`` likewise; a
    drain gives up after --drain-timeout and samples whatever state it reached.
    """
    pin(EDGE_CORE)
    args.out.mkdir(parents=True, exist_ok=True)
    target = str(models.resolve(args.target))
    draft = str(models.resolve(args.draft))
    warmup_s = min(60.0, 0.1 * args.duration)
    requests, stretch = load_requests(args.trace, args.requests, args.duration, args.sessions,
                                      args.min_new_tokens, args.max_new_tokens)  # fmt: skip
    cut_at = [args.duration * k / (args.cuts + 1) for k in range(1, args.cuts + 1)]
    cloud_args = ["--max-sessions", str(args.max_sessions), "--ctx", str(args.ctx)]
    samples: list[dict[str, Any]] = []
    cuts: list[dict[str, Any]] = []
    drains: list[dict[str, Any]] = []
    not_started: list[dict[str, Any]] = []
    cloud = CloudChild(target, args.out / "cloud.log", args=cloud_args)
    link: LinkChild | None = None
    try:
        link = LinkChild(cloud.address, args.scenario, args.out / "link.log")
        soak = Soak(args, draft, link.address)
        samples.append(sample(soak, cloud, link, "cold"))
        soak.start()
        pending = collections.deque(requests)
        phase, next_sample = "warm-up", SAMPLE_S
        drain_start, quiet_since = 0.0, None
        STD.say(f"soak: {len(requests)} requests over {args.duration:g} s (x{stretch:g}), "
                f"cloud {cloud.address}, link {link.address}")  # fmt: skip
        while True:
            now = soak.now()
            cloud.poll()
            if phase != "end-drain":
                while pending and pending[0]["due_s"] <= now:
                    soak.release(pending.popleft())
            if phase == "warm-up" and now >= warmup_s:
                phase, drain_start, quiet_since = "drain", now, None
                soak.set_admitting(False)
            if phase != "end-drain" and now >= args.duration:
                not_started = soak.close() + list(pending)
                pending.clear()
                phase, drain_start, quiet_since = "end-drain", now, None
            if phase in ("drain", "end-drain"):
                with soak.cond:
                    idle = soak.active == 0 and cloud.sessions == 0
                quiet_since = (quiet_since or now) if idle else None
                settled = quiet_since is not None and now - quiet_since >= SETTLE_S
                timed_out = now - drain_start >= args.drain_timeout
                if settled or timed_out:
                    drains.append({"phase": phase, "from_s": round(drain_start, 1),
                                   "to_s": round(now, 1), "timed_out": not settled})  # fmt: skip
                    if phase == "end-drain":
                        samples.append(sample(soak, cloud, link, "idle-end"))
                        samples[-1]["cloud_fd_kinds"] = fd_kinds(cloud.proc.pid)
                        break
                    samples.append(sample(soak, cloud, link, "idle-ref"))
                    samples[-1]["cloud_fd_kinds"] = fd_kinds(cloud.proc.pid)
                    phase = "run"
                    soak.set_admitting(True)
            # A cut finding no connection (every session still loading its draft) waits for
            # one, CUT_WAIT_S at most.
            if (
                cut_at
                and now >= cut_at[0]
                and (now >= cut_at[0] + CUT_WAIT_S or link.ask("stats")["active"] > 0)
            ):
                due = cut_at.pop(0)
                with soak.cond:
                    generating = soak.generating
                reply = link.ask("cut")
                cuts.append({"t_s": round(now, 1), "late_s": round(now - due, 1),
                             "edge_generating": generating, **reply})  # fmt: skip
                STD.say(f"soak: cut {reply['connections']} connections at {now:.0f} s")
            if now >= next_sample:
                samples.append(sample(soak, cloud, link, phase))
                next_sample += SAMPLE_S
                s = samples[-1]
                STD.say(f"soak: {s['t_s']:5.0f} s  {phase:9s} cloud {s['cloud_sessions']:2d} "
                        f"sessions, RSS {s['cloud_rss_mib']:.0f} MiB, {s['cloud_fds']} fds; "
                        f"{s['done']} done, {s['queued']} queued")  # fmt: skip
            time.sleep(0.05)
        with soak.cond:
            unfinished = soak.active
            records = sorted(soak.records, key=lambda r: r["start_s"])
    finally:
        STD.restore()
        if link is not None:
            link.stop()
        cloud_status = cloud.stop()
        cloud.log.update()
    return {
        "config": {
            "duration_s": args.duration, "sessions": args.sessions, "cuts": args.cuts,
            "scenario": args.scenario, "scenario_summary": SCENARIOS[args.scenario].summary(),
            "policy": args.policy, "draft": args.draft, "target": args.target,
            "max_sessions": args.max_sessions, "ctx": args.ctx,
            "min_new_tokens": args.min_new_tokens, "max_new_tokens": args.max_new_tokens,
            "trace": str(args.trace), "requests": len(requests), "stretch": stretch,
            "warmup_s": warmup_s, "rss_tol_mib": args.rss_tol_mib, "fd_tol": args.fd_tol,
            "reconnect_timeout_s": args.reconnect_timeout,
        },
        "records": records, "not_started": len(not_started), "unfinished": unfinished,
        "samples": samples, "cuts": cuts, "drains": drains,
        "link_final": link.final if link else {},
        "cloud": {"exit_status": cloud_status,
                  "failures": cloud.log.failures, "internal_errors": cloud.log.internal},
    }  # fmt: skip


# ----------------------------------------------------------------------------- verdict
def judge(r: dict[str, Any]) -> dict[str, Any]:
    """The tolerance verdict on the cloud's RSS and descriptors, and the session summary."""
    c = r["config"]
    samples = r["samples"]
    after = [s for s in samples if s["phase"] in ("idle-ref", "run", "end-drain", "idle-end")]
    cold = samples[0]
    ref = next((s for s in samples if s["phase"] == "idle-ref"), None)
    end = samples[-1]
    baseline: dict[tuple[int, int], dict[str, Any]] = {}
    worst_rss, worst_fds = 0.0, 0
    for s in after:
        base = baseline.setdefault((s["cloud_sessions"], s["contexts"]), s)
        s["d_rss_mib"] = round(s["cloud_rss_mib"] - base["cloud_rss_mib"], 1)
        s["d_fds"] = s["cloud_fds"] - base["cloud_fds"]
        worst_rss, worst_fds = max(worst_rss, s["d_rss_mib"]), max(worst_fds, s["d_fds"])
    v: dict[str, Any] = {"same_count_rss_mib": worst_rss, "same_count_fds": worst_fds}
    if after:
        first = after[0]
        v["raw_rss_mib"] = max(s["cloud_rss_mib"] for s in after) - first["cloud_rss_mib"]
        v["raw_fds"] = max(s["cloud_fds"] for s in after) - first["cloud_fds"]
    tol_rss, tol_fds = c["rss_tol_mib"], c["fd_tol"]
    reasons = []
    if worst_rss > tol_rss or worst_fds > tol_fds:
        reasons.append(f"cloud grew {worst_rss:+.1f} MiB, {worst_fds:+d} fds at the same "
                       "session count and target contexts")  # fmt: skip
    if ref is not None and end["phase"] == "idle-end":
        per_ctx = (ref["cloud_rss_mib"] - cold["cloud_rss_mib"]) / max(1, ref["contexts"] - 1)
        allowance = max(0, end["contexts"] - ref["contexts"]) * max(0.0, per_ctx)
        v.update(
            idle_ref=ref, idle_end=end, mib_per_context=round(per_ctx, 1),
            context_allowance_mib=round(allowance, 1),
            idle_rss_mib=round(end["cloud_rss_mib"] - ref["cloud_rss_mib"], 1),
            idle_fds=end["cloud_fds"] - ref["cloud_fds"],
            idle_link_fds=end["link_fds"] - ref["link_fds"],
            idle_edge_rss_mib=round(end["edge_rss_mib"] - ref["edge_rss_mib"], 1),
            idle_edge_fds=end["edge_fds"] - ref["edge_fds"],
        )  # fmt: skip
        if v["idle_rss_mib"] > tol_rss + allowance or v["idle_fds"] > tol_fds:
            reasons.append(f"cloud idle state grew {v['idle_rss_mib']:+.1f} MiB (allowed "
                           f"{tol_rss + allowance:.0f}), {v['idle_fds']:+d} fds")  # fmt: skip
    else:
        reasons.append("no idle reference sample: the warm-up drain did not end in time")
    for d in r["drains"]:
        held = ref if d["phase"] == "drain" else end
        if d["timed_out"] and held is not None and held["cloud_sessions"]:
            reasons.append(f"{d['phase']}: the cloud still held {held['cloud_sessions']} "
                           f"connections {d['to_s'] - d['from_s']:.0f} s later")  # fmt: skip
    most = max((s["contexts"] for s in samples), default=0)
    v["most_contexts"] = most
    if most > c["max_sessions"]:
        reasons.append(f"the cloud held {most} target contexts, more than --max-sessions "
                       f"({c['max_sessions']}) sessions can use")  # fmt: skip
    v["resources_ok"] = not reasons
    recs = r["records"]
    done = [x for x in recs if "error" not in x]
    errors = [x for x in recs if "error" in x]
    ms = sorted(x["ms_per_token"] for x in done if x.get("tokens"))
    waits = sorted(x["start_s"] - x["due_s"] for x in recs)
    setups = sorted(x["gen_s"] - x["start_s"] for x in recs if "gen_s" in x)
    v.update(
        served=len(done), errors=len(errors), tokens=sum(x.get("tokens", 0) for x in done),
        reconnects=sum(x.get("reconnects", 0) for x in recs),
        connections_cut=sum(x["connections"] for x in r["cuts"]),
        # Every Generator() connects once; any later connection through the link reconnects
        # (including one made silently when a sequence starts on a connection already lost).
        link_reconnections=r["link_final"].get("connections", 0) - len(recs),
        ms_per_token_median=statistics.median(ms) if ms else None,
        ms_per_token_p90=ms[int(0.9 * (len(ms) - 1))] if ms else None,
        wait_median_s=statistics.median(waits) if waits else None,
        wait_max_s=waits[-1] if waits else None,
        setup_median_s=statistics.median(setups) if setups else None,
        setup_max_s=setups[-1] if setups else None,
        peak_edge_sessions=max((s["edge_sessions"] for s in samples), default=0),
        peak_cloud_sessions=max((s["cloud_sessions"] for s in samples), default=0),
    )  # fmt: skip
    if errors:
        reasons.append(f"{len(errors)} session error(s)")
    if r["unfinished"]:
        reasons.append(f"{r['unfinished']} session(s) unfinished after --drain-timeout")
    v["reasons"] = reasons
    v["passed"] = not reasons
    return v


def fd_change(ref: dict[str, Any], end: dict[str, Any]) -> str:
    """``"; socket +2"``: which kinds of descriptor the idle cloud holds more or fewer of."""
    a, b = ref.get("cloud_fd_kinds", {}), end.get("cloud_fd_kinds", {})
    moved = [(k, b.get(k, 0) - a.get(k, 0)) for k in sorted(set(a) | set(b))]
    return "".join(f"; {k} {d:+d}" for k, d in moved if d)


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def markdown(r: dict[str, Any], v: dict[str, Any], m: dict[str, Any], argv: list[str]) -> str:
    c = r["config"]
    cuts = ", ".join(f"{x['t_s']:.0f} s" for x in r["cuts"]) or "none"
    drains = ", ".join(
        f"{d['phase']} {d['from_s']:.0f}-{d['to_s']:.0f} s"
        + (" (gave up)" if d["timed_out"] else "")
        for d in r["drains"]
    )
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; commit "
        f"{commit_label(m)}, {m['date']}. `pipesd cloud` (target {c['target']}, llama.cpp, "
        f"1 thread, `--max-sessions {c['max_sessions']} --ctx {c['ctx']}`) pinned to core 1; "
        f"the link emulator (`pipesd.link.Link`, scenario `{c['scenario']}`: "
        f"{c['scenario_summary']}) in its own process and the edge sessions (this process: one "
        f"thread and one `pipesd.Generator(cloud=...)` per request, draft {c['draft']}, policy "
        f"`{c['policy']}`) pinned to core 0. Command: `.venv/bin/python bench/bench_soak.py "
        + " ".join(argv)
        + "`.",
        "",
        f"Sizes: {c['requests']} requests of `{Path(c['trace']).name}` stretched "
        f"x{c['stretch']:g} onto {c['duration_s']:g} s (the first {c['sessions']} released "
        f"together at 0 s), at most {c['sessions']} sessions at once, the rest queued; GSM8K "
        f"problems as `Question: ... Answer: Let's think step by step.`, "
        f"{c['min_new_tokens']}-{c['max_new_tokens']} new tokens each (from the trace's "
        f"target_tokens), greedy. Every connection through the link cut at {cuts}. Warm-up: "
        f"the first {c['warmup_s']:g} s, ended by draining to idle (the reference idle "
        f"sample); drains: {drains or 'none'}. Cloud RSS (VmRSS) and descriptors sampled "
        "every 10 s; the verdict is on the cloud, the link and edge figures are for "
        "information.",
        "",
        "| | |",
        "|---|---:|",
        f"| sessions served | {v['served']} of {len(r['records'])} started "
        f"({r['not_started']} still queued at the end, {r['unfinished']} unfinished) |",
        f"| tokens generated | {v['tokens']} |",
        f"| session errors | {v['errors']} |",
        f"| reconnects in the Generator stats (connections cut) | {v['reconnects']} "
        f"({v['connections_cut']}) |",
        f"| connections through the link beyond one per `Generator()` | "
        f"{v['link_reconnections']} |",
        f"| ms/token per session, median (p90) | {_f(v['ms_per_token_median'])} "
        f"({_f(v['ms_per_token_p90'])}) |",
        f"| queue wait, median (max) | {_f(v['wait_median_s'])} s ({_f(v['wait_max_s'])} s) |",
        f"| `Generator()` (draft load, connection, HELLO), median (max) | "
        f"{_f(v['setup_median_s'])} s ({_f(v['setup_max_s'])} s) |",
        f"| peak sessions, edge / cloud | {v['peak_edge_sessions']} / {v['peak_cloud_sessions']} |",
    ]
    if "idle_ref" in v:
        ref, end = v["idle_ref"], v["idle_end"]
        lines += [
            f"| cloud RSS idle, after warm-up -> end | {ref['cloud_rss_mib']:.0f} -> "
            f"{end['cloud_rss_mib']:.0f} MiB ({v['idle_rss_mib']:+.1f}; target contexts "
            f"{ref['contexts']} -> {end['contexts']}, allowance "
            f"{v['context_allowance_mib']:.0f} MiB at {v['mib_per_context']:.0f} MiB each) |",
            f"| cloud fds idle, after warm-up -> end | {ref['cloud_fds']} -> {end['cloud_fds']} "
            f"({v['idle_fds']:+d}{fd_change(ref, end)}) |",
            f"| link fds / edge RSS, fds idle change | {v['idle_link_fds']:+d} / "
            f"{v['idle_edge_rss_mib']:+.1f} MiB, {v['idle_edge_fds']:+d} |",
        ]
    lines += [
        f"| cloud growth at the same session and context count | {v['same_count_rss_mib']:+.1f} "
        f"MiB, {v['same_count_fds']:+d} fds |",
        f"| cloud max deviation from the first post-warm-up sample, any count | "
        f"{v.get('raw_rss_mib', 0):+.1f} MiB, {v.get('raw_fds', 0):+d} fds |",
        f"| verdict (RSS +{c['rss_tol_mib']:g} MiB, fds +{c['fd_tol']}) | "
        f"{'PASS' if v['passed'] else 'FAIL: ' + '; '.join(v['reasons'])} |",
    ]
    errors = [x for x in r["records"] if "error" in x]
    if errors or r["cloud"]["failures"] or r["cloud"]["internal_errors"]:
        lines += ["", "Errors:", ""]
        lines += [f"- {x['id']} at {x['error_s'] if 'error_s' in x else x['end_s']:.0f} s in "
                  f"{x['error_in']}: `{x['error']}`" for x in errors]  # fmt: skip
        counts = collections.Counter(r["cloud"]["failures"])
        lines += [f"- cloud: {n} x session ended with `{msg}`" for msg, n in counts.items()]
        lines += [f"- cloud: `{line}`" for line in r["cloud"]["internal_errors"][:5]]
    lines += [
        "",
        "Samples (Δ: against the first sample after warm-up with the same cloud session count "
        "and number of target contexts):",
        "",
        "| t s | phase | cloud sessions | target contexts | edge sessions | queued | link conns | "
        "cloud RSS MiB | Δ | of it anon | cloud fds | Δ | link fds | edge RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["samples"]:
        lines.append(
            f"| {s['t_s']:.0f} | {s['phase']} | {s['cloud_sessions']} | {s['contexts']} | "
            f"{s['edge_sessions']} | {s['queued']} | {s['link_connections']} | "
            f"{s['cloud_rss_mib']:.0f} | {_f(s.get('d_rss_mib'), '{:+.0f}')} | "
            f"{s['cloud_anon_mib']:.0f} | {s['cloud_fds']} | {_f(s.get('d_fds'), '{:+d}')} | "
            f"{s['link_fds']} | "
            f"{s['edge_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    ap.add_argument("--cuts", type=int, default=3, help="cuts of every connection, evenly spaced")
    ap.add_argument("--sessions", type=int, default=16, help="edge sessions at once (default 16)")
    ap.add_argument("--scenario", choices=list(SCENARIOS), default="lan")
    ap.add_argument("--policy", choices=list(POLICIES), default="vanilla")
    ap.add_argument("--draft", default="smollm2-135m")
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--max-sessions", type=int, default=20, help="the cloud's --max-sessions")
    ap.add_argument("--ctx", type=int, default=1024, help="context of every session")
    ap.add_argument("--min-new-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--trace", type=Path, default=DATASETS / "gsm8k_arrivals.jsonl")
    ap.add_argument("--requests", type=int, default=None, help="the first N of the trace")
    ap.add_argument("--reconnect-timeout", type=float, default=30.0)
    ap.add_argument("--drain-timeout", type=float, default=180.0,
                    help="seconds the sessions in flight get after --duration")  # fmt: skip
    ap.add_argument("--rss-tol-mib", type=float, default=64.0)
    ap.add_argument("--fd-tol", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "soak")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--serve-link", metavar="UPSTREAM", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_link:
        return serve_link(args.serve_link, args.scenario)
    if not args.trace.is_file():
        ap.error(f"arrival trace not found: {args.trace}")
    if args.duration <= 0 or args.cuts < 0 or args.sessions < 1:
        ap.error("need --duration > 0, --cuts >= 0 and --sessions >= 1")
    if not 1 <= args.min_new_tokens <= args.max_new_tokens:
        ap.error("need 1 <= --min-new-tokens <= --max-new-tokens")
    info = machine()
    r = run(args)
    v = judge(r)
    r.update(machine=info, verdict=v, argv=sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    body = markdown(r, v, info, sys.argv[1:])
    print(body)
    if not args.no_write:
        write_block("soak", "## Soak: 16 sessions against one cloud", body)
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
