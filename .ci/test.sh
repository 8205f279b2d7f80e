#!/usr/bin/env bash
# The project's test command (README "Run the tests"): installs what the tests
# need, checks formatting, builds the library, its Python module and the
# GoogleTest suite once, then runs ctest, an out-of-tree find_package build of
# the C++ example, and pytest. Any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# ccache keys on the command line: relative paths let clones share hits.
export CCACHE_BASEDIR="$PWD"

echo "== dependencies"
# lion-pytorch, qhoptim, schedulefree and sophia-opt are oracles for the parity tests; torch stays pinned in the same resolve.
python -m pip install -q --disable-pip-version-check torch==2.13.0 pytest ruff==0.17.6 clang-format==23.1.5 ninja \
  lion-pytorch==0.2.5 qhoptim==1.1.0 schedulefree==1.4.1 sophia-opt==0.2.2 pytorch-optimizer==4.1.0
if ! [ -f /usr/include/gtest/gtest.h ] || ! command -v ccache >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgtest-dev ccache >/dev/null
fi
# A torch install without its C++ headers (pytorch#179414) cannot build extensions.
python - <<'PY'
import os, torch
inc = os.path.join(os.path.dirname(torch.__file__), "include")
for rel in ("torch/csrc/api/include/torch/torch.h", "c10/core/TensorImpl.h"):
    assert os.path.exists(os.path.join(inc, rel)), f"torch install lacks {rel}: reinstall torch"
print("torch", torch.__version__)
PY

echo "== lint"
ruff check .
ruff format --check .
git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | xargs clang-format --dry-run --Werror
bash -n .ci/gpu_session.sh  # the GPU runbook runs only on a device machine: at least parse it here
bash .ci/gpu_session.sh --dry-run >/dev/null

echo "== CUDA compile check (nvcc -c on every .cu against the installed torch's headers)"
bash .ci/nvcc_check.sh

echo "== build (library, Python module, C++ tests)"
TORCHOPT_EXT_BUILD_TESTS=1 TORCHOPT_EXT_BUILD_EXAMPLES=0 \
  python -m pip install -q --disable-pip-version-check --no-build-isolation -e .

echo "== C++ tests"
ctest --test-dir build --output-on-failure -j "$MAX_JOBS"

echo "== C++ example built out of tree with find_package(TorchOptExt)"
prefix="$(python -c 'import torchopt_ext; print(torchopt_ext.cmake_prefix_path)')"
launcher=""; command -v ccache >/dev/null && launcher="-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"
cmake -S examples/cpp -B build/example-consumer -G Ninja -DCMAKE_BUILD_TYPE=Release $launcher \
  -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build build/example-consumer
build/example-consumer/train_mlp 100

echo "== Python tests"
python -m pytest tests/python -q -p no:cacheprovider -m "not distributed"

# Multi-process gloo tests (spawned ranks, bounded timeouts): ~2.5 min on 2
# cores, so they run as their own step; still gating.
echo "== Python distributed tests (FSDP2 / DCP, gloo on CPU)"
GLOO_SOCKET_IFNAME=lo python -m pytest tests/python -q -p no:cacheprovider -m distributed
