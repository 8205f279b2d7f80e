#!/usr/bin/env bash
# One GPU session in one device call (docs/benchmarks.md "GPU session"): on a
# machine with a CUDA torch and nvcc, build torchopt_ext with its CUDA
# kernels (sm_90), run the CUDA tests, then benchmarks/bench_cuda.py, each
# phase under its own time limit so the whole fits one 10-minute call.
# Results land in $OUT (the device tool brings back at most 8 files):
#   summary.txt      what each phase did, its time and status (read this first)
#   build.log        the CUDA build
#   pytest.log       the CUDA tests (-m cuda), with the failure tracebacks
#   pytest.xml       the same as JUnit XML
#   ctest.log        the GoogleTest CUDA tests (only where gtest is installed)
#   bench.json       bench_cuda.py, every row (bandwidth, baselines, Newton-Schulz)
#   bench.md         the same as a markdown table
#   bench_ns.json    Newton-Schulz alone, when the full benchmark did not reach it
#   bench_psgd.md    bench_kron.py --device cuda (psgd phase, not in the default run)
# A failing phase does not stop the later ones (a failed build does: nothing
# can run without the library); the exit status is 0 only if all passed.
#
#   bash .ci/gpu_session.sh                  # build, tests, bench
#   bash .ci/gpu_session.sh build tests      # a subset, in this order
#   bash .ci/gpu_session.sh build psgd       # PSGD family vs heavyball / kron-torch on the GPU
#   bash .ci/gpu_session.sh --dry-run        # print the plan, run nothing
#
# Environment: OUT (default ./gpu_out), PYTHON (default python3),
# GPU_SESSION_SECONDS (whole-run budget, default 570), BUILD_LIMIT (330),
# TEST_LIMIT (150), TEST_TIMEOUT (per test, 120), MAX_JOBS (16),
# TORCHOPT_EXT_CUDA_ARCHS (90), BENCH_ARGS (extra bench_cuda.py arguments),
# PSGD_ARGS (extra bench_kron.py arguments). The psgd phase installs the
# baselines' wheels from .whl/ when carried there (heavyball 3.2.1,
# kron-torch 0.3.3; the device image has their numpy, opt-einsum, triton).
set -uo pipefail
cd "$(dirname "$0")/.."
# The library is built in place, not installed: scripts run as
# `python benchmarks/x.py` see only their own folder on sys.path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT="${OUT:-$PWD/gpu_out}"
PYTHON="${PYTHON:-python3}"
TOTAL="${GPU_SESSION_SECONDS:-570}"
BUILD_LIMIT="${BUILD_LIMIT:-330}"
TEST_LIMIT="${TEST_LIMIT:-150}"
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCHOPT_EXT_CUDA_ARCHS="${TORCHOPT_EXT_CUDA_ARCHS:-90}"
BENCH_ARGS="${BENCH_ARGS:-}"
PSGD_ARGS="${PSGD_ARGS:-}"

dry_run=0
phases=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    build | tests | bench | psgd) phases+=("$arg") ;;
    *)
      echo "gpu_session: unknown argument '$arg' (phases: build tests bench psgd; --dry-run)" >&2
      exit 64
      ;;
  esac
