#include "torchopt_ext/functional/schedulefree.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <string>
#include <vector>

#include "common/tensor_lists.h"
#include "kernels/algos/schedulefree.h"
#include "kernels/cpu/schedulefree.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {
namespace {

using common::check_hyperparameter;

double read_scalar(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? static_cast<double>(*static_cast<const float*>(t.data_ptr()))
                                       : *static_cast<const double*>(t.data_ptr());
}

// Raw write: the schema declares the mutation, and an ATen fill_ per tensor
// would cost more than the update of a small param.
void write_scalar(const at::Tensor& t, double value) {
  if (t.scalar_type() == at::kFloat) {
    *static_cast<float*>(t.data_ptr()) = static_cast<float>(value);
  } else {
    *static_cast<double*>(t.data_ptr()) = value;
  }
}

void check_common(const char* op, double weight_decay, int64_t warmup_steps, double r, double weight_lr_power) {
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "warmup_steps", static_cast<double>(warmup_steps), warmup_steps >= 0, ">= 0");
  check_hyperparameter(op, "r", r, std::isfinite(r), "finite");
  check_hyperparameter(op, "weight_lr_power", weight_lr_power, std::isfinite(weight_lr_power), "finite");
}

// The schedulefree package's per-step scalars for every tensor from its own
// host counters (kernels::schedulefree_advance, also run on the device).
std::vector<kernels::cpu::ScheduleFreeScalars> step_scalars(const std::vector<double>& steps, double lr,
                                                            at::TensorList weight_sums, at::TensorList lr_maxes,
                                                            const kernels::cpu::ScheduleFreeWeighting& weighting) {
  std::vector<kernels::cpu::ScheduleFreeScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    double weight_sum = read_scalar(weight_sums[i]);
    double lr_max = read_scalar(lr_maxes[i]);
    scalars[i] = kernels::schedulefree_advance(weighting, steps[i], lr, weight_sum, lr_max);
    write_scalar(lr_maxes[i], lr_max);
    write_scalar(weight_sums[i], weight_sum);
  }
  return scalars;
}

// weight_sums / lr_maxes live with the step counters: on the host (read and
// written here), or, for CUDA params with CUDA counters, as float64 scalars
// on the params' device (advanced by the CUDA kernel, no sync). Checked
// before anything is written.
void check_weighting_state(const char* op, at::TensorList params, at::TensorList weight_sums, at::TensorList lr_maxes,
                           at::TensorList state_steps, const at::Tensor& lr) {
  const bool on_cuda = !params.empty() && params[0].is_cuda();
  const bool device_counters = on_cuda && !state_steps.empty() && state_steps[0].is_cuda();
  if (!device_counters) {
    common::check_scalar_list(op, "weight_sums", params, weight_sums);
    common::check_scalar_list(op, "lr_maxes", params, lr_maxes);
    TORCH_CHECK_VALUE(!on_cuda || !lr.defined() || !lr.is_cuda(), op,
                      ": with CPU state_steps the per-tensor weights are computed on the host, so lr must be a CPU "
                      "tensor (or a float); keep state_steps, weight_sums and lr_maxes on the params' device to use "
                      "a CUDA lr");
    return;
  }
  for (const auto& [name, list] : {std::pair<const char*, at::TensorList>{"weight_sums", weight_sums},
                                   std::pair<const char*, at::TensorList>{"lr_maxes", lr_maxes}}) {
    TORCH_CHECK_VALUE(list.size() == params.size(), op, ": ", name, " must have one tensor per param (", params.size(),
                      "), got ", list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const auto& t = list[i];
      TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && t.scalar_type() == at::kDouble &&
                            t.device() == params[i].device() && t.is_contiguous(),
                        op, ": ", name, "[", i, "] must be a one-element float64 tensor on ", params[i].device(),
                        " (with CUDA state_steps the weighting scalars live on the params' device)");
    }
  }
}

double read_state(const char* op, const at::Tensor& sf_state, std::array<double, 4>& out) {
  TORCH_CHECK_VALUE(sf_state.defined() && sf_state.is_cpu() && sf_state.scalar_type() == at::kDouble &&
                        sf_state.numel() == 4 && sf_state.is_contiguous(),
                    op, ": sf_state must be a contiguous float64 CPU tensor of 4 values [k, weight_sum, lr_max, beta]");
  const auto* data = static_cast<const double*>(sf_state.data_ptr());
  std::copy(data, data + 4, out.begin());
  return std::max(out[3], 1e-8);  // rollfast's floor on the beta it divides by
}

