// Triangular Kronecker-factored PSGD as rlx-optim's `KronPsgd` does it (seed
// 002): the gradient is its own probe, the upper-triangular factors Q_L (m x m)
// and Q_R (n x n) of every 2-D param take one normalised Lie-group step, the
// preconditioned gradient is clipped by its max-abs value and fed to a
// heavy-ball momentum with coupled (L2) weight decay. Params that are not 2-D
// (0-D, 1-D, 3-D, ...) take the crate's SGD-with-momentum fallback. The single
// implementation behind torchopt_ext::optim::KronPSGD and
// torch.ops.torchopt_ext.kron_psgd_step_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace torchopt_ext::functional {

// momentum_buffers: one per param, param-shaped (float32 for bf16/fp16
// params, else the param's dtype). ql / qr: one per 2-D param, in param order
// (none for the others), (m, m) and (n, n), in the momentum's math dtype.
// precond_lr, momentum, weight_decay, eps, clip: the crate's fields.
void kron_psgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList ql,
                     at::TensorList qr, at::TensorList state_steps, const at::Tensor& lr, double precond_lr,
                     double momentum, double weight_decay, double eps, double clip, bool maximize,
                     bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf);

// One preconditioner update and the clipped preconditioned gradient of one
// matrix (math dtype): updates ql and qr in place and returns
// clip-scaled (Q_L^T Q_L) g (Q_R Q_R^T).
at::Tensor kron_psgd_precondition_(const at::Tensor& g, at::Tensor& ql, at::Tensor& qr, double precond_lr, double eps,
                                   double clip);

}  // namespace torchopt_ext::functional
