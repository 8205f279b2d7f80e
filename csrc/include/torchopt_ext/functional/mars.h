// MARS step over the matrix tensors of a param group
// (classic.md §13). The single implementation behind torchopt_ext::optim::MARS
// and torch.ops.torchopt_ext.mars_step_. Non-matrix tensors take MARS's AdamW
// branch, which is adam_step_ with lr_1d, betas_1d and weight_decay_1d.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torchopt_ext::functional {

// mars_type "mars-adamw" (exp_avg_sqs used), "mars-lion" or "mars-shampoo"
// (exp_avg_sqs and max_exp_avg_sqs empty; mars-shampoo takes 2-D params only
// and orthogonalizes m / (1 - b1) with Newton-Schulz in ns_dtype: bf16 as the
// official code, nullopt for fp32 (fp64 for fp64 state)). last_grads hold
// g_prev: zeros before the first step (so step 1 sees c = (1 + gamma b1/(1-b1)) g);
// with is_approx the step stores g there, without it (exact MARS) the caller
// fills them with the gradient of the previous params on the current batch.
// norm_sqs (float64 (n, 1), optional): ||c||^2 per param, from mars_norm_sqs
// summed over each tensor's shards, instead of the fused kernel's own pass.
// AMP arguments as in adam_step_.
void mars_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList last_grads, at::TensorList state_steps,
                const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay, double gamma,
                c10::string_view mars_type, bool amsgrad, bool maximize, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& norm_sqs = std::nullopt, bool is_approx = true,
                std::optional<at::ScalarType> ns_dtype = at::kBFloat16);

// The first stage of a sharded MARS step: each param's (local) ||c||^2 as
// mars_step_ with the same arguments would compute it, as a float64 (n, 1)
// tensor on the params' device. Writes nothing; zeros when found_inf skips.
at::Tensor mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                         at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                         double weight_decay, double gamma, c10::string_view mars_type, bool amsgrad, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

}  // namespace torchopt_ext::functional
