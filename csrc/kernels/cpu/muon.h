// CPU piece of the Muon step that is element-wise: applying the orthogonalized
// update to reduced-precision params with fp32 math.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchopt_ext::kernels::cpu {

// param <- param * decay + alpha * update, computed in fp32 and stored to the
// bf16/fp16 param with round-to-nearest, or with stochastic rounding (bf16)
// drawn from `rounding_stream`. param and update: contiguous, same numel.
void muon_apply_update_reduced(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                               bool stochastic_rounding, uint64_t rounding_stream);

}  // namespace torchopt_ext::kernels::cpu
