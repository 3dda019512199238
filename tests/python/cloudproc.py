"""A real ``pipesd cloud`` process for tests: started, waited for, killed, read back."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipesd.tune import stop_process

PIPESD = [sys.executable, "-m", "pipesd.cli"]
READY = re.compile(r"listening on (\S+):(\d+) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CloudProcess:
    """``pipesd cloud --target T --listen 127.0.0.1:PORT ...`` with stderr kept in a file."""

    def __init__(self, target: Path | str, log_path: Path, *, port: int = 0,
                 args: tuple[str, ...] = (), timeout: float = 120.0,
                 max_fds: int | None = None) -> None:  # fmt: skip
        """``max_fds``: the child's descriptor limit (RLIMIT_NOFILE), as ``ulimit -n`` sets."""
        self.target, self.log_path, self.args = str(target), log_path, args
        self.max_fds = max_fds
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.start(timeout)

    def start(self, timeout: float = 120.0) -> None:
        """Starts the process and waits for its "listening" line (learning the port)."""
        before = len(READY.findall(self.log())) if self.log_path.exists() else 0
        cmd = [*PIPESD, "cloud", "--target", self.target, "--listen",
               f"127.0.0.1:{self.port}", "-v", *self.args]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         preexec_fn=self._limits)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = READY.findall(self.log())
            if len(found) > before:
                self.port = int(found[-1][1])
                return
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"pipesd cloud exited with {code}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"pipesd cloud did not start within {timeout} s")

    def _limits(self) -> None:
        if self.max_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        """The process's resident memory now (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the cloud dies without a word, as a crashed machine would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        return stop_process(self.proc)

    def __enter__(self) -> CloudProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["PIPESD", "CloudProcess", "free_port"]
