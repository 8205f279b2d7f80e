#include "torchopt_ext/optim/soap.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/soap.h"

namespace torchopt_ext::optim {

SOAPOptions::SOAPOptions(double lr) : lr_(lr) {}

void SOAPOptions::validate() const {
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "SOAP: lr must be >= 0, got ", lr());
  const auto [beta1, beta2] = betas();
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "SOAP: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "SOAP: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(shampoo_beta() < 1.0, "SOAP: shampoo_beta must be < 1 (negative: use betas[1]), got ",
                    shampoo_beta());
  TORCH_CHECK_VALUE(eps() >= 0.0, "SOAP: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "SOAP: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(precondition_frequency() >= 1, "SOAP: precondition_frequency must be >= 1, got ",
                    precondition_frequency());
  TORCH_CHECK_VALUE(max_precond_dim() >= 1, "SOAP: max_precond_dim must be >= 1, got ", max_precond_dim());
  TORCH_CHECK_VALUE(data_format() == "channels_first" || data_format() == "channels_last",
                    "SOAP: data_format must be 'channels_first' or 'channels_last', got '", data_format(), "'");
  detail::check_state_dtype("SOAP", state_dtype());
}

bool operator==(const SOAPOptions& lhs, const SOAPOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.shampoo_beta() == rhs.shampoo_beta() &&
         lhs.eps() == rhs.eps() && lhs.weight_decay() == rhs.weight_decay() &&
         lhs.precondition_frequency() == rhs.precondition_frequency() &&
         lhs.max_precond_dim() == rhs.max_precond_dim() && lhs.merge_dims() == rhs.merge_dims() &&
         lhs.precondition_1d() == rhs.precondition_1d() && lhs.normalize_grads() == rhs.normalize_grads() &&
         lhs.data_format() == rhs.data_format() && lhs.correct_bias() == rhs.correct_bias() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void SOAPOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(shampoo_beta);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(precondition_frequency);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_precond_dim);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(merge_dims);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(precondition_1d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(normalize_grads);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(data_format);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(correct_bias);
  detail::write_storage_options(archive, *this);
}

void SOAPOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, shampoo_beta);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, precondition_frequency);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, max_precond_dim);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, merge_dims);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, precondition_1d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, normalize_grads);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, data_format);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, correct_bias);
  detail::read_storage_options(archive, *this);
}

double SOAPOptions::get_lr() const { return lr(); }

void SOAPOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const SOAPParamState& lhs, const SOAPParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) &&
         same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq()) && same_state_tensor(lhs.GG(), rhs.GG()) &&
         same_state_tensor(lhs.Q(), rhs.Q());
}

void SOAPParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(GG);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(Q);
}

void SOAPParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, GG);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, Q);
}

SOAP::SOAP(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SOAPOptions defaults)
    : OptimizerBase<SOAPOptions>(param_groups, defaults) {}

SOAP::SOAP(std::vector<at::Tensor> params, SOAPOptions defaults)
    : SOAP(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

at::Tensor SOAP::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, ggs, qs, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = state_of<SOAPParamState>(param, [&] {
        auto fresh = std::make_unique<SOAPParamState>();
        // -1: the op's first call for this param only builds the preconditioner.
        fresh->step(at::full({}, -1.0, at::kFloat));
        fresh->exp_avg(detail::zeros_state(param, options.state_dtype()));
        fresh->exp_avg_sq(detail::zeros_state(param, options.state_dtype()));
        const auto layout = functional::soap_layout(param.sizes(), options.max_precond_dim(), options.merge_dims(),
                                                    options.precondition_1d(), options.data_format());
        const auto factor_dtype = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
        fresh->GG(at::zeros({layout.factor_numel()}, param.options().dtype(factor_dtype)));
        fresh->Q(at::zeros({layout.factor_numel()}, param.options().dtype(factor_dtype)));
        return fresh;
      });
      params.push_back(param);
      grads.push_back(param.grad());
      exp_avgs.push_back(state.exp_avg());
      exp_avg_sqs.push_back(state.exp_avg_sq());
      ggs.push_back(state.GG());
      qs.push_back(state.Q());
      steps.push_back(state.step());
    }
    if (!params.empty()) {
      const auto [beta1, beta2] = options.betas();
      functional::soap_step_(params, grads, exp_avgs, exp_avg_sqs, ggs, qs, steps,
                             at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2, options.shampoo_beta(),
                             options.eps(), options.weight_decay(), options.precondition_frequency(),
                             options.max_precond_dim(), options.merge_dims(), options.precondition_1d(),
                             options.normalize_grads(), options.data_format(), options.correct_bias(),
                             options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
    }
  }
  return loss;
}

void SOAP::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<SOAPParamState, SOAPOptions>(archive, *this);
}

void SOAP::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<SOAPParamState, SOAPOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
