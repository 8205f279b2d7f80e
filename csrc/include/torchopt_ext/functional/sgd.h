// SGD step over one param group's tensor lists (classic.md §2). The single
// implementation behind torchopt_ext::optim::SGD and torch.ops.torchopt_ext.sgd_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// Updates params (and momentum_buffers when momentum != 0; pass an empty list
// otherwise) in place and adds one to every state_steps entry. On a tensor's
// first step its momentum buffer is set to the gradient, as torch.optim.SGD
// does. AMP arguments as in adam_step_.
void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList state_steps,
               const at::Tensor& lr, double momentum, double dampening, double weight_decay, bool nesterov,
               bool maximize, bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
