#include "torchopt_ext/functional/prism.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "common/tensor_lists.h"
#include "functional/matrix_parts.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/matrix_dims.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/common/side_by_side.h"

namespace torchopt_ext::functional {

namespace {

at::Tensor sym(const at::Tensor& a) { return (a + a.transpose(-2, -1)) * 0.5; }

// Cesista's coefficient rows for the coupled inverse fourth root (rollfast
// §3.3 step 5); steps past the last row reuse it.
constexpr std::array<std::array<double, 3>, 4> kInvRootCoefficients{{
    {3.85003, -10.8539, 8.61893},
    {1.80992, -0.587778, 0.0647852},
    {1.50394, -0.594516, 0.121161},
    {45.0 / 32.0, -9.0 / 16.0, 5.0 / 32.0},
}};

}  // namespace

at::Tensor prism_bidirectional(const at::Tensor& M, const at::Tensor& D, double gamma_l, double gamma_r,
                               int64_t inv_steps, double inv_eps, double inv_scale, double eps_gram) {
  const double gamma_max = std::max(gamma_l, gamma_r);
  // Joint scale s = sqrt(|M|_F^2 + gamma_max^2 |D|_F^2), floored so a zero
  // momentum gives a zero update instead of NaNs.
  const at::Tensor s = at::clamp_min((M.square().sum() + gamma_max * gamma_max * D.square().sum()).sqrt(), 1e-30);
  const at::Tensor m = M / s;
  const at::Tensor d = D / s;
  const int64_t rows = m.size(0);
  const int64_t cols = m.size(1);
  const auto opts = m.options();
  // Output-feature side (rollfast's right Gram, gamma_r) and input-feature
  // side (rollfast's left Gram, gamma_l) in torch's (out, in) orientation.
  const at::Tensor h_out =
      sym(at::mm(m, m.t()) + gamma_r * gamma_r * at::mm(d, d.t())) + eps_gram * at::eye(rows, opts);
  const at::Tensor h_in = sym(at::mm(m.t(), m) + gamma_l * gamma_l * at::mm(d.t(), d)) + eps_gram * at::eye(cols, opts);
  const at::Tensor t_out = 1.05 * at::linalg_matrix_norm(h_out, "fro");
  const at::Tensor t_in = 1.05 * at::linalg_matrix_norm(h_in, "fro");
  const at::Tensor eye_out = at::eye(rows, opts);
  const at::Tensor eye_in = at::eye(cols, opts);
  at::Tensor q = h_out / t_out + inv_eps * eye_out;
  at::Tensor p = h_in / t_in + inv_eps * eye_in;
  at::Tensor g = m;
  for (int64_t k = 0; k < inv_steps; ++k) {
    const auto& row = kInvRootCoefficients[std::min<size_t>(static_cast<size_t>(k), kInvRootCoefficients.size() - 1)];
    const double a = row[0] / inv_scale;
    const double b = row[1] / std::pow(inv_scale, 5);
    const double c = row[2] / std::pow(inv_scale, 9);
    const at::Tensor w_q = sym(a * eye_out + b * q + c * at::mm(q, q));
    const at::Tensor w_p = sym(a * eye_in + b * p + c * at::mm(p, p));
    const at::Tensor w_q2 = at::mm(w_q, w_q);
    const at::Tensor w_p2 = at::mm(w_p, w_p);
    q = sym(at::mm(q, at::mm(w_q2, w_q2)));
    p = sym(at::mm(p, at::mm(w_p2, w_p2)));
    g = at::mm(at::mm(w_q, g), w_p);
  }
  return g * (t_out.pow(-0.25) * t_in.pow(-0.25));
}

namespace detail {

PrismShaping make_prism_shaping(const char* op, double gamma, int64_t ns_iters, at::ArrayRef<double> ns_coeffs,
                                c10::string_view ns_preset, c10::string_view mode, c10::string_view preconditioning,
                                int64_t inv_steps, double inv_eps, double inv_scale, double eps_gram,
                                std::optional<double> gamma_l, std::optional<double> gamma_r,
                                at::ArrayRef<double> grad_clip_max_amps, std::optional<at::ScalarType> ns_dtype) {
  using common::check_hyperparameter;
  check_hyperparameter(op, "gamma", gamma, std::isfinite(gamma) && gamma >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(mode == "original" || mode == "bidirectional", op,
                    ": mode must be 'original' or 'bidirectional', got '", mode, "'");
  TORCH_CHECK_VALUE(inv_steps >= 1 && inv_steps < 100, op, ": inv_steps must be in [1, 100), got ", inv_steps);
  check_hyperparameter(op, "inv_eps", inv_eps, inv_eps >= 0.0, ">= 0");
  check_hyperparameter(op, "inv_scale", inv_scale, std::isfinite(inv_scale) && inv_scale > 0.0, "> 0");
  check_hyperparameter(op, "eps_gram", eps_gram, eps_gram >= 0.0, ">= 0");
  PrismShaping shaping;
  shaping.bidirectional = mode == "bidirectional";
  shaping.gamma = gamma;
  shaping.gamma_l = gamma_l.value_or(gamma);
  shaping.gamma_r = gamma_r.value_or(gamma);
  check_hyperparameter(op, "gamma_l", shaping.gamma_l, std::isfinite(shaping.gamma_l) && shaping.gamma_l >= 0.0,
                       ">= 0");
  check_hyperparameter(op, "gamma_r", shaping.gamma_r, std::isfinite(shaping.gamma_r) && shaping.gamma_r >= 0.0,
                       ">= 0");
  shaping.inv_steps = inv_steps;
  shaping.inv_eps = inv_eps;
  shaping.inv_scale = inv_scale;
  shaping.eps_gram = eps_gram;
  shaping.ns_dtype = ns_dtype;
  TORCH_CHECK_VALUE(ns_iters >= 1 && ns_iters < 100, op, ": ns_iters must be in [1, 100), got ", ns_iters);
  shaping.ns.coefficients =
      common::resolve_ns_coefficients(std::string(ns_preset), ns_coeffs.vec(), ns_iters, "ns_coeffs");
  shaping.ns.steps = ns_iters;
  // rollfast's quintic NS: X / (|X|_F + 1e-8).
  shaping.ns.eps = 1e-8;
  shaping.ns.eps_clamp = false;
  shaping.ns.normalization = common::parse_ns_normalization(std::string(preconditioning), "preconditioning");
  shaping.ns.dtype = ns_dtype;
  common::check_newton_schulz_options(op, shaping.ns);
  TORCH_CHECK_VALUE(grad_clip_max_amps.empty() || grad_clip_max_amps.size() == 2, op,
                    ": grad_clip_max_amps must be (rms_cap, element_cap) or empty, got ", grad_clip_max_amps.size(),
                    " values");
  if (!grad_clip_max_amps.empty()) {
    shaping.post_clip = common::PostClipOptions{grad_clip_max_amps[0], grad_clip_max_amps[1]};
    common::check_post_clip_options(op, *shaping.post_clip);
  }
  return shaping;
}

}  // namespace detail

void prism_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 at::TensorList magma_scores, at::TensorList state_steps, const at::Tensor& lr, double b1, double gamma,
                 double weight_decay, int64_t ns_iters, at::ArrayRef<double> ns_coeffs, c10::string_view ns_preset,
                 at::IntArrayRef matrix_dims, c10::string_view mode, c10::string_view preconditioning,
                 int64_t inv_steps, double inv_eps, double inv_scale, double eps_gram, std::optional<double> gamma_l,
                 std::optional<double> gamma_r, bool nesterov, bool shape_nesterov, bool bias_correction,
                 c10::string_view momentum_accumulator, at::ArrayRef<double> grad_clip_max_amps,
                 std::optional<double> raw_global_grad_clip, bool permissive_spike_protection,
                 const std::optional<at::Tensor>& raw_grad_norm, std::optional<at::ScalarType> ns_dtype, bool maximize,
                 bool use_magma, double magma_p, double magma_tau, bool stochastic_rounding, int64_t seed,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "prism_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "b1", b1, b1 >= 0.0 && b1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(momentum_accumulator == "ema" || momentum_accumulator == "heavy_ball", op,
                    ": momentum_accumulator must be 'ema' or 'heavy_ball', got '", momentum_accumulator, "'");
  const detail::PrismOptions options{b1,      momentum_accumulator == "ema", nesterov, shape_nesterov, bias_correction,
                                     maximize};
  const auto shaping =
      detail::make_prism_shaping(op, gamma, ns_iters, ns_coeffs, ns_preset, mode, preconditioning, inv_steps, inv_eps,
                                 inv_scale, eps_gram, gamma_l, gamma_r, grad_clip_max_amps, ns_dtype);
  if (raw_global_grad_clip) {
    check_hyperparameter(op, "raw_global_grad_clip", *raw_global_grad_clip,
                         std::isfinite(*raw_global_grad_clip) && *raw_global_grad_clip > 0.0, "> 0");
  }
  const common::MagmaOptions magma{magma_p, magma_tau, seed};
  common::check_magma_options(op, magma);
  if (use_magma) {
    detail::check_magma_scores(op, params, magma_scores);
  } else {
    TORCH_CHECK_VALUE(magma_scores.empty(), op, ": magma_scores must be empty without use_magma");
  }
  const auto specs = common::decode_matrix_dims(matrix_dims, params.size(), "matrix_dims");
  std::vector<common::MatrixLayout> layouts;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(specs[i] || params[i].dim() >= 2, op, ": params[", i, "] has ", params[i].dim(),
                      " dims; PRISM shapes matrices (route other tensors to the AdamW fallback)");
    layouts.push_back(common::matrix_layout(params[i].sizes(), specs[i], "matrix_dims"));
  }
  auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"momentum_buffers", momentum_buffers}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group || (group->on_cuda && !detail::begin_cuda_matrix_step(group->device))) {
    return;
  }
  const size_t n = group->params.size();
  for (auto& grad : group->grads) {
    detail::unscale_grad(grad, group->amp.grad_scale, group->device.grad_scale);
  }
  // Raw global clip over this call's grads (before maximize: the norm is
  // sign-blind). On CUDA the spike decision reads the norm on the host (one
  // sync per step, see common/clipping.h).
  double raw_scale = 1.0;
  if (raw_global_grad_clip) {
    at::Tensor norm;
    if (raw_grad_norm) {
      norm = *raw_grad_norm;
      if (group->amp.grad_scale) {
        norm = norm / *group->amp.grad_scale;
      } else if (group->device.grad_scale.defined()) {
        norm = norm / group->device.grad_scale.to(norm.device());
      }
    }
    const auto clip = raw_grad_norm
                          ? common::raw_global_clip_from_norm(norm, *raw_global_grad_clip, permissive_spike_protection)
                          : common::raw_global_clip(group->grads, *raw_global_grad_clip, permissive_spike_protection);
    if (clip.skip) {
      // Strict protection: nothing changes, the step counters included
      // (rollfast 1.1 restores the whole state on a skip).
      for (const auto& step : state_steps) {
        step.sub_(1);
      }
      group->finish();
      return;
    }
    raw_scale = clip.scale;
  }
  // Side by side on a multi-threaded CPU (as Muon), costed by the shaping's GEMM work.
  std::vector<double> costs(n);
  for (size_t i = 0; i < n; ++i) {
    costs[i] =
        static_cast<double>(group->params[i].numel()) * static_cast<double>(std::min(layouts[i].rows, layouts[i].cols));
  }
  common::run_side_by_side(costs, !group->on_cuda, [&](size_t i) {
    at::Tensor& param = group->params[i];
    at::Tensor& buffer = group->state[0][i];
    const auto index = static_cast<int64_t>(i);
    const auto scalars = detail::matrix_scalars(*group, i);
    const auto parts = detail::prism_momentum(group->grads[i], buffer, options, raw_scale, seed, index, group->steps[i],
                                              scalars.step_device);
    // (rows, cols) matrices, or (batch, rows, cols) under a spec.
    const auto& layout = layouts[i];
    const at::Tensor update = common::from_matrices(
        detail::prism_shape(common::to_matrices(parts.target, layout), common::to_matrices(parts.innovation, layout),
                            common::to_matrices(parts.grad, layout), options, shaping),
        layout, param.sizes());
    if (group->on_cuda) {
      const at::Tensor score =
          use_magma ? detail::magma_score_cuda(parts.raw_grad, parts.moment, magma_scores[i], magma_tau) : at::Tensor();
      detail::apply_matrix_update_cuda(param, update, scalars, score, magma, weight_decay, 1.0, stochastic_rounding,
                                       seed, index);
      return;
    }
    double multiplier = 1.0;
    if (use_magma) {
      at::Tensor score = magma_scores[i];
      const bool keep = common::magma_keep(magma, index, group->steps[i]);
      // Host read of a CPU scalar: no device sync (CUDA params take the branch above).
      multiplier = common::magma_multiplier(parts.raw_grad, parts.moment, score, keep, magma_tau).item<double>();
    }
    detail::apply_matrix_update(param, update, group->lr, multiplier, weight_decay, 1.0, stochastic_rounding, seed,
                                index, group->steps[i]);
  });
  group->finish();
}

