#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct LAMBHyperparams {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double grad_divisor;  // global-norm clipping: grads are divided by it (1: no clipping)
  bool bias_correction;
  bool grad_averaging;
  bool trust_clip;
  bool always_adapt;
  bool decoupled_decay;
  bool maximize;
  // CUDA only: the divisor as a device float64, read by the kernels instead of
  // grad_divisor (no host sync); nullptr on the CPU.
  const double* device_grad_divisor = nullptr;
};

// Fused LAMB (You et al. 2020, NVLAMB/timm form; classic.md §7) over one param
// group of contiguous tensors: a read-only first pass computes each tensor's
// ||theta|| and ||r|| (r the Adam ratio plus coupled decay), the second pass
// writes the moments and theta - lr * trust_ratio * r. A defined `norm_sqs`
// (float64 (n, 2): ||theta||^2, ||r||^2 per tensor, e.g. summed over the
// shards of each tensor) replaces the first pass.
void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const std::vector<double>& steps, const LAMBHyperparams& hp, const ElementwiseOptions& options,
               const at::Tensor& norm_sqs);

// The first pass alone, at the given (already advanced) steps: writes each
// tensor's ||theta||^2 and ||r||^2 into `out` (float64 (n, 2), contiguous).
void lamb_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const std::vector<double>& steps, const LAMBHyperparams& hp, const ElementwiseOptions& options,
                   const at::Tensor& out);

}  // namespace torchopt_ext::kernels::cpu
