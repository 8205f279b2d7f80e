#include "torchopt_ext/optim/prism.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>

#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/functional/prism.h"

namespace torchopt_ext::optim {

PRISMOptions::PRISMOptions(double lr) : lr_(lr) {}

void PRISMOptions::validate() const {
  constexpr const char* name = "PRISM";
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, name, ": lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(b1() >= 0.0 && b1() < 1.0, name, ": b1 must be in [0, 1), got ", b1());
  TORCH_CHECK_VALUE(std::isfinite(gamma()) && gamma() >= 0.0, name, ": gamma must be >= 0, got ", gamma());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, name, ": weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(ns_iters() >= 1 && ns_iters() < 100, name, ": ns_iters must be in [1, 100), got ", ns_iters());
  common::ns_coefficients_from_flat(ns_coeffs(), "ns_coeffs");
  if (!ns_preset().empty()) {
    common::ns_coefficients_preset(ns_preset(), std::max<int64_t>(ns_iters(), 1), "ns_preset");
  }
  if (matrix_dims()) {
    common::check_matrix_dims(*matrix_dims(), "matrix_dims");
  }
  TORCH_CHECK_VALUE(mode() == "original" || mode() == "bidirectional", name,
                    ": mode must be 'original' or 'bidirectional', got '", mode(), "'");
  common::parse_ns_normalization(preconditioning(), "preconditioning");
  TORCH_CHECK_VALUE(inv_steps() >= 1 && inv_steps() < 100, name, ": inv_steps must be in [1, 100), got ", inv_steps());
  TORCH_CHECK_VALUE(inv_eps() >= 0.0, name, ": inv_eps must be >= 0, got ", inv_eps());
  TORCH_CHECK_VALUE(std::isfinite(inv_scale()) && inv_scale() > 0.0, name, ": inv_scale must be > 0, got ",
                    inv_scale());
  TORCH_CHECK_VALUE(eps_gram() >= 0.0, name, ": eps_gram must be >= 0, got ", eps_gram());
  if (gamma_l()) {
    TORCH_CHECK_VALUE(*gamma_l() >= 0.0, name, ": gamma_l must be >= 0, got ", *gamma_l());
  }
  if (gamma_r()) {
    TORCH_CHECK_VALUE(*gamma_r() >= 0.0, name, ": gamma_r must be >= 0, got ", *gamma_r());
  }
  TORCH_CHECK_VALUE(momentum_accumulator() == "ema" || momentum_accumulator() == "heavy_ball", name,
                    ": momentum_accumulator must be 'ema' or 'heavy_ball', got '", momentum_accumulator(), "'");
  if (grad_clip_max_amps()) {
    const auto [rms, element] = *grad_clip_max_amps();
    common::check_post_clip_options(name, {rms, element});
  }
  if (raw_global_grad_clip()) {
    TORCH_CHECK_VALUE(std::isfinite(*raw_global_grad_clip()) && *raw_global_grad_clip() > 0.0, name,
                      ": raw_global_grad_clip must be > 0, got ", *raw_global_grad_clip());
  }
  detail::check_state_dtype("PRISM (mu_dtype)", mu_dtype());
  if (ns_dtype()) {
    TORCH_CHECK_VALUE(at::isFloatingType(*ns_dtype()), name, ": ns_dtype must be a floating dtype, got ", *ns_dtype());
  }
  if (adam_lr()) {
    TORCH_CHECK_VALUE(*adam_lr() >= 0.0, name, ": adam_lr must be >= 0, got ", *adam_lr());
  }
  const auto [beta1, beta2] = adam_betas();
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, name, ": adam_betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, name, ": adam_betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(adam_eps() >= 0.0, name, ": adam_eps must be >= 0, got ", adam_eps());
  common::check_magma_options(name, {magma_p(), magma_tau(), seed()});
  TORCH_CHECK_VALUE(!(adam_nesterov() && use_magma()), name,
                    ": Invalid adam_nesterov=true with use_magma=true: the NAdamW fallback has no Magma masking");
}

bool operator==(const PRISMOptions& lhs, const PRISMOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.b1() == rhs.b1() && lhs.gamma() == rhs.gamma() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.ns_iters() == rhs.ns_iters() &&
         lhs.ns_coeffs() == rhs.ns_coeffs() && lhs.ns_preset() == rhs.ns_preset() &&
         lhs.matrix_dims() == rhs.matrix_dims() && lhs.mode() == rhs.mode() &&
         lhs.preconditioning() == rhs.preconditioning() && lhs.inv_steps() == rhs.inv_steps() &&
         lhs.inv_eps() == rhs.inv_eps() && lhs.inv_scale() == rhs.inv_scale() && lhs.eps_gram() == rhs.eps_gram() &&
         lhs.gamma_l() == rhs.gamma_l() && lhs.gamma_r() == rhs.gamma_r() && lhs.nesterov() == rhs.nesterov() &&
         lhs.shape_nesterov() == rhs.shape_nesterov() && lhs.bias_correction() == rhs.bias_correction() &&
         lhs.momentum_accumulator() == rhs.momentum_accumulator() &&
         lhs.grad_clip_max_amps() == rhs.grad_clip_max_amps() &&
         lhs.raw_global_grad_clip() == rhs.raw_global_grad_clip() &&
         lhs.permissive_spike_protection() == rhs.permissive_spike_protection() && lhs.mu_dtype() == rhs.mu_dtype() &&
         lhs.ns_dtype() == rhs.ns_dtype() && lhs.use_prism() == rhs.use_prism() && lhs.adam_lr() == rhs.adam_lr() &&
         lhs.initial_lr() == rhs.initial_lr() && lhs.adam_betas() == rhs.adam_betas() &&
         lhs.adam_eps() == rhs.adam_eps() && lhs.adam_nesterov() == rhs.adam_nesterov() &&
         lhs.maximize() == rhs.maximize() && lhs.use_magma() == rhs.use_magma() && lhs.magma_p() == rhs.magma_p() &&
         lhs.magma_tau() == rhs.magma_tau() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

namespace {

// Optional doubles are archived as a 0- or 1-element list.
std::vector<double> encode_optional(const std::optional<double>& value) {
  return value ? std::vector<double>{*value} : std::vector<double>{};
}
std::optional<double> decode_optional(const torch::IValue& value) {
  const auto list = value.toDoubleVector();
  return list.empty() ? std::nullopt : std::optional<double>(list[0]);
}

}  // namespace

void PRISMOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(b1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gamma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_iters);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_coeffs);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_preset);
  archive.write("matrix_dims", torch::IValue(common::encode_matrix_dims(matrix_dims())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mode);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(preconditioning);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(inv_steps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(inv_eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(inv_scale);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps_gram);
  archive.write("gamma_l", torch::IValue(encode_optional(gamma_l())));
  archive.write("gamma_r", torch::IValue(encode_optional(gamma_r())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(shape_nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(bias_correction);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_accumulator);
  std::vector<double> amps;
  if (grad_clip_max_amps()) {
    amps = {std::get<0>(*grad_clip_max_amps()), std::get<1>(*grad_clip_max_amps())};
  }
  archive.write("grad_clip_max_amps", torch::IValue(amps));
  archive.write("raw_global_grad_clip", torch::IValue(encode_optional(raw_global_grad_clip())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(permissive_spike_protection);
  archive.write("mu_dtype", torch::IValue(detail::encode_dtype(mu_dtype())));
  archive.write("ns_dtype", torch::IValue(detail::encode_dtype(ns_dtype())));
  archive.write("use_prism", torch::IValue(static_cast<int64_t>(use_prism() ? (*use_prism() ? 1 : 0) : -1)));
  archive.write("adam_lr", torch::IValue(encode_optional(adam_lr())));
  archive.write("initial_lr", torch::IValue(encode_optional(initial_lr())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adam_betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adam_eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adam_nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(use_magma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_p);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_tau);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stochastic_rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
}

void PRISMOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, b1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, gamma);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, ns_iters);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::vector<double>, ns_coeffs);
  {
    // Archives written before presets and specs existed have neither key.
    torch::IValue extra;
    ns_preset(archive.try_read("ns_preset", extra) ? extra.toStringRef() : std::string());
    matrix_dims(archive.try_read("matrix_dims", extra)
                    ? common::decode_matrix_dims(extra.toIntVector(), 1, "matrix_dims")[0]
                    : std::nullopt);
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, mode);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, preconditioning);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, inv_steps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, inv_eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, inv_scale);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps_gram);
  torch::IValue value;
  archive.read("gamma_l", value);
  gamma_l(decode_optional(value));
  archive.read("gamma_r", value);
  gamma_r(decode_optional(value));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, shape_nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, bias_correction);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, momentum_accumulator);
  archive.read("grad_clip_max_amps", value);
  const auto amps = value.toDoubleVector();
  grad_clip_max_amps(amps.size() == 2 ? std::optional<amps_t>(std::make_tuple(amps[0], amps[1])) : std::nullopt);
  archive.read("raw_global_grad_clip", value);
  raw_global_grad_clip(decode_optional(value));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, permissive_spike_protection);
  archive.read("mu_dtype", value);
  mu_dtype(detail::decode_dtype(value.toInt()));
  archive.read("ns_dtype", value);
  ns_dtype(detail::decode_dtype(value.toInt()));
  archive.read("use_prism", value);
  const int64_t route = value.toInt();
  use_prism(route < 0 ? std::nullopt : std::optional<bool>(route == 1));
  archive.read("adam_lr", value);
  adam_lr(decode_optional(value));
  archive.read("initial_lr", value);
  initial_lr(decode_optional(value));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, adam_betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, adam_eps);
  {
    torch::IValue flag;  // absent in archives written before the option existed
    adam_nesterov(archive.try_read("adam_nesterov", flag) && flag.toBool());
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, use_magma);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, magma_p);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, magma_tau);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, stochastic_rounding);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
}