// (params, zs) of a wrapper/mode pass: same length, shapes, device; dense copies.
void check_pairs(const char* op, at::TensorList params, at::TensorList zs) {
  common::check_state_list(op, "zs", params, zs);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].is_floating_point() && !params[i].is_complex(), op, ": params[", i,
                      "] must be a real floating tensor");
  }
  common::check_cpu_kernels_usable(op, params);
}

// The CPU or (CUDA params) the CUDA kernel of a (param, z) pass.
#if defined(TORCHOPT_EXT_WITH_CUDA)
#define TORCHOPT_EXT_RUN_PAIRS(params, name, ...)                                                \
  (!(params).empty() && (params)[0].is_cuda() ? ::torchopt_ext::kernels::cuda::name(__VA_ARGS__) \
                                              : ::torchopt_ext::kernels::cpu::name(__VA_ARGS__))
#else
#define TORCHOPT_EXT_RUN_PAIRS(params, name, ...) ::torchopt_ext::kernels::cpu::name(__VA_ARGS__)
#endif

template <typename Fn>
void with_dense_pairs(at::TensorList params, at::TensorList zs, const Fn& fn) {
  common::DenseWorkspace workspace;
  const auto dense_params = workspace.dense(params, true);
  const auto dense_zs = workspace.dense(zs, true);
  fn(dense_params, dense_zs);
  workspace.finish();
}

// The beta that forms y_{k+1}: b1, or with the anneal 1 - beta moving
// log-linearly from 1 - b1 to 1 - b1_max over b1_anneal_steps.
double beta_next_of(double k, double b1, int64_t b1_anneal_steps, double b1_max) {
  if (b1_anneal_steps <= 0) {
    return b1;
  }
  const double frac = std::min((k + 1.0) / static_cast<double>(b1_anneal_steps), 1.0);
  return 1.0 - std::exp((1.0 - frac) * std::log1p(-b1) + frac * std::log1p(-b1_max));
}

void check_beta_schedule(const char* op, double b1, int64_t b1_anneal_steps, double b1_max) {
  check_hyperparameter(op, "b1", b1, b1 > 0.0 && b1 <= 1.0, "in (0, 1]");
  check_hyperparameter(op, "b1_max", b1_max, b1_max > 0.0 && b1_max <= 1.0, "in (0, 1]");
  check_hyperparameter(op, "b1_anneal_steps", static_cast<double>(b1_anneal_steps), b1_anneal_steps >= 0, ">= 0");
  if (b1_anneal_steps > 0) {
    check_hyperparameter(op, "b1", b1, b1 < 1.0, "< 1 when b1_anneal_steps > 0");
    check_hyperparameter(op, "b1_max", b1_max, b1_max < 1.0, "< 1 when b1_anneal_steps > 0");
  }
}

}  // namespace

std::string schedulefree_weighting_mode(c10::string_view mode) {
  std::string lower(mode.data(), mode.size());
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
  TORCH_CHECK_VALUE(lower == "theoretical" || lower == "practical" || lower == "schedulet" || lower == "power",
                    "ScheduleFree: weighting_mode must be one of 'theoretical', 'practical', 'schedulet', 'power' ",
                    "(any case), got '", std::string(mode.data(), mode.size()), "'");
  return lower;
}