void prism_nadamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                        double beta2, double eps, double weight_decay, bool maximize, bool stochastic_rounding,
                        int64_t seed, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "prism_nadamw_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  auto group =
      common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                           state_steps, lr, grad_scale, found_inf);
  if (!group || (group->on_cuda && !detail::begin_cuda_matrix_step(group->device))) {
    return;
  }
  for (size_t i = 0; i < group->params.size(); ++i) {
    at::Tensor& param = group->params[i];
    at::Tensor& exp_avg = group->state[0][i];
    at::Tensor& exp_avg_sq = group->state[1][i];
    const auto math = exp_avg.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor g = group->grads[i].to(math);
    if (group->amp.grad_scale) {
      g = g / *group->amp.grad_scale;
    } else if (group->device.grad_scale.defined()) {
      g = g / group->device.grad_scale;
    }
    if (maximize) {
      g = g.neg();
    }
    const at::Tensor m = at::lerp(exp_avg.to(math), g, 1.0 - beta1);
    const at::Tensor v = exp_avg_sq.to(math) * beta2 + g.square() * (1.0 - beta2);
    exp_avg.copy_(m);
    exp_avg_sq.copy_(v);
    if (group->on_cuda) {
      // Bias corrections from the device step when the counters live there.
      const auto scalars = detail::matrix_scalars(*group, i);
      at::Tensor update;
      if (scalars.on_device()) {
        const at::Tensor t = scalars.step_tensor();
        update =
            detail::nesterov_bias_corrected(m, g, beta1, t) / ((v / detail::one_minus_power(beta2, t)).sqrt() + eps);
      } else {
        const double t = scalars.step;
        update = detail::nesterov_bias_corrected(m, g, beta1, t) / ((v / (1.0 - std::pow(beta2, t))).sqrt() + eps);
      }
      detail::apply_matrix_update_cuda(param, update, scalars, at::Tensor(), common::MagmaOptions{}, weight_decay, 1.0,
                                       stochastic_rounding, seed, static_cast<int64_t>(i));
      continue;
    }
    const double t = group->steps[i];
    const at::Tensor m_hat = detail::nesterov_bias_corrected(m, g, beta1, t);
    const at::Tensor update = m_hat / ((v / (1.0 - std::pow(beta2, t))).sqrt() + eps);
    const double decay = 1.0 - group->lr * weight_decay;
    if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
      const uint64_t stream = kernels::cpu::rounding_stream(seed, static_cast<int64_t>(i), group->steps[i]);
      kernels::cpu::muon_apply_update_reduced(param, update.contiguous(), decay, -group->lr, stochastic_rounding,
                                              stream);
    } else {
      param.mul_(decay);
      param.add_(update.to(param.scalar_type()), -group->lr);
    }
  }
  group->finish();
}

}  // namespace torchopt_ext::functional