double PRISMOptions::get_lr() const { return lr(); }

void PRISMOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const PRISMParamState& lhs, const PRISMParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.mu(), rhs.mu()) &&
         same_state_tensor(lhs.magma_score(), rhs.magma_score()) && same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) &&
         same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq());
}

void PRISMParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mu);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_score);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
}

void PRISMParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, mu);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, magma_score);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
}

PRISM::PRISM(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, PRISMOptions defaults)
    : MatrixOptimizer(param_groups, defaults, "PRISM", "use_prism") {}

PRISM::PRISM(std::vector<at::Tensor> params, PRISMOptions defaults)
    : PRISM(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
            std::move(defaults)) {}

void PRISM::matrix_step(PRISMOptions& options, MatrixGroupLists& lists) {
  std::vector<double> amps;
  if (options.grad_clip_max_amps()) {
    amps = {std::get<0>(*options.grad_clip_max_amps()), std::get<1>(*options.grad_clip_max_amps())};
  }
  functional::prism_step_(
      lists.params, lists.grads, lists.moments, lists.scores, lists.steps, at::scalar_tensor(options.lr(), at::kDouble),
      options.b1(), options.gamma(), options.weight_decay(), options.ns_iters(), options.ns_coeffs(),
      options.ns_preset(), lists.matrix_dims, options.mode(), options.preconditioning(), options.inv_steps(),
      options.inv_eps(), options.inv_scale(), options.eps_gram(), options.gamma_l(), options.gamma_r(),
      options.nesterov(), options.shape_nesterov(), options.bias_correction(), options.momentum_accumulator(), amps,
      options.raw_global_grad_clip(), options.permissive_spike_protection(), raw_grad_norm_, options.ns_dtype(),
      options.maximize(), options.use_magma(), options.magma_p(), options.magma_tau(), options.stochastic_rounding(),
      options.seed(), std::nullopt, std::nullopt);
}

void PRISM::fallback_step(PRISMOptions& options, MatrixGroupLists& lists) {
  if (!options.adam_nesterov()) {
    MatrixOptimizer::fallback_step(options, lists);
    return;
  }
  const auto [beta1, beta2] = options.adam_betas();
  functional::prism_nadamw_step_(lists.params_adam, lists.grads_adam, lists.exp_avgs, lists.exp_avg_sqs,
                                 lists.steps_adam, at::scalar_tensor(adam_branch_lr(options), at::kDouble), beta1,
                                 beta2, options.adam_eps(), options.weight_decay(), options.maximize(),
                                 options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
}

void PRISM::before_groups() {
  raw_grad_norm_.reset();
  std::vector<at::Tensor> grads;
  for (auto& group : param_groups_) {
    const auto& options = options_of(group);
    if (!options.raw_global_grad_clip()) {
      continue;
    }
    for (const auto& param : group.params()) {
      if (param.grad().defined() && routes_to_matrix(options, param)) {
        grads.push_back(param.grad());
      }
    }
  }
  if (!grads.empty()) {
    raw_grad_norm_ = common::global_l2_norm(grads);
  }
}

}  // namespace torchopt_ext::optim
