#include "torchopt_ext/optim/qhadamw.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/qhadam.h"

namespace torchopt_ext::optim {

QHAdamWOptions::QHAdamWOptions(double lr) : lr_(lr) {}

void QHAdamWOptions::validate() const {
  const auto [beta1, beta2] = betas();
  const auto [nu1, nu2] = nus();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "QHAdamW: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(eps() >= 0.0, "QHAdamW: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "QHAdamW: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "QHAdamW: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(nu1 >= 0.0 && nu1 <= 1.0, "QHAdamW: nus[0] must be in [0, 1], got ", nu1);
  TORCH_CHECK_VALUE(nu2 >= 0.0 && nu2 <= 1.0, "QHAdamW: nus[1] must be in [0, 1], got ", nu2);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "QHAdamW: weight_decay must be >= 0, got ", weight_decay());
  detail::check_state_dtype("QHAdamW", state_dtype());
}

bool operator==(const QHAdamWOptions& lhs, const QHAdamWOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.nus() == rhs.nus() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.eps() == rhs.eps() && lhs.maximize() == rhs.maximize() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void QHAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nus);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void QHAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(nus_t, nus);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

double QHAdamWOptions::get_lr() const { return lr(); }

void QHAdamWOptions::set_lr(const double lr) { this->lr(lr); }

QHAdamW::QHAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, QHAdamWOptions defaults)
    : AdamFamilyOptimizer<QHAdamWOptions>(param_groups, defaults) {}

QHAdamW::QHAdamW(std::vector<at::Tensor> params, QHAdamWOptions defaults)
    : QHAdamW(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
              std::move(defaults)) {}

at::Tensor QHAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    auto lists = adam_lists(group, /*amsgrad=*/false);
    if (lists.params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    const auto [nu1, nu2] = options.nus();
    functional::qhadam_step_(lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.steps,
                             at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2, nu1, nu2, options.eps(),
                             options.weight_decay(),
                             /*decoupled_weight_decay=*/true, options.maximize(), options.stochastic_rounding(),
                             options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void QHAdamW::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, QHAdamWOptions>(archive, *this);
}

void QHAdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdamParamState, QHAdamWOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
