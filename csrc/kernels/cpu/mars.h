#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct MARSHyperparams {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double gamma;
  bool lion;  // mars-lion: sign of the momentum instead of the Adam ratio
  bool amsgrad;
  bool maximize;
  // mars-shampoo's matrices: only the momentum (and g_prev) is updated here;
  // the functional orthogonalizes it and moves the param.
  bool momentum_only = false;
  // Approximate mode stores g as the next step's g_prev; the exact mode
  // (is_approx=false) leaves g_prev to the caller (update_last_grad).
  bool is_approx = true;
};

// Fused MARS (Yuan et al. 2024; classic.md §13), approximate mode, for the
// matrix branch: the variance-reduced gradient c = g + gamma b1/(1-b1) (g - g_prev)
// is clipped to unit L2 norm per tensor (a first pass computes the norm), then
// drives an AdamW- or Lion-style step; last_grads are replaced by the grads.
// exp_avg_sqs (and max_exp_avg_sqs) are empty for mars-lion (and without amsgrad).
// A defined `norm_sqs` (float64 (n, 1): ||c||^2 per tensor, e.g. summed over
// the shards of each tensor) replaces the first pass.
void mars_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
               const MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& norm_sqs);

// The first pass alone: writes each tensor's ||c||^2 into `out` (float64 (n, 1), contiguous).
void mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
                   const MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& out);

}  // namespace torchopt_ext::kernels::cpu
