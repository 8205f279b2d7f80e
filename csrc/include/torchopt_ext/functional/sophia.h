// Sophia step and Hessian-EMA refresh over one param group's tensor lists
// (classic.md §12). The single implementation behind torchopt_ext::optim::SophiaH,
// SophiaG and torch.ops.torchopt_ext.sophia_step_ / sophia_update_hessian_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace torchopt_ext::functional {

// theta <- theta (1 - lr wd); m <- beta1 m + (1 - beta1) g;
// theta <- theta - lr clip(m / denom, -1, 1) with denom = max(gamma h, eps)
// (eps_mode "max") or gamma h + eps (eps_mode "add"). `hessians` are read only;
// with h = 0 the step is lr sign(m) (up to m/eps for tiny |m|).
// state_steps count applied steps. AMP arguments as in adam_step_.
void sophia_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                  at::TensorList state_steps, const at::Tensor& lr, double beta1, double gamma, double eps,
                  double weight_decay, c10::string_view eps_mode, bool maximize, bool stochastic_rounding, int64_t seed,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// h <- beta2 h + (1 - beta2) estimate, fused, in fp32 math for reduced-precision
// storage. An estimate of another floating dtype is first cast to its
// Hessian's dtype.
void sophia_update_hessian_(at::TensorList hessians, at::TensorList estimates, double beta2);

}  // namespace torchopt_ext::functional
