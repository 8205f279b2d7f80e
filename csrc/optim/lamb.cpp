#include "torchopt_ext/optim/lamb.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/lamb.h"

namespace torchopt_ext::optim {

LAMBOptions::LAMBOptions(double lr) : lr_(lr) {}

void LAMBOptions::validate() const {
  const auto [beta1, beta2] = betas();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "LAMB: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(eps() >= 0.0, "LAMB: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "LAMB: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "LAMB: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "LAMB: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(!max_grad_norm() || *max_grad_norm() > 0.0, "LAMB: max_grad_norm must be > 0 or unset, got ",
                    max_grad_norm().value_or(0.0));
  detail::check_state_dtype("LAMB", state_dtype());
}

bool operator==(const LAMBOptions& lhs, const LAMBOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.bias_correction() == rhs.bias_correction() && lhs.betas() == rhs.betas() &&
         lhs.eps() == rhs.eps() && lhs.weight_decay() == rhs.weight_decay() &&
         lhs.grad_averaging() == rhs.grad_averaging() && lhs.max_grad_norm() == rhs.max_grad_norm() &&
         lhs.trust_clip() == rhs.trust_clip() && lhs.always_adapt() == rhs.always_adapt() &&
         lhs.decoupled_decay() == rhs.decoupled_decay() && lhs.maximize() == rhs.maximize() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void LAMBOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(bias_correction);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(grad_averaging);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_grad_norm);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(trust_clip);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(always_adapt);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decoupled_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void LAMBOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, bias_correction);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, grad_averaging);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG_OPTIONAL(double, max_grad_norm);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, trust_clip);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, always_adapt);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, decoupled_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

double LAMBOptions::get_lr() const { return lr(); }

void LAMBOptions::set_lr(const double lr) { this->lr(lr); }

LAMB::LAMB(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LAMBOptions defaults)
    : AdamFamilyOptimizer<LAMBOptions>(param_groups, defaults) {}

LAMB::LAMB(std::vector<at::Tensor> params, LAMBOptions defaults)
    : LAMB(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

at::Tensor LAMB::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  // The global-norm clip spans every group, as in timm.
  std::optional<at::Tensor> grad_divisor;
  if (const auto max_grad_norm = static_cast<const LAMBOptions&>(defaults()).max_grad_norm()) {
    std::vector<at::Tensor> all_grads;
    for (auto& group : param_groups_) {
      for (auto& param : group.params()) {
        if (param.grad().defined()) {
          all_grads.push_back(param.grad());
        }
      }
    }
    grad_divisor = functional::lamb_grad_divisor(all_grads, *max_grad_norm);
  }
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    auto lists = adam_lists(group, /*amsgrad=*/false);
    if (lists.params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    functional::lamb_step_(lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.steps,
                           at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2, options.eps(),
                           options.weight_decay(), options.bias_correction(), options.grad_averaging(),
                           options.trust_clip(), options.always_adapt(), options.decoupled_decay(), options.maximize(),
                           grad_divisor, options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void LAMB::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamParamState, LAMBOptions>(archive, *this);
}

void LAMB::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdamParamState, LAMBOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
