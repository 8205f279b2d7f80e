// QHAdam / QHAdamW step over one param group's tensor lists (classic.md §6).
// The single implementation behind torchopt_ext::optim::QHAdamW and
// torch.ops.torchopt_ext.qhadam_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// exp_avgs / exp_avg_sqs hold bias-corrected averages (qhoptim's state).
// AMP arguments as in adam_step_.
void qhadam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double nu1, double nu2,
                  double eps, double weight_decay, bool decoupled_weight_decay, bool maximize, bool stochastic_rounding,
                  int64_t seed, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
