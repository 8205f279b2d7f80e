#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct RAdamHyperparams {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;
  bool maximize;
};

// Fused RAdam (classic.md §5) over one param group of contiguous tensors.
void radam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const std::vector<double>& steps, const RAdamHyperparams& hp, const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
