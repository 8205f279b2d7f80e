// Per-tensor squared norms handed between the two stages of LAMB / MARS
// (`*_norm_sqs` then `*_step_(..., norm_sqs=)`): a sharded front end sums the
// first stage's (n, K) float64 output over the shards of each tensor, so the
// second stage clips and scales with the whole tensors' norms.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace torchopt_ext::common {

// The given norm_sqs, checked to be a float64 (params.size(), k) tensor on the
// params' device (made contiguous); undefined when absent.
at::Tensor check_norm_sqs(const char* op, at::TensorList params, const std::optional<at::Tensor>& norm_sqs, int64_t k);

// Step counters the first stage may advance without touching the caller's:
// copies of host counters (prepare_elementwise_group increments them), CUDA
// counters as they are (the kernels read them + 1 without writing).
std::vector<at::Tensor> peek_steps(at::TensorList state_steps);

// A zero float64 (params.size(), k) tensor on the params' device (CPU when
// there are none).
at::Tensor empty_norm_sqs(at::TensorList params, int64_t k);

}  // namespace torchopt_ext::common
