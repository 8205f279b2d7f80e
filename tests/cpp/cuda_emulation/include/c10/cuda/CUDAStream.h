// Emulation stand-in for c10/cuda/CUDAStream.h (see cuda_emulation.h): the
// kernels' host code asks for the current stream; the emulation has one.
#pragma once

#include <c10/core/Device.h>

#include "cuda_emulation.h"

namespace c10::cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex device_index = -1) {
  static_cast<void>(device_index);
  return {};
}

}  // namespace c10::cuda
