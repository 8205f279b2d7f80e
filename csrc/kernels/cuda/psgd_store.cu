// CUDA store of the PSGD family's reduced-precision params and bf16 state
// (see psgd_store.h). One grid-stride pass, 64-bit indexing.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/psgd_store.h"

namespace torchopt_ext::kernels::cuda {
namespace {

// `coefficients`, when not null, holds (decay, alpha) in float64 on the
// device and replaces the host values.
template <typename T>
__global__ void apply_reduced_kernel(T* param, const float* update, int64_t n, float decay, float alpha,
                                     const double* coefficients, bool stochastic_rounding, uint64_t stream) {
  if (coefficients != nullptr) {
    decay = static_cast<float>(coefficients[0]);
    alpha = static_cast<float>(coefficients[1]);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    // The CPU kernel's expression and order (built with --fmad=false).
    const float value = static_cast<float>(param[i]) * decay + alpha * update[i];
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (stochastic_rounding) {
        const auto random = static_cast<uint32_t>(cpu::mix64(stream ^ static_cast<uint64_t>(i)));
        param[i] = cpu::round_bf16_stochastic(value, random);
        continue;
      }
    }
    param[i] = static_cast<T>(value);
  }
}

void launch_apply_reduced(const char* op, const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                          const double* coefficients, bool stochastic_rounding, uint64_t rounding_stream) {
  TORCH_CHECK(on_kernel_device(param) && param.is_contiguous() && param.numel() == update.numel(), op,
              ": param must be a contiguous CUDA tensor matching the update's numel");
  const int64_t n = param.numel();
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor update32 = update.to(param.device(), at::kFloat).contiguous();
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(param.scalar_type(), "psgd_apply_update_reduced", [&] {
    launch_kernel(apply_reduced_kernel<scalar_t>, blocks, kThreads, stream, param.mutable_data_ptr<scalar_t>(),
                  update32.const_data_ptr<float>(), n, static_cast<float>(decay), static_cast<float>(alpha),
                  coefficients, stochastic_rounding, rounding_stream);
  });
}

}  // namespace

void psgd_apply_update_reduced(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                               bool stochastic_rounding, uint64_t rounding_stream) {
  launch_apply_reduced("psgd_apply_update_reduced", param, update, decay, alpha, nullptr, stochastic_rounding,
                       rounding_stream);
}

void psgd_apply_update_reduced_device_coefficients(const at::Tensor& param, const at::Tensor& update,
                                                   const at::Tensor& coefficients, bool stochastic_rounding,
                                                   uint64_t rounding_stream) {
  TORCH_CHECK(coefficients.device() == param.device() && coefficients.scalar_type() == at::kDouble &&
                  coefficients.is_contiguous() && coefficients.numel() == 2,
              "psgd_apply_update_reduced_device_coefficients: coefficients must be two contiguous float64 values on "
              "the param's device");
  launch_apply_reduced("psgd_apply_update_reduced_device_coefficients", param, update, 0.0, 0.0,
                       coefficients.const_data_ptr<double>(), stochastic_rounding, rounding_stream);
}

}  // namespace torchopt_ext::kernels::cuda
