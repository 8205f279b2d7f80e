// Adafactor step over one param group's tensor lists (classic.md §8, with
// torch.optim.Adafactor's defaults and epsilon placement). The single
// implementation behind torchopt_ext::optim::Adafactor and
// torch.ops.torchopt_ext.adafactor_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// Params with dim >= 2 are factored over their last two dims: row_vars and
// col_vars hold one entry per such param, in param order, shaped
// shape[:-1] + (1,) and shape[:-2] + (1,) + shape[-1:] (torch's layout).
// variances holds one param-shaped entry per other param (vectors, 0-d).
// exp_avgs is empty, or one param-shaped entry per param when beta1 is set.
// eps1 nullopt: finfo(param dtype).eps. rho_t = min(lr, 1/sqrt(t)) with
// relative_step (and min(.., 1e-6 t) with warmup_init), else lr;
// alpha_t = max(eps2, RMS(theta)) rho_t with scale_parameter, else rho_t;
// theta *= 1 - lr weight_decay. AMP arguments as in adam_step_.
void adafactor_step_(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                     at::TensorList variances, at::TensorList exp_avgs, at::TensorList state_steps,
                     const at::Tensor& lr, double beta2_decay, std::optional<double> eps1, double eps2, double d,
                     double weight_decay, std::optional<double> beta1, bool relative_step, bool scale_parameter,
                     bool warmup_init, bool maximize, bool stochastic_rounding, int64_t seed,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// adafactor_step_ in three stages for params split across ranks (FSDP2
// shards): between stages the caller sums parts of `stats` (one float64
// buffer per param, layout in kernels/cpu/adafactor.h) across the shard
// group. stage 1 increments the steps, applies grad_scale / found_inf and
// fills the stats; stage 2 updates the column EMAs (or variances) and fills
// sum U^2; stage 3 clips and updates the params (found_inf skips every
// stage). On one process, the stages back to back give adafactor_step_'s
// results bit for bit.
void adafactor_stage_(int64_t stage, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                      at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                      at::TensorList state_steps, const at::Tensor& lr, at::TensorList stats, double beta2_decay,
                      std::optional<double> eps1, double eps2, double d, double weight_decay,
                      std::optional<double> beta1, bool relative_step, bool scale_parameter, bool warmup_init,
                      bool maximize, bool stochastic_rounding, int64_t seed,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
