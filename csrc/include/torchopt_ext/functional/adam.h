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
