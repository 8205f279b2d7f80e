// Schedule-Free (Defazio et al. 2024, "The Road Less Scheduled"; rollfast.md §4)
// over one param group's tensor lists: the single implementation behind
// torchopt_ext::optim::ScheduleFreeAdamW / ScheduleFreeSGD / ScheduleFree and
// the torch.ops.torchopt_ext.schedulefree_* ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace torchopt_ext::functional {

// Fused Schedule-Free AdamW, the schedulefree package's AdamWScheduleFree step.
// params hold y (the point gradients are taken at), zs hold z, exp_avg_sqs v;
// weight_sums and lr_maxes are per-param one-element CPU tensors (float64
// recommended: they accumulate) that the step updates, starting at 0 and -1.
// With k the step count before this step:
//   lr_k = lr * min(1, (k+1)/warmup_steps);  lr_max = max(lr_max, lr_k)
//   w = (k+1)^r * lr_max^weight_lr_power;  S += w;  c = w / S (0 when S = 0)
//   v = beta2 v + (1-beta2) g^2;  d = g / (sqrt(v / (1-beta2^(k+1))) + eps) + wd y
//   y = lerp(y, z, c) + lr_k (beta1 (1-c) - 1) d;  z = z - lr_k d
// state_steps count steps; AMP arguments as in adam_step_.
void schedulefree_adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList zs,
                              at::TensorList exp_avg_sqs, at::TensorList weight_sums, at::TensorList lr_maxes,
                              at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t warmup_steps, double r, double weight_lr_power,
                              bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf);

// Fused Schedule-Free SGD (SGDScheduleFree): as above with d = g + wd y and
// momentum in place of beta1.
void schedulefree_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList weight_sums,
                            at::TensorList lr_maxes, at::TensorList state_steps, const at::Tensor& lr, double momentum,
                            double weight_decay, int64_t warmup_steps, double r, double weight_lr_power,
                            bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf);

// Train/eval switch: to_eval maps y to x = (y - (1-beta) z) / beta, otherwise
// x to y = (1-beta) z + beta x (both as torch.lerp towards z).
void schedulefree_set_mode_(at::TensorList params, at::TensorList zs, double beta, bool to_eval);

// Generic wrapper (rollfast.md §4.2). sf_state is a float64 CPU tensor of 4
// values per param group: [k, weight_sum S, lr_max, beta used to form y]
// (start: [0, 0, lr_max_init, b1]).
//
// schedulefree_wrapper_pre_ runs before the base optimizer's step: params (y)
// become z - decay * y (decay = lr * weight_decay_at_y + lr^2 * adamc_weight_decay),
// the point the base optimizer steps from, and zs hold x = (y - (1-beta) z) / beta.
void schedulefree_wrapper_pre_(at::TensorList params, at::TensorList zs, const at::Tensor& sf_state,
                               const at::Tensor& lr, double weight_decay_at_y, double adamc_weight_decay);

// schedulefree_wrapper_post_ runs after it: params hold z_{k+1} = z_k - decay y_k + delta_k
// (delta_k: the base optimizer's update). It computes the weight w of
// `weighting_mode` ("theoretical": 1, "schedulet": g, "practical"/"power": g^weight_lr_power,
// with g = lr_max if use_lr_max or mode "power", else lr; times (k+1)^r), then
// S += w, c = w / S (c = 1 and S unchanged while k < c_warmup), anneals beta
// (1-beta log-linear from 1-b1 to 1-b1_max over b1_anneal_steps; 0 = off), and
// writes x_{k+1} = lerp(x_k, z_{k+1}, c), params <- y_{k+1} = lerp(x_{k+1}, z_{k+1}, 1-beta),
// zs <- z_{k+1}; sf_state advances.
void schedulefree_wrapper_post_(at::TensorList params, at::TensorList zs, const at::Tensor& sf_state,
                                const at::Tensor& lr, c10::string_view weighting_mode, double b1, double r,
                                double weight_lr_power, bool use_lr_max, int64_t c_warmup, int64_t b1_anneal_steps,
                                double b1_max);

// Schedule-Free+ Polyak scalar (rollfast.md §4.2 step 3), run before
// schedulefree_wrapper_pre_ over every param of the wrapper (params hold y,
// zs z): rho = max(0, f - f_star + (beta_next / beta_prev) <g, z - y>) /
// max(g1_hat, polyak_eps), with g1_hat the bias-corrected EMA (polyak_beta)
// of sqrt(pi/2) ||g||_1, beta_prev = max(sf_state[3], 1e-8) and beta_next
// this step's (anneal included). polyak_state is a float64 CPU tensor
// [g1 EMA, count, rho] (start [0, 0, 1]); rho is written to polyak_state[2]
// (a NaN rho becomes 0). The caller scales the step's lr by rho.
void schedulefree_polyak_(at::TensorList params, at::TensorList grads, at::TensorList zs,
                          const at::Tensor& polyak_state, const at::Tensor& loss, const at::Tensor& sf_state, double b1,
                          int64_t b1_anneal_steps, double b1_max, double f_star, double polyak_beta, double polyak_eps);

// The canonical lowercase name of a weighting mode given in any case; throws
// naming `weighting_mode` for anything else.
std::string schedulefree_weighting_mode(c10::string_view mode);

}  // namespace torchopt_ext::functional
