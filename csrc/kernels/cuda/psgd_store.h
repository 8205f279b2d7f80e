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

}  // namespace torchopt_ext::kernels::cuda
#endif
