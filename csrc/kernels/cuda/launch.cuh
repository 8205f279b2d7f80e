// Every kernel launch goes through launch_kernel, so one call site serves the
// GPU build and the host emulation under which the CPU test suite runs these
// kernels (tests/cpp/cuda_emulation): with TORCHOPT_EXT_CUDA_EMULATION the
// grid runs on the CPU, one fiber per CUDA thread, and the tensors the host
// code hands the kernels are CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <cstddef>
#include <type_traits>
#include <utility>

#if defined(TORCHOPT_EXT_CUDA_EMULATION)
#include "cuda_emulation.h"
#endif

namespace torchopt_ext::kernels::cuda {

// The kernel parameter limit from CUDA 12.1 on Volta and newer (4 KB before):
// MARS's launch table (four state lists) needs more than 4 KB.
constexpr size_t kMaxKernelArgumentBytes = 32764;

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  static_assert((sizeof(std::decay_t<Params>) + ... + size_t{0}) <= kMaxKernelArgumentBytes,
                "kernel arguments over the CUDA parameter limit");
#if defined(TORCHOPT_EXT_CUDA_EMULATION)
  static_cast<void>(stream);
  cuda_emulation::launch(grid, block, [&] { kernel(args...); });
#else
  // clang-format would split the closing chevrons in a .cuh.
  // clang-format off
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The device the kernels read and write: CUDA, or the CPU under emulation.
inline bool on_kernel_device(const at::Tensor& t) {
#if defined(TORCHOPT_EXT_CUDA_EMULATION)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

}  // namespace torchopt_ext::kernels::cuda
