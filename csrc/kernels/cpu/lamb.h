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
};

// Fused LAMB (You et al. 2020, NVLAMB/timm form; classic.md §7) over one param
// group of contiguous tensors: a read-only first pass computes each tensor's
// ||theta|| and ||r|| (r the Adam ratio plus coupled decay), the second pass
// writes the moments and theta - lr * trust_ratio * r.
void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const std::vector<double>& steps, const LAMBHyperparams& hp, const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
