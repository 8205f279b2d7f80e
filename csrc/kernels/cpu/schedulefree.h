#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

// Per-tensor scalars of a Schedule-Free step, computed on the host from the
// tensor's step, weight_sum and lr_max (rollfast.md §4.2, SF's weighting).
struct ScheduleFreeScalars {
  double lr = 0.0;                // lr after warm-up
  double ckp1 = 0.0;              // c_{k+1}: weight of the new z in the average x
  double bias_correction2 = 1.0;  // AdamW only
};

// What the per-tensor scalars depend on besides lr and the counters
// (kernels/algos/schedulefree.h: schedulefree_advance).
struct ScheduleFreeWeighting {
  int64_t warmup_steps;
  double r;
  double weight_lr_power;
  double beta2;  // 0 for SGD (no second moment)
};

struct ScheduleFreeAdamWHyperparams {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

struct ScheduleFreeSGDHyperparams {
  double momentum;
  double weight_decay;
};

// Fused Schedule-Free AdamW: params hold y, zs hold z, exp_avg_sqs the second moment.
void schedulefree_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList exp_avg_sqs,
                             const std::vector<ScheduleFreeScalars>& scalars, const std::vector<double>& steps,
                             const ScheduleFreeAdamWHyperparams& hp, const ElementwiseOptions& options);

// Fused Schedule-Free SGD: params hold y, zs hold z.
void schedulefree_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList zs,
                           const std::vector<ScheduleFreeScalars>& scalars, const std::vector<double>& steps,
                           const ScheduleFreeSGDHyperparams& hp, const ElementwiseOptions& options);

// params <- lerp(params, zs, weight) over a group (torch.lerp's formula, math
// in fp32/fp64): weight 1 - 1/beta maps y to x (eval), 1 - beta maps x to y.
void schedulefree_lerp_to_z(at::TensorList params, at::TensorList zs, double weight);

// Generic wrapper, before the base step: params (y) <- z - decay * y, the point
// the base optimizer steps from; zs (z) <- x = (y - (1 - beta) z) / beta.
void schedulefree_wrapper_pre(at::TensorList params, at::TensorList zs, double beta, double decay);

// Generic wrapper, after the base step: params hold z_{k+1}, zs hold x_k.
// x_{k+1} = lerp(x_k, z_{k+1}, c); params <- y_{k+1} = lerp(x_{k+1}, z_{k+1}, 1 - beta);
// zs <- z_{k+1}.
void schedulefree_wrapper_post(at::TensorList params, at::TensorList zs, double c, double beta);

}  // namespace torchopt_ext::kernels::cpu
