"""``pipesd models convert``: re-quantise a GGUF model into the cache with llama.cpp.

A converted model is named ``<source>-<format>`` (``qwen2.5-coder-1.5b-f16``), lives next to the
fetched models in ``$PIPESD_HOME/models`` and has a record ``<name>.gguf.json`` beside it with
its size and SHA-256. The name then works wherever a model name does.

llama.cpp's own quantiser (``llama_model_quantize`` through llama-cpp-python) runs in a child
process: its per-tensor log lines drive a progress bar, a failure is reported as one line, and an
interrupt can stop it at once. The result is written to a temporary file in the cache directory
and renamed into place only when it is complete.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipesd import models
from pipesd.errors import ModelError

# --to value -> llama.cpp's name for the file type (LLAMA_FTYPE_MOSTLY_<name>).
FORMATS: dict[str, str] = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_FAILED = "failed to quantize: "
_RECORD_VERSION = 1


@dataclass(frozen=True)
class Converted:
    """A converted model in the cache, as its record describes it."""

    name: str
    path: Path
    format: str
    source: str  # the registry name or the path it was converted from
    size: int
    sha256: str

    @property
    def complete(self) -> bool:
        """The file is there with the recorded size (the checksum is not recomputed)."""
        return self.path.is_file() and self.path.stat().st_size == self.size


@dataclass(frozen=True)
class ConvertResult:
    model: Converted
    existed: bool  # already converted; nothing was done
    seconds: float


def record_path(path: Path) -> Path:
    """The record beside a converted model: ``NAME.gguf.json``."""
    return path.with_name(path.name + ".json")


def split_name(name: str) -> tuple[str, str] | None:
    """``"smollm2-135m-q8_0"`` -> ``("smollm2-135m", "q8_0")``; None when no format suffix."""
    base, sep, fmt = name.rpartition("-")
    if sep and base and fmt in FORMATS:
        return base, fmt
    return None


def read_record(path: Path) -> Converted | None:
    """The record of the converted model at ``path``; None when there is none or it is unusable."""
    try:
        data = json.loads(record_path(path).read_text(encoding="utf-8"))
        return Converted(
            name=str(data["name"]),
            path=path,
            format=str(data["format"]),
            source=str(data["source"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def converted_models() -> list[Converted]:
    """Every converted model with a record in the cache, by name."""
    root = models.pipesd_home() / "models"
    found = []
    for rec in sorted(root.glob("*.gguf.json")):
        conv = read_record(rec.with_name(rec.name.removesuffix(".json")))
        if conv is not None:
            found.append(conv)
    return found


def lookup(name: str) -> Path | None:
    """The cached file of a converted model's name, for :func:`pipesd.models.resolve`.

    None when ``name`` is not a converted name (nor a file in the cache with a record), so the
    caller treats it as a path. Raises ModelError with one line for a converted name that is
    missing or incomplete.
    """
    if os.sep in name or name.endswith(".gguf") or name in models.REGISTRY:
        return None
    path = models.model_path(name)
    conv = read_record(path)
    parts = split_name(name)
    if conv is not None:
        if conv.complete:
            return path
        again = f"pipesd models convert --force {conv.source} --to {conv.format}"
        if not path.is_file():
            raise ModelError(f"converted model {path} is missing; run `{again}`")
        raise ModelError(
            f"converted model {path} has {path.stat().st_size} bytes, expected {conv.size}: "
            f"corrupt; run `{again}`"
        )
    if parts is None or Path(name).expanduser().exists():
        return None
    base, fmt = parts
    if path.is_file():
        raise ModelError(
            f"converted model {path} has no record {record_path(path).name}: incomplete; run "
            f"`pipesd models convert --force {base} --to {fmt}`"
        )
    if base in models.REGISTRY or models.model_path(base).is_file():
        raise ModelError(
            f"model {name!r} is not converted yet; run `pipesd models convert {base} --to {fmt}`"
        )
    return None


def convert(
    source: str,
    fmt: str,
    *,
    force: bool = False,
    threads: int = 2,
    progress: bool = True,
    verbose: bool = False,
) -> ConvertResult:
    """Writes ``source`` re-quantised to ``fmt`` into the cache; returns where it went.

    ``source`` is a registry name (fetched when missing), a converted name or a GGUF path.
    An existing complete conversion is kept unless ``force``. ``verbose`` passes llama.cpp's
    own log through to stderr.
    """
    if fmt.lower() not in FORMATS:
        raise ModelError(f"unknown target format {fmt!r}; choose one of {', '.join(FORMATS)}")
    fmt = fmt.lower()
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if source in models.REGISTRY:  # a fetched source is not needed when the result is there
        name = f"{source}-{fmt}"
        old = read_record(models.model_path(name))
        if old is not None and old.complete and not force:
            return ConvertResult(old, existed=True, seconds=0.0)
    src = models.resolve(source)
    if src.is_dir():
        raise ModelError(f"{src} is a Hugging Face directory; `models convert` needs a GGUF file")
    models.check_gguf(src)
    name = f"{src.name.removesuffix('.gguf')}-{fmt}"
    dest = models.model_path(name)
    old = read_record(dest)
    if old is not None and old.complete and not force:
        return ConvertResult(old, existed=True, seconds=0.0)
    label = source if source in models.REGISTRY else str(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")  # llama.cpp creates it
    rec_tmp = tmp.with_name(tmp.name + ".json")
    try:
        _quantize(src, tmp, fmt, threads=threads, progress=progress, verbose=verbose, name=name)
        models.check_gguf(tmp)
        conv = Converted(name, dest, fmt, label, tmp.stat().st_size, _sha256(tmp))
        rec_tmp.write_text(json.dumps(_record(conv, src), indent=2) + "\n", encoding="utf-8")
        record_path(dest).unlink(missing_ok=True)  # never a stale record beside a new file
        os.replace(tmp, dest)
        os.replace(rec_tmp, record_path(dest))
    except BaseException:
        tmp.unlink(missing_ok=True)
        rec_tmp.unlink(missing_ok=True)
        raise
    return ConvertResult(conv, existed=False, seconds=time.monotonic() - start)


def _record(conv: Converted, src: Path) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        quantizer = f"llama.cpp via llama-cpp-python {version('llama-cpp-python')}"
    except PackageNotFoundError:
        quantizer = "llama.cpp via llama-cpp-python"
    return {
        "version": _RECORD_VERSION,
        "name": conv.name,
        "format": conv.format,
        "source": conv.source,
        "source_path": str(src),
        "size": conv.size,
        "sha256": conv.sha256,
        "quantizer": quantizer,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _quantize(
    src: Path, dst: Path, fmt: str, *, threads: int, progress: bool, verbose: bool, name: str
) -> None:
    """Runs llama.cpp's quantiser in a child process; ModelError with one line on failure."""
    from tqdm import tqdm

    child = "import sys; from pipesd.convert import quantize_main as m; sys.exit(m(sys.argv[1:]))"
    cmd = [sys.executable, "-c", child, str(src), str(dst), fmt, str(threads)]
    tail: collections.deque[str] = collections.deque(maxlen=20)
    bar: Any = None
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        bufsize=1,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if verbose:
                sys.stderr.write(line)
            m = _TENSOR_LINE.match(line)
            if m is None:
                if line.strip():
                    tail.append(line.strip())
                continue
            if bar is None:
                bar = tqdm(
                    total=int(m.group(2)),
                    unit="tensor",
                    desc=f"convert {name}",
                    disable=not progress or verbose,
                    file=sys.stderr,
                )
            bar.update(int(m.group(1)) - bar.n)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if bar is not None:
            bar.close()
    if rc != 0:
        raise ModelError(f"llama.cpp could not convert {src}: {_failure(tail, rc)}")


def _failure(tail: collections.deque[str], rc: int) -> str:
    """The reason in the quantiser's last log lines."""
    lines = list(tail)
    for i in range(len(lines) - 1, -1, -1):
        if _FAILED in lines[i]:
            reason = lines[i].split(_FAILED, 1)[1]
            if "failed to load model" in reason and i > 0 and "failed" in lines[i - 1]:
                reason = lines[i - 1].split(": ", 1)[-1]  # the loader's cause, without its name
            return reason
    for line in reversed(tail):
        if "error" in line.lower():
            return line
    return f"the quantiser exited with status {rc}" + (f" ({tail[-1]})" if tail else "")


def quantize_main(argv: list[str]) -> int:
    """The child process: ``SRC DST FORMAT THREADS``; llama.cpp's log goes to stderr."""
    import ctypes

    import llama_cpp

    src, dst, fmt, threads = argv

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FORMATS[fmt]}")
    params.nthread = int(threads)
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return 1 if rc != 0 else 0
