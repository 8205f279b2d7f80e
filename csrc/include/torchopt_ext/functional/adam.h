// Adam / AdamW step over one param group's tensor lists (classic.md §3).
// The single implementation behind torchopt_ext::optim::{Adam,AdamW} and the
// op torch.ops.torchopt_ext.adam_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// Updates params, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad;
// pass an empty list otherwise) in place and adds one to every state_steps
// entry. lr is a one-element tensor. With found_inf nonzero nothing changes;
// with grad_scale the grads are divided by it and written back (GradScaler's
// fused-optimizer contract). Bias corrections use each tensor's own step.
void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional

namespace torchopt_ext::functional {

// adam_step_ with Magma masking (rollfast.md §5): magma_scores holds one 0-d
// float32 CPU tensor per param (0.5 before the first step). Per tensor and
// step: cos between the raw grad (sign-flipped with maximize) and exp_avg
// after this step's update (no bias correction), score <- 0.9 score + 0.1
// sigmoid(cos / magma_tau), a Bernoulli(magma_p) draw z from a counter hash
// of (seed, tensor index, step) (common::magma_keep), and the update,
// decoupled decay included, scaled by z * score (no 1/p rescaling). Moments
// are updated whatever z is. One fused op: the cosine comes from the
// kernel's per-tensor norm pre-pass.
void adam_magma_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList magma_scores, at::TensorList state_steps,
                      const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                      bool decoupled_weight_decay, bool amsgrad, bool maximize, double magma_p, double magma_tau,
                      bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
