#!/usr/bin/env bash
# Sets up PipeSD in .venv at the repository root, then runs one job:
#   ./setup.sh          install, fetch the default model pair, run a short generation
#   ./setup.sh test     install, fetch, run the whole test suite (C++ under ctest, then pytest)
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-demo}"
PYTHON="${PYTHON:-python3}"

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# GoogleTest for the C++ unit tests, from the system's packages (nothing downloaded by CMake).
if [ "$job" = test ] && { [ ! -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null \
    || ! command -v clang-format >/dev/null; }; then
  log "installing libgtest-dev, cmake and clang-format"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libgtest-dev cmake g++ clang-format >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
# torch: keep an installed build (CPU or CUDA, >= 2.4); otherwise take the CPU build 2.13.0.
if ! $PY -c "import torch" 2>/dev/null; then
  log "installing torch 2.13.0"
  $PY -m pip install -q --disable-pip-version-check torch==2.13.0
fi
log "installing pipesd and its dependencies (llama-cpp-python compiles once, ~6 min on 2 cores)"
extras=""; [ "$job" = test ] && extras="[test]"
$PY -m pip install -q --disable-pip-version-check -e ".${extras}"

log "fetching the default model pair"
.venv/bin/pipesd models fetch

case "$job" in
  demo)
    log "speculative decoding: qwen2.5-coder-0.5b drafts, qwen2.5-coder-1.5b verifies"
    .venv/bin/pipesd generate --max-new-tokens 64 \
      $'def quicksort(arr):\n    """Sort a list of numbers."""\n'
    ;;
  test)
    log "lint: ruff, mypy, clang-format"
    .venv/bin/ruff check pipesd tests bench
    .venv/bin/ruff format --check pipesd tests bench
    .venv/bin/mypy pipesd
    if command -v clang-format >/dev/null; then
      clang-format --dry-run --Werror csrc/include/pipesd/*.h csrc/*/*.cc bindings/*.cc tests/cpp/*.cc \
        tests/cpp/*.h bench/*.cc
    fi
    log "C++ unit tests (ctest)"
    cmake -S . -B build/cpp-tests -DPIPESD_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
    cmake --build build/cpp-tests -j 2 >/dev/null
    ctest --test-dir build/cpp-tests --output-on-failure
    log "Python tests (pytest)"
    .venv/bin/pytest
    ;;
  *)
    echo "usage: ./setup.sh [demo|test]" >&2
    exit 2
    ;;
esac
