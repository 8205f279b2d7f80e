#!/usr/bin/env bash
# Compile-checks every CUDA source (csrc/kernels/cuda/*.cu) with nvcc against
# the installed torch's headers, so a CUDA syntax or type error fails CI even
# where torch is a CPU build and nothing CUDA can be linked or run
# (docs/design.md "CUDA kernels"; torch_extension.md §4.3). Object files go to
# a temporary directory and are thrown away.
#
#   TORCHOPT_EXT_CUDA_ARCHS  SASS targets, ";"-separated (default "90": one arch keeps CI fast; the CMake build defaults to "80;90")
#   NVCC                     the nvcc to use (default: nvcc on PATH, then /usr/local/cuda/bin/nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc_bin" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc_bin=/usr/local/cuda/bin/nvcc
fi
if [ -z "$nvcc_bin" ]; then
  echo "nvcc_check: SKIPPED: nvcc not found (set NVCC or put the CUDA toolkit on PATH)"
  exit 0
fi

torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
inc="$torch_dir/include"
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
# The CPU wheel ships c10/cuda/*.h but not the headers CMake generates for a
# CUDA build: c10/cuda/impl/cuda_cmake_macros.h is skipped with
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE, and a CUDA wheel has all of them anyway.
archs="${TORCHOPT_EXT_CUDA_ARCHS:-90}"
gencode=()
for arch in ${archs//;/ }; do
  gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}")
done
launcher=()
command -v ccache >/dev/null && launcher=(ccache)

abi="$(python -c 'import torch; print(int(torch.compiled_with_cxx11_abi()))')"
flags=(-std=c++20 -O3 --expt-relaxed-constexpr --expt-extended-lambda -Xcompiler -fPIC
  --fmad=false --Werror cross-execution-space-call
  -D_GLIBCXX_USE_CXX11_ABI="$abi"
  -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCHOPT_EXT_WITH_CUDA
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__
  -I"$inc" -I"$inc/torch/csrc/api/include" -Icsrc -Icsrc/include "${gencode[@]}")

status=0
shopt -s nullglob
sources=(csrc/kernels/cuda/*.cu)
[ ${#sources[@]} -gt 0 ] || { echo "nvcc_check: no .cu sources found" >&2; exit 1; }
echo "nvcc_check: $("$nvcc_bin" --version | tail -1), torch $(python -c 'import torch; print(torch.__version__)'), archs $archs"
for src in "${sources[@]}"; do
  start=$(date +%s)
  if "${launcher[@]}" "$nvcc_bin" "${flags[@]}" -c "$src" -o "$stub/$(basename "$src").o"; then
    echo "nvcc_check: ok   $src ($(($(date +%s) - start)) s)"
  else
    echo "nvcc_check: FAIL $src" >&2
    status=1
  fi
done
# The objects linked together (relocatable link, no CUDA libraries needed): a
# kernel or function defined in a header with external linkage appears in
# every .cu that includes it, which compiles file by file and fails only at
# the CUDA build's link.
if [ $status -eq 0 ]; then
  if ld -r -o "$stub/all.o" "$stub"/*.cu.o; then
    echo "nvcc_check: ok   relocatable link of all objects (no symbol defined twice)"
  else
    echo "nvcc_check: FAIL relocatable link of all objects" >&2
    status=1
  fi
fi
# The host C++ that only a CUDA build compiles (the functional layer's switch
# to the CUDA kernels, the CUDA group preparation): a syntax/type check with
# the host compiler and TORCHOPT_EXT_WITH_CUDA defined.
cxx="${CXX:-c++}"
for src in $(grep -rlE 'TORCHOPT_EXT_WITH_CUDA|kernels/cuda/elementwise.h|functional/psgd_device.h' csrc --include='*.cpp' | sort); do
  if "$cxx" -std=c++20 -fsyntax-only -DTORCHOPT_EXT_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    -I"$inc" -I"$inc/torch/csrc/api/include" -Icsrc -Icsrc/include "$src"; then
    echo "nvcc_check: ok   $src (host compiler, TORCHOPT_EXT_WITH_CUDA)"
  else
    echo "nvcc_check: FAIL $src (host compiler, TORCHOPT_EXT_WITH_CUDA)" >&2
    status=1
  fi
done
exit $status
