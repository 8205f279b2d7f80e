#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct NAdamHyperparams {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double momentum_decay;
  bool decoupled_weight_decay;
  bool maximize;
};

// NAdam's per-tensor scalars, computed from the step and the mu-product by
// kernels::nadam_advance (kernels/algos/nadam.h): on the host (nadam_scalars)
// for host counters, in a CUDA pre-kernel for device counters.
struct NAdamScalars {
  double bias_correction2;
  double grad_coeff;     // -lr (1 - mu_t) / (1 - prod_{i<=t} mu_i)
  double exp_avg_coeff;  // -lr mu_{t+1} / (1 - prod_{i<=t+1} mu_i)
};

// Advances each tensor's mu_product (see nadam_step) and returns its scalars.
std::vector<NAdamScalars> nadam_scalars(at::TensorList mu_products, const std::vector<double>& steps,
                                        const NAdamHyperparams& hp);

// Fused NAdam / NAdamW (classic.md §4) over one param group of contiguous
// tensors. Also advances each tensor's mu_product (a one-element tensor,
// float32 like torch.optim.NAdam's unless it is float64).
void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList mu_products, const std::vector<double>& steps, const NAdamHyperparams& hp,
                const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