void schedulefree_adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList zs,
                              at::TensorList exp_avg_sqs, at::TensorList weight_sums, at::TensorList lr_maxes,
                              at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t warmup_steps, double r, double weight_lr_power,
                              bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "schedulefree_adamw_step_";
  check_hyperparameter(op, "beta1", beta1, beta1 > 0.0 && beta1 < 1.0, "in (0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_common(op, weight_decay, warmup_steps, r, weight_lr_power);
  check_weighting_state(op, params, weight_sums, lr_maxes, state_steps, lr);
  auto group = common::prepare_elementwise_group<2>(op, params, grads, {{{"zs", zs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  const kernels::cpu::ScheduleFreeWeighting weighting{warmup_steps, r, weight_lr_power, beta2};
  const kernels::cpu::ElementwiseOptions options{stochastic_rounding, seed, group->amp.grad_scale};
  // Device counters: the CUDA kernel advances the weights itself.
  const auto scalars = group->device.steps.empty()
                           ? step_scalars(group->steps, group->lr, weight_sums, lr_maxes, weighting)
                           : std::vector<kernels::cpu::ScheduleFreeScalars>(group->steps.size());
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (group->on_cuda) {
    kernels::cuda::schedulefree_adamw_step(group->params, group->grads, group->state[0], group->state[1], weight_sums,
                                           lr_maxes, scalars, group->steps, {beta1, beta2, eps, weight_decay},
                                           weighting, group->lr, options, group->device);
    group->finish();
    return;
  }
#endif
  kernels::cpu::schedulefree_adamw_step(group->params, group->grads, group->state[0], group->state[1], scalars,
                                        group->steps, {beta1, beta2, eps, weight_decay}, options);
  group->finish();
}

void schedulefree_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList weight_sums,
                            at::TensorList lr_maxes, at::TensorList state_steps, const at::Tensor& lr, double momentum,
                            double weight_decay, int64_t warmup_steps, double r, double weight_lr_power,
                            bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "schedulefree_sgd_step_";
  check_hyperparameter(op, "momentum", momentum, momentum > 0.0 && momentum < 1.0, "in (0, 1)");
  check_common(op, weight_decay, warmup_steps, r, weight_lr_power);
  check_weighting_state(op, params, weight_sums, lr_maxes, state_steps, lr);
  auto group =
      common::prepare_elementwise_group<1>(op, params, grads, {{{"zs", zs}}}, state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  const kernels::cpu::ScheduleFreeWeighting weighting{warmup_steps, r, weight_lr_power, 0.0};
  const kernels::cpu::ElementwiseOptions options{stochastic_rounding, seed, group->amp.grad_scale};
  const auto scalars = group->device.steps.empty()
                           ? step_scalars(group->steps, group->lr, weight_sums, lr_maxes, weighting)
                           : std::vector<kernels::cpu::ScheduleFreeScalars>(group->steps.size());
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (group->on_cuda) {
    kernels::cuda::schedulefree_sgd_step(group->params, group->grads, group->state[0], weight_sums, lr_maxes, scalars,
                                         group->steps, {momentum, weight_decay}, weighting, group->lr, options,
                                         group->device);
    group->finish();
    return;
  }
#endif
  kernels::cpu::schedulefree_sgd_step(group->params, group->grads, group->state[0], scalars, group->steps,
                                      {momentum, weight_decay}, options);
  group->finish();
}

void schedulefree_set_mode_(at::TensorList params, at::TensorList zs, double beta, bool to_eval) {
  constexpr const char* op = "schedulefree_set_mode_";
  check_hyperparameter(op, "beta", beta, beta > 0.0 && beta <= 1.0, "in (0, 1]");
  check_pairs(op, params, zs);
  if (params.empty()) {
    return;
  }
  const double weight = to_eval ? 1.0 - 1.0 / beta : 1.0 - beta;
  with_dense_pairs(params, zs, [&](at::TensorList p, at::TensorList z) {
    TORCHOPT_EXT_RUN_PAIRS(p, schedulefree_lerp_to_z, p, z, weight);
  });
}

void schedulefree_wrapper_pre_(at::TensorList params, at::TensorList zs, const at::Tensor& sf_state,
                               const at::Tensor& lr, double weight_decay_at_y, double adamc_weight_decay) {
  constexpr const char* op = "schedulefree_wrapper_pre_";
  check_hyperparameter(op, "weight_decay_at_y", weight_decay_at_y, weight_decay_at_y >= 0.0, ">= 0");
  check_hyperparameter(op, "adamc_weight_decay", adamc_weight_decay, adamc_weight_decay >= 0.0, ">= 0");
  const double lr_value = common::read_lr(op, lr);
  std::array<double, 4> state{};
  const double beta = read_state(op, sf_state, state);
  check_pairs(op, params, zs);
  if (params.empty()) {
    return;
  }
  const double decay = lr_value * weight_decay_at_y + lr_value * lr_value * adamc_weight_decay;
  with_dense_pairs(params, zs, [&](at::TensorList p, at::TensorList z) {
    TORCHOPT_EXT_RUN_PAIRS(p, schedulefree_wrapper_pre, p, z, beta, decay);
  });
}

void schedulefree_wrapper_post_(at::TensorList params, at::TensorList zs, const at::Tensor& sf_state,
                                const at::Tensor& lr, c10::string_view weighting_mode, double b1, double r,
                                double weight_lr_power, bool use_lr_max, int64_t c_warmup, int64_t b1_anneal_steps,
                                double b1_max) {
  constexpr const char* op = "schedulefree_wrapper_post_";
  const std::string mode = schedulefree_weighting_mode(weighting_mode);
  check_beta_schedule(op, b1, b1_anneal_steps, b1_max);
  check_hyperparameter(op, "r", r, std::isfinite(r), "finite");
  check_hyperparameter(op, "weight_lr_power", weight_lr_power, std::isfinite(weight_lr_power), "finite");
  check_hyperparameter(op, "c_warmup", static_cast<double>(c_warmup), c_warmup >= 0, ">= 0");
  const double gamma = common::read_lr(op, lr);
  std::array<double, 4> state{};
  read_state(op, sf_state, state);
  check_pairs(op, params, zs);
  const double k = state[0];
  double weight_sum = state[1];
  const double lr_max = std::max(state[2], gamma);
  const double g = (use_lr_max || mode == "power") ? lr_max : gamma;
  double w = 1.0;
  if (mode == "schedulet") {
    w = g;
  } else if (mode == "practical" || mode == "power") {
    w = std::pow(g, weight_lr_power);
  }
  w *= std::pow(k + 1.0, r);
  double c = 1.0;
  if (k >= static_cast<double>(c_warmup)) {
    weight_sum += w;
    c = weight_sum > 0.0 ? w / std::max(weight_sum, 1e-30) : 0.0;
  }
  const double beta_next = beta_next_of(k, b1, b1_anneal_steps, b1_max);
  if (!params.empty()) {
    with_dense_pairs(params, zs, [&](at::TensorList p, at::TensorList z) {
      TORCHOPT_EXT_RUN_PAIRS(p, schedulefree_wrapper_post, p, z, c, beta_next);
    });
  }
  auto* out = static_cast<double*>(sf_state.data_ptr());
  out[0] = k + 1.0;
  out[1] = weight_sum;
  out[2] = lr_max;
  out[3] = beta_next;
}

void schedulefree_polyak_(at::TensorList params, at::TensorList grads, at::TensorList zs,
                          const at::Tensor& polyak_state, const at::Tensor& loss, const at::Tensor& sf_state, double b1,
                          int64_t b1_anneal_steps, double b1_max, double f_star, double polyak_beta,
                          double polyak_eps) {
  constexpr const char* op = "schedulefree_polyak_";
  check_beta_schedule(op, b1, b1_anneal_steps, b1_max);
  check_hyperparameter(op, "polyak_beta", polyak_beta, polyak_beta >= 0.0 && polyak_beta < 1.0, "in [0, 1)");
  check_hyperparameter(op, "polyak_eps", polyak_eps, polyak_eps > 0.0, "> 0");
  check_hyperparameter(op, "f_star", f_star, std::isfinite(f_star), "finite");
  TORCH_CHECK_VALUE(polyak_state.defined() && polyak_state.is_cpu() && polyak_state.scalar_type() == at::kDouble &&
                        polyak_state.numel() == 3 && polyak_state.is_contiguous(),
                    op, ": polyak_state must be a contiguous float64 CPU tensor of 3 values [g1 EMA, count, rho]");
  // A CUDA loss is read on the host like rho itself (one sync per step).
  TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1 && (loss.is_cpu() || loss.is_cuda()), op,
                    ": loss must be a one-element CPU or CUDA tensor (the loss at y; Polyak needs it: pass "
                    "step(closure) or step(loss=...))");
  common::check_params_and_grads(op, params, grads);
  check_pairs(op, params, zs);
  std::array<double, 4> state{};
  const double beta_prev = read_state(op, sf_state, state);
  const double beta_next = beta_next_of(state[0], b1, b1_anneal_steps, b1_max);
  // <g, z - y> and sqrt(pi/2) ||g||_1 over every tensor, in float64.
  double inner = 0.0;
  double l1 = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor g = grads[i].to(at::kDouble);
    inner += (g * (zs[i].to(at::kDouble) - params[i].to(at::kDouble))).sum().item<double>();
    l1 += g.abs().sum().item<double>();
  }
  auto* out = static_cast<double*>(polyak_state.data_ptr());
  const double count = out[1] + 1.0;
  const double ema = polyak_beta * out[0] + (1.0 - polyak_beta) * std::sqrt(std::acos(-1.0) / 2.0) * l1;
  const double g1_hat = ema / (1.0 - std::pow(polyak_beta, count));
  const double f = loss.to(at::kDouble).item<double>();
  const double numerator = std::max(0.0, f - f_star + (beta_next / beta_prev) * inner);
  double rho = numerator / std::max(g1_hat, polyak_eps);
  if (std::isnan(rho)) {
    rho = 0.0;  // a NaN loss or gradient gives no step rather than NaN everywhere
  }
  out[0] = ema;
  out[1] = count;
  out[2] = rho;
}

}  // namespace torchopt_ext::functional
