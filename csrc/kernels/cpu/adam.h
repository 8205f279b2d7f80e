#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct AdamHyperparams {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;
  bool amsgrad;
  bool maximize;
};

// Fused Adam/AdamW over one param group. Every tensor is contiguous; steps
// holds each tensor's already-incremented step count.
void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const AdamHyperparams& hp,
               const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu

namespace torchopt_ext::kernels::cpu {

// Adam/AdamW with Magma masking (rollfast.md §5): per tensor, the cosine
// between the raw gradient and the updated (un-corrected) first moment
// updates `scores` (0-d float32, one per param) and the whole update,
// decoupled decay included, is scaled by keep[i] * score.
struct AdamMagmaHyperparams {
  AdamHyperparams adam;
  double tau;
};
void adam_magma_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList scores, const std::vector<bool>& keep,
                     const std::vector<double>& steps, const AdamMagmaHyperparams& hp,
                     const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