done
[ ${#phases[@]} -gt 0 ] || phases=(build tests bench)

if [ "$dry_run" = 1 ]; then
  echo "gpu_session: plan (nothing runs): phases ${phases[*]}, budget ${TOTAL} s, OUT=$OUT"
  echo "  build: TORCHOPT_EXT_WITH_CUDA=1 TORCHOPT_EXT_CUDA_ARCHS=$TORCHOPT_EXT_CUDA_ARCHS MAX_JOBS=$MAX_JOBS" \
    "$PYTHON setup.py -q build_ext --inplace (limit ${BUILD_LIMIT} s; C++ tests too where gtest is installed)"
  echo "  tests: $PYTHON -m pytest tests/python -m cuda --timeout=$TEST_TIMEOUT --junitxml=\$OUT/pytest.xml" \
    "(limit ${TEST_LIMIT} s); ctest -R Cuda when the C++ tests were built"
  echo "  bench: $PYTHON benchmarks/bench_cuda.py --json --markdown --budget <time left> $BENCH_ARGS" \
    "(the rest of the budget); --newton-schulz-only if the full run did not reach it"
  echo "  psgd: $PYTHON benchmarks/bench_kron.py --device cuda --rounds 10 --no-memory $PSGD_ARGS" \
    "> \$OUT/bench_psgd.md (the rest of the budget; baselines from .whl/*.whl when carried)"
  exit 0
fi

start_all=$(date +%s)
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
status=0
note() { echo "gpu_session: $*" | tee -a "$summary"; }
elapsed() { echo $(($(date +%s) - start_all)); }
left() { echo $((TOTAL - $(elapsed))); }
# min(limit, time left - reserve), at least 10 s.
limit_for() {
  local want=$1 reserve=$2 rest
  rest=$(($(left) - reserve))
  [ "$rest" -lt "$want" ] && want=$rest
  [ "$want" -lt 10 ] && want=10
  echo "$want"
}


# Fail fast, and say why, where this cannot work (e.g. this CPU-only machine).
if ! "$PYTHON" - <<'PY' 2>&1 | tee -a "$summary"; then
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"gpu_session: torch {torch.__version__} is a CPU build: the CUDA kernels cannot be built or run here")
if not torch.cuda.is_available():
    sys.exit(f"gpu_session: torch {torch.__version__} sees no CUDA device: nothing to run here")
print(f"gpu_session: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
  exit 3
fi
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || {
  note "nvcc not found (PATH or /usr/local/cuda/bin): the CUDA kernels cannot be built"
  exit 3
}
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
note "nvcc: $(nvcc --version | tail -1); $(nproc) cores; ccache: $(command -v ccache || echo absent)"

has_cuda_kernels() {
  "$PYTHON" -c 'import sys, torch, torchopt_ext; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key("torchopt_ext::adam_step_", "CUDA") else 1)' 2>/dev/null
}

gtest=0
[ -f /usr/include/gtest/gtest.h ] && gtest=1

run_build() {
  local limit t0 rc
  limit=$(limit_for "$BUILD_LIMIT" 60)
  t0=$(date +%s)
  note "build: start (limit ${limit} s, MAX_JOBS=$MAX_JOBS, archs $TORCHOPT_EXT_CUDA_ARCHS, C++ tests $([ $gtest = 1 ] && echo on || echo 'off: gtest not installed'))"
  TORCHOPT_EXT_WITH_CUDA=1 TORCHOPT_EXT_BUILD_TESTS=$gtest TORCHOPT_EXT_BUILD_EXAMPLES=0 CCACHE_BASEDIR="$PWD" \
    timeout -k 10 "$limit" "$PYTHON" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  if [ $rc = 0 ] && has_cuda_kernels; then
    note "build: ok in $(($(date +%s) - t0)) s (CUDA kernels registered)"
    return 0
  fi
  [ $rc = 124 ] && note "build: TIMED OUT after ${limit} s"
  [ $rc = 0 ] && note "build: finished but torchopt_ext has no CUDA kernels (see build.log: was TORCHOPT_EXT_WITH_CUDA honoured?)"
  note "build: FAILED (rc $rc) in $(($(date +%s) - t0)) s; last lines of build.log:"
  tail -25 "$OUT/build.log" | tee -a "$summary"
  return 1
}

run_tests() {
  local limit t0 rc timeout_arg=()
  if ! has_cuda_kernels; then
    note "tests: torchopt_ext has no CUDA kernels here (build phase missing or failed): building first"
    run_build || return 1
  fi
  limit=$(limit_for "$TEST_LIMIT" 100)
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && timeout_arg=(--timeout="$TEST_TIMEOUT")
  t0=$(date +%s)
  note "tests: start (limit ${limit} s, per-test timeout ${timeout_arg[*]:-none: pytest-timeout missing})"
  # --continue-on-collection-errors: a module whose CPU oracle package is
  # missing there must not stop the CUDA tests of the others.
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$PYTHON" -m pytest tests/python -m cuda -q -rfEs -p no:cacheprovider \
    --continue-on-collection-errors "${timeout_arg[@]}" --junitxml="$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
  rc=$?
  [ $rc = 124 ] && note "tests: TIMED OUT after ${limit} s (pytest.xml may be missing; pytest.log has what ran)"
  note "tests: rc $rc in $(($(date +%s) - t0)) s: $(grep -v "^$" "$OUT/pytest.log" | tail -1)"
  if [ $gtest = 1 ] && [ -x build/tests/cpp/torchopt_ext_cpp_tests ]; then
    timeout -k 5 "$(limit_for 60 90)" ctest --test-dir build -R 'Cuda' --output-on-failure --timeout "$TEST_TIMEOUT" \
      >"$OUT/ctest.log" 2>&1
    note "tests: ctest -R Cuda rc $? ($(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1))"
  fi
  return $rc
}

run_bench() {
  local limit t0 rc
  if ! has_cuda_kernels; then
    note "bench: torchopt_ext has no CUDA kernels here (build phase missing or failed): building first"
    run_build || return 1
  fi
  limit=$(limit_for "$(left)" 5)
  t0=$(date +%s)
  note "bench: start (limit ${limit} s; baselines stop $((limit - 60)) s in)"
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of words
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$PYTHON" benchmarks/bench_cuda.py --json "$OUT/bench.json" \
    --markdown "$OUT/bench.md" --budget $((limit - 60)) $BENCH_ARGS 2>&1
  rc=$?
  if ! grep -q newton_schulz "$OUT/bench.json" 2>/dev/null && [ "$(left)" -gt 30 ]; then
    timeout -k 5 $(($(left) - 5)) "$PYTHON" benchmarks/bench_cuda.py --newton-schulz-only --json "$OUT/bench_ns.json"
  fi
  note "bench: rc $rc in $(($(date +%s) - t0)) s"
  return $rc
}

run_psgd() {
  local limit t0 rc
  if ! has_cuda_kernels; then
    note "psgd: torchopt_ext has no CUDA kernels here (build phase missing or failed): building first"
    run_build || return 1
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >>"$OUT/build.log" 2>&1; then
      export PYTHONPATH="$PYTHONPATH:/tmp/site"
      note "psgd: baselines installed from .whl: $(cd .whl && echo *.whl)"
    else
      note "psgd: installing .whl/*.whl failed (see build.log): baselines missing"
    fi
  else
    note "psgd: no .whl/ carried: heavyball / kron-torch columns will read n/a unless installed"
  fi
  limit=$(limit_for "$(left)" 5)
  t0=$(date +%s)
  note "psgd: start (limit ${limit} s)"
  # shellcheck disable=SC2086 # PSGD_ARGS is a list of words
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$PYTHON" benchmarks/bench_kron.py --device cuda --rounds 10 --no-memory \
    $PSGD_ARGS >"$OUT/bench_psgd.md" 2>&1
  rc=$?
  note "psgd: rc $rc in $(($(date +%s) - t0)) s"
  tail -20 "$OUT/bench_psgd.md" | tee -a "$summary"
  return $rc
}

for phase in "${phases[@]}"; do
  case "$phase" in
    build) run_build || {
      status=1
      note "stopping: nothing else can run without the library"
      break
    } ;;
    tests) run_tests || status=1 ;;
    bench) run_bench || status=1 ;;
    psgd) run_psgd || status=1 ;;
  esac
done
note "done in $(elapsed) s, status $status"
exit $status
