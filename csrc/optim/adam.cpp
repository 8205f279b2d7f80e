#include "torchopt_ext/optim/adam.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/functional/adam.h"

namespace torchopt_ext::optim {

AdamOptions::AdamOptions(double lr) : lr_(lr) {}

AdamWOptions::AdamWOptions(double lr) : AdamOptions(lr) {
  weight_decay(1e-2);
  decoupled_weight_decay(true);
}

void AdamOptions::validate() const {
  const auto [beta1, beta2] = betas();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "Adam: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(eps() >= 0.0, "Adam: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "Adam: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "Adam: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "Adam: weight_decay must be >= 0, got ", weight_decay());
  detail::check_state_dtype("Adam", state_dtype());
  common::check_magma_options("Adam", {magma_p(), magma_tau(), seed()});
}

bool operator==(const AdamOptions& lhs, const AdamOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.decoupled_weight_decay() == rhs.decoupled_weight_decay() &&
         lhs.amsgrad() == rhs.amsgrad() && lhs.maximize() == rhs.maximize() && lhs.state_dtype() == rhs.state_dtype() &&
         lhs.stochastic_rounding() == rhs.stochastic_rounding() && lhs.seed() == rhs.seed() &&
         lhs.use_magma() == rhs.use_magma() && lhs.magma_p() == rhs.magma_p() && lhs.magma_tau() == rhs.magma_tau();
}

void AdamOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decoupled_weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(use_magma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_p);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_tau);
}

void AdamOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, decoupled_weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, amsgrad);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
  // Archives written before Magma existed keep the defaults.
  torch::IValue value;
  if (archive.try_read("use_magma", value)) {
    use_magma(value.toBool());
    archive.read("magma_p", value);
    magma_p(value.toDouble());
    archive.read("magma_tau", value);
    magma_tau(value.toDouble());
  }
}

double AdamOptions::get_lr() const { return lr(); }

void AdamOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const AdamParamState& lhs, const AdamParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) &&
         same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq()) &&
         same_state_tensor(lhs.max_exp_avg_sq(), rhs.max_exp_avg_sq()) &&
         same_state_tensor(lhs.magma_score(), rhs.magma_score());
}

void AdamParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_score);
}

void AdamParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, max_exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, magma_score);
}

std::unique_ptr<AdamParamState> detail::new_adam_state(const at::Tensor& param,
                                                       const std::optional<at::ScalarType>& dtype, bool amsgrad) {
  auto fresh = std::make_unique<AdamParamState>();
  fresh->step(new_step_counter(param));
  fresh->exp_avg(zeros_state(param, dtype));
  fresh->exp_avg_sq(zeros_state(param, dtype));
  if (amsgrad) {
    fresh->max_exp_avg_sq(zeros_state(param, dtype));
  }
  return fresh;
}

Adam::Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults)
    : AdamFamilyOptimizer<AdamOptions>(param_groups, defaults) {}

Adam::Adam(std::vector<at::Tensor> params, AdamOptions defaults)
    : Adam(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

at::Tensor Adam::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    auto lists = adam_lists(group, options.amsgrad(), options.use_magma());
    if (lists.params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    if (options.use_magma()) {
      functional::adam_magma_step_(lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.max_exp_avg_sqs,
                                   lists.magma_scores, lists.steps, at::scalar_tensor(options.lr(), at::kDouble), beta1,
                                   beta2, options.eps(), options.weight_decay(),
                                   always_decoupled_ || options.decoupled_weight_decay(), options.amsgrad(),
                                   options.maximize(), options.magma_p(), options.magma_tau(),
                                   options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
      continue;
    }
    functional::adam_step_(lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.max_exp_avg_sqs,
                           lists.steps, at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2, options.eps(),
                           options.weight_decay(), always_decoupled_ || options.decoupled_weight_decay(),
                           options.amsgrad(), options.maximize(), options.stochastic_rounding(), options.seed(),
                           std::nullopt, std::nullopt);
  }
  return loss;
}

void Adam::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, AdamOptions>(archive, *this);
}

void Adam::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdamParamState, AdamOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
