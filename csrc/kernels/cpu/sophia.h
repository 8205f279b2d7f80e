#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct SophiaHyperparams {
  double lr;
  double beta1;
  double gamma;  // SophiaG's rho
  double eps;
  double weight_decay;
  bool eps_add;  // denominator gamma*h + eps (official SophiaG) instead of max(gamma*h, eps)
  bool maximize;
};

// Fused Sophia update (classic.md §12) over one param group of contiguous
// tensors; `hessians` are read only.
void sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                 const std::vector<double>& steps, const SophiaHyperparams& hp, const ElementwiseOptions& options);

// h <- beta2 h + (1 - beta2) estimate over contiguous lists of one dtype.
void sophia_update_hessian(at::TensorList hessians, at::TensorList estimates, double beta2);

}  // namespace torchopt_ext::kernels::cpu
