// NAdam / NAdamW step over one param group's tensor lists (classic.md §4).
// The single implementation behind torchopt_ext::optim::NAdamW and
// torch.ops.torchopt_ext.nadam_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// mu_products holds each param's running product of momentum coefficients
// (one-element tensors starting at 1, float32 as torch.optim.NAdam keeps it).
// AMP arguments as in adam_step_.
void nadam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList mu_products, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                 double beta2, double eps, double weight_decay, double momentum_decay, bool decoupled_weight_decay,
                 bool maximize, bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
