// Host entry of the CUDA element-wise store of the PSGD family (Kron,
// KronPSGD, WhiteKron): kernels/cuda/psgd_store.cu, built only with
// TORCHOPT_EXT_WITH_CUDA. The rest of their step is ATen (cuBLAS) ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(TORCHOPT_EXT_WITH_CUDA)
namespace torchopt_ext::kernels::cuda {

// The CUDA twin of cpu::muon_apply_update_reduced: param <- param * decay +
// alpha * update in fp32, stored to the bf16/fp16 param with round-to-nearest
// or (bf16) stochastic rounding from `rounding_stream`; element i draws
// mix64(stream ^ i) as on the CPU, so both devices round alike. param:
// contiguous CUDA bf16/fp16; update: same numel, any floating dtype. Runs on
// the current stream.
void psgd_apply_update_reduced(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                               bool stochastic_rounding, uint64_t rounding_stream);

// The same store with (decay, alpha) read on the device from `coefficients`,
// a float64 CUDA tensor of two elements (Kron's Magma multiplier stays on the
// device: no sync). Each is rounded to fp32 as the host values are.
void psgd_apply_update_reduced_device_coefficients(const at::Tensor& param, const at::Tensor& update,
                                                   const at::Tensor& coefficients, bool stochastic_rounding,
                                                   uint64_t rounding_stream);

}  // namespace torchopt_ext::kernels::cuda
#endif
