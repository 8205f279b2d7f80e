// LAMB step over one param group's tensor lists (classic.md §7, timm's Lamb).
// The single implementation behind torchopt_ext::optim::LAMB and
// torch.ops.torchopt_ext.lamb_step_.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// grad_divisor (one-element tensor, optional): global-norm clipping computed
// by the caller over all groups, max(||g_all|| / max_grad_norm, 1); grads are
// divided by it. The per-tensor norms of the trust ratio are computed here, in
// the fused kernel, unless norm_sqs (float64 (n, 2): ||theta||^2, ||r||^2 per
// param, from lamb_norm_sqs summed over each tensor's shards) gives them.
// AMP arguments as in adam_step_.
void lamb_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                double weight_decay, bool bias_correction, bool grad_averaging, bool trust_clip, bool always_adapt,
                bool decoupled_decay, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& norm_sqs = std::nullopt);

// The first stage of a sharded LAMB step: each param's (local) ||theta||^2
// and ||r||^2 as lamb_step_ with the same arguments would compute them, as a
// float64 (n, 2) tensor on the params' device. Writes nothing (the step
// counters are not advanced); zeros when found_inf skips the step.
at::Tensor lamb_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                         double beta2, double eps, double weight_decay, bool bias_correction, bool grad_averaging,
                         bool trust_clip, bool always_adapt, bool decoupled_decay, bool maximize,
                         const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf);

// The global-norm clipping divisor over every grad of the optimizer:
// max(||concat(grads)|| / max_grad_norm, 1), as a 0-d float64 tensor.
at::Tensor lamb_grad_divisor(at::TensorList grads, double max_grad_norm);

}  // namespace torchopt_ext::functional
