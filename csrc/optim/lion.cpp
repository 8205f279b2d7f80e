#include "torchopt_ext/optim/lion.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/lion.h"

namespace torchopt_ext::optim {

LionOptions::LionOptions(double lr) : lr_(lr) {}

void LionOptions::validate() const {
  const auto [beta1, beta2] = betas();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "Lion: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 <= 1.0, "Lion: betas[0] must be in [0, 1], got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 <= 1.0, "Lion: betas[1] must be in [0, 1], got ", beta2);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "Lion: weight_decay must be >= 0, got ", weight_decay());
  detail::check_state_dtype("Lion", state_dtype());
}

bool operator==(const LionOptions& lhs, const LionOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.weight_decay() == rhs.weight_decay() &&
         lhs.decoupled_weight_decay() == rhs.decoupled_weight_decay() && lhs.maximize() == rhs.maximize() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void LionOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decoupled_weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void LionOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, decoupled_weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

double LionOptions::get_lr() const { return lr(); }

void LionOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const LionParamState& lhs, const LionParamState& rhs) {
  return detail::same_state_tensor(lhs.step(), rhs.step()) && detail::same_state_tensor(lhs.exp_avg(), rhs.exp_avg());
}

void LionParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
}

void LionParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
}

Lion::Lion(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LionOptions defaults)
    : OptimizerBase<LionOptions>(param_groups, defaults), initial_lr_(defaults.lr()) {
  TORCH_CHECK_VALUE(!defaults.decoupled_weight_decay() || initial_lr_ > 0.0,
                    "Lion: decoupled_weight_decay divides by the initial lr, which must be > 0");
}

Lion::Lion(std::vector<at::Tensor> params, LionOptions defaults)
    : Lion(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

at::Tensor Lion::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, exp_avgs, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = state_of<LionParamState>(param, [&] {
        auto fresh = std::make_unique<LionParamState>();
        fresh->step(detail::new_step_counter(param));
        fresh->exp_avg(detail::zeros_state(param, options.state_dtype()));
        return fresh;
      });
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      params.push_back(param);
      grads.push_back(param.grad());
      exp_avgs.push_back(state.exp_avg());
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    const double weight_decay =
        options.decoupled_weight_decay() ? options.weight_decay() / initial_lr_ : options.weight_decay();
    functional::lion_step_(params, grads, exp_avgs, steps, at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2,
                           weight_decay, options.maximize(), options.stochastic_rounding(), options.seed(),
                           std::nullopt, std::nullopt);
  }
  return loss;
}

void Lion::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<LionParamState, LionOptions>(archive, *this);
}

void Lion::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<LionParamState, LionOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
