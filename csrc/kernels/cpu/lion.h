#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct LionHyperparams {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;  // already divided by the initial lr in decoupled mode
  bool maximize;
};

// Fused Lion (classic.md §9) over one param group of contiguous tensors.
void lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const std::vector<double>& steps,
               const LionHyperparams& hp, const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
