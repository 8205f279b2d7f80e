#include "torchopt_ext/optim/nadamw.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/nadam.h"

namespace torchopt_ext::optim {

NAdamWOptions::NAdamWOptions(double lr) : lr_(lr) {}

void NAdamWOptions::validate() const {
  const auto [beta1, beta2] = betas();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "NAdamW: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(eps() >= 0.0, "NAdamW: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "NAdamW: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "NAdamW: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "NAdamW: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(momentum_decay() >= 0.0, "NAdamW: momentum_decay must be >= 0, got ", momentum_decay());
  detail::check_state_dtype("NAdamW", state_dtype());
}

bool operator==(const NAdamWOptions& lhs, const NAdamWOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.momentum_decay() == rhs.momentum_decay() &&
         lhs.decoupled_weight_decay() == rhs.decoupled_weight_decay() && lhs.maximize() == rhs.maximize() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void NAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decoupled_weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void NAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, decoupled_weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

double NAdamWOptions::get_lr() const { return lr(); }

void NAdamWOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const NAdamWParamState& lhs, const NAdamWParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.mu_product(), rhs.mu_product()) &&
         same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) && same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq());
}

void NAdamWParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mu_product);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
}

void NAdamWParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, mu_product);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
}

NAdamW::NAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, NAdamWOptions defaults)
    : OptimizerBase<NAdamWOptions>(param_groups, defaults) {}

NAdamW::NAdamW(std::vector<at::Tensor> params, NAdamWOptions defaults)
    : NAdamW(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
             std::move(defaults)) {}

at::Tensor NAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, mu_products, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = state_of<NAdamWParamState>(param, [&] {
        auto fresh = std::make_unique<NAdamWParamState>();
        fresh->step(detail::new_step_counter(param));
        // Lives with the counter: on a CUDA param's device the kernel advances it.
        fresh->mu_product(at::ones({}, at::TensorOptions().dtype(at::kFloat).device(detail::scalar_device(param))));
        fresh->exp_avg(detail::zeros_state(param, options.state_dtype()));
        fresh->exp_avg_sq(detail::zeros_state(param, options.state_dtype()));
        return fresh;
      });
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      state.mu_product(detail::placed_scalar(state.mu_product(), param));
      params.push_back(param);
      grads.push_back(param.grad());
      exp_avgs.push_back(state.exp_avg());
      exp_avg_sqs.push_back(state.exp_avg_sq());
      mu_products.push_back(state.mu_product());
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    functional::nadam_step_(
        params, grads, exp_avgs, exp_avg_sqs, mu_products, steps, at::scalar_tensor(options.lr(), at::kDouble), beta1,
        beta2, options.eps(), options.weight_decay(), options.momentum_decay(), options.decoupled_weight_decay(),
        options.maximize(), options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void NAdamW::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<NAdamWParamState, NAdamWOptions>(archive, *this);
}

void NAdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<NAdamWParamState, NAdamWOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
