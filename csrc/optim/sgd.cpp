#include "torchopt_ext/optim/sgd.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/sgd.h"

namespace torchopt_ext::optim {

SGDOptions::SGDOptions(double lr) : lr_(lr) {}

void SGDOptions::validate() const {
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "SGD: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(momentum() >= 0.0, "SGD: momentum must be >= 0, got ", momentum());
  TORCH_CHECK_VALUE(dampening() >= 0.0 && dampening() <= 1.0, "SGD: dampening must be in [0, 1], got ", dampening());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "SGD: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(!nesterov() || (momentum() > 0.0 && dampening() == 0.0),
                    "SGD: nesterov requires momentum > 0 and dampening = 0, got momentum=", momentum(),
                    ", dampening=", dampening());
  detail::check_state_dtype("SGD", state_dtype());
}

bool operator==(const SGDOptions& lhs, const SGDOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.momentum() == rhs.momentum() && lhs.dampening() == rhs.dampening() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.nesterov() == rhs.nesterov() &&
         lhs.maximize() == rhs.maximize() && lhs.state_dtype() == rhs.state_dtype() &&
         lhs.stochastic_rounding() == rhs.stochastic_rounding() && lhs.seed() == rhs.seed();
}

void SGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dampening);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void SGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, dampening);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

double SGDOptions::get_lr() const { return lr(); }

void SGDOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const SGDParamState& lhs, const SGDParamState& rhs) {
  return detail::same_state_tensor(lhs.step(), rhs.step()) &&
         detail::same_state_tensor(lhs.momentum_buffer(), rhs.momentum_buffer());
}

void SGDParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
}

void SGDParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, momentum_buffer);
}

SGD::SGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SGDOptions defaults)
    : OptimizerBase<SGDOptions>(param_groups, defaults) {}

SGD::SGD(std::vector<at::Tensor> params, SGDOptions defaults)
    : SGD(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
          std::move(defaults)) {}

at::Tensor SGD::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    const bool has_momentum = options.momentum() != 0.0;
    std::vector<at::Tensor> params, grads, buffers, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = state_of<SGDParamState>(param, [&] {
        auto fresh = std::make_unique<SGDParamState>();
        fresh->step(detail::new_step_counter(param));
        return fresh;
      });
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      if (has_momentum && !state.momentum_buffer().defined()) {
        // Created when momentum is first used; the kernel fills it with the
        // gradient on the first momentum step.
        state.momentum_buffer(detail::zeros_state(param, options.state_dtype()));
        state.step(detail::new_step_counter(param));
      }
      params.push_back(param);
      grads.push_back(param.grad());
      if (has_momentum) {
        buffers.push_back(state.momentum_buffer());
      }
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    functional::sgd_step_(params, grads, buffers, steps, at::scalar_tensor(options.lr(), at::kDouble),
                          options.momentum(), options.dampening(), options.weight_decay(), options.nesterov(),
                          options.maximize(), options.stochastic_rounding(), options.seed(), std::nullopt,
                          std::nullopt);
  }
  return loss;
}

void SGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<SGDParamState, SGDOptions>(archive, *this);
}

void SGD::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<SGDParamState, SGDOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
