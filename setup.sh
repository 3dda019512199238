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
# clang 14 for the libFuzzer target (-fsanitize=fuzzer).
if [ "$job" = test ] && { [ ! -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null \
    || ! command -v clang-format >/dev/null || ! command -v clang++-14 >/dev/null; }; then
  log "installing libgtest-dev, cmake, clang-format and clang-14"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libgtest-dev cmake g++ clang-format \
    clang-14 >/dev/null
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
        tests/cpp/*.h tests/fuzz/*.cc bench/*.cc
    fi
    log "C++ unit tests (ctest)"
    cmake -S . -B build/cpp-tests -DPIPESD_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
    cmake --build build/cpp-tests -j 2 >/dev/null
    ctest --test-dir build/cpp-tests --output-on-failure
    log "C++ unit tests under AddressSanitizer and UndefinedBehaviorSanitizer (build/cpp-asan)"
    cmake -S . -B build/cpp-asan -DPIPESD_BUILD_TESTS=ON -DPIPESD_SANITIZE=address \
      -DCMAKE_BUILD_TYPE=Debug >/dev/null
    cmake --build build/cpp-asan -j 2 >/dev/null
    ctest --test-dir build/cpp-asan --output-on-failure
    log "endpoint and ring tests under ThreadSanitizer (build/cpp-tsan)"
    cmake -S . -B build/cpp-tsan -DPIPESD_BUILD_TESTS=ON -DPIPESD_SANITIZE=thread \
      -DCMAKE_BUILD_TYPE=Debug >/dev/null
    cmake --build build/cpp-tsan -j 2 >/dev/null
    ctest --test-dir build/cpp-tsan --output-on-failure -R '^(Endpoint|SpscRing)\.'
    log "wire-format fuzzer: replaying tests/fuzz/corpus (build/fuzz)"
    CC=clang-14 CXX=clang++-14 cmake -S . -B build/fuzz -DPIPESD_FUZZ=ON \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
    cmake --build build/fuzz -j 2 >/dev/null
    ctest --test-dir build/fuzz --output-on-failure
    log "wire-format fuzzer: 60 s on a copy of the corpus (log in build/fuzz/fuzz.log)"
    fuzz_corpus="$(mktemp -d)"
    cp tests/fuzz/corpus/* "$fuzz_corpus"/
    if ! build/fuzz/pipesd_fuzz_frames -max_total_time=60 -timeout=5 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix=build/fuzz/ "$fuzz_corpus" >build/fuzz/fuzz.log 2>&1; then
      tail -n 40 build/fuzz/fuzz.log >&2
      rm -rf "$fuzz_corpus"
      echo "the fuzzer found a failing input (build/fuzz/crash-*, oom-*, timeout-* or leak-*):" \
        "fix the bug and add the input to tests/fuzz/corpus/" >&2
      exit 1
    fi
    rm -rf "$fuzz_corpus"
    grep -E '^#[0-9]+[[:space:]]+DONE' build/fuzz/fuzz.log >&2 || true
    log "Python tests (pytest)"
    .venv/bin/pytest
    ;;
  *)
    echo "usage: ./setup.sh [demo|test]" >&2
    exit 2
    ;;
esac
