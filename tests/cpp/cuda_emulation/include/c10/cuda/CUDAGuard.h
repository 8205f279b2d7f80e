// Emulation stand-in for c10/cuda/CUDAGuard.h (see cuda_emulation.h): there is
// no current device to switch.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) { static_cast<void>(device); }
  explicit CUDAGuard(c10::DeviceIndex index) { static_cast<void>(index); }
};

}  // namespace c10::cuda
