#include "torchopt_ext/optim/radam.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/radam.h"

namespace torchopt_ext::optim {

RAdamOptions::RAdamOptions(double lr) : lr_(lr) {}

void RAdamOptions::validate() const {
  const auto [beta1, beta2] = betas();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "RAdam: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(eps() >= 0.0, "RAdam: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "RAdam: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "RAdam: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "RAdam: weight_decay must be >= 0, got ", weight_decay());
  detail::check_state_dtype("RAdam", state_dtype());
}

bool operator==(const RAdamOptions& lhs, const RAdamOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.decoupled_weight_decay() == rhs.decoupled_weight_decay() &&
         lhs.maximize() == rhs.maximize() && lhs.state_dtype() == rhs.state_dtype() &&
         lhs.stochastic_rounding() == rhs.stochastic_rounding() && lhs.seed() == rhs.seed();
}

void RAdamOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decoupled_weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void RAdamOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, decoupled_weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

double RAdamOptions::get_lr() const { return lr(); }

void RAdamOptions::set_lr(const double lr) { this->lr(lr); }

RAdam::RAdam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, RAdamOptions defaults)
    : AdamFamilyOptimizer<RAdamOptions>(param_groups, defaults) {}

RAdam::RAdam(std::vector<at::Tensor> params, RAdamOptions defaults)
    : RAdam(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
            std::move(defaults)) {}

at::Tensor RAdam::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    auto lists = adam_lists(group, /*amsgrad=*/false);
    if (lists.params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    functional::radam_step_(lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.steps,
                            at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2, options.eps(),
                            options.weight_decay(), options.decoupled_weight_decay(), options.maximize(),
                            options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void RAdam::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, RAdamOptions>(archive, *this);
}

void RAdam::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdamParamState, RAdamOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
