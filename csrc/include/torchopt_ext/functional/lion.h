// Lion step over one param group's tensor lists (classic.md §9). The single
// implementation behind torchopt_ext::optim::Lion and torch.ops.torchopt_ext.lion_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// theta <- theta (1 - lr wd); theta <- theta - lr sign(beta1 m + (1 - beta1) g);
// m <- beta2 m + (1 - beta2) g. state_steps count applied steps (they seed
// stochastic rounding). AMP arguments as in adam_step_.
void lion_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList state_steps,
                const at::Tensor& lr, double beta1, double beta2, double weight_decay, bool maximize,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
