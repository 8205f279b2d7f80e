#include "torchopt_ext/optim/adafactor.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/adafactor.h"

namespace torchopt_ext::optim {

AdafactorOptions::AdafactorOptions(double lr) : lr_(lr) {}

void AdafactorOptions::validate() const {
  const auto [eps1, eps2] = eps();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "Adafactor: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(beta2_decay() <= 0.0, "Adafactor: beta2_decay must be <= 0, got ", beta2_decay());
  TORCH_CHECK_VALUE(!eps1 || *eps1 >= 0.0, "Adafactor: eps[0] (eps1) must be >= 0 or unset, got ", eps1.value_or(0.0));
  TORCH_CHECK_VALUE(eps2 >= 0.0, "Adafactor: eps[1] (eps2) must be >= 0, got ", eps2);
  TORCH_CHECK_VALUE(d() >= 1.0, "Adafactor: d (clipping threshold) must be >= 1, got ", d());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "Adafactor: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(!beta1() || (*beta1() >= 0.0 && *beta1() < 1.0),
                    "Adafactor: beta1 must be in [0, 1) or unset, got ", beta1().value_or(0.0));
  TORCH_CHECK_VALUE(!warmup_init() || relative_step(), "Adafactor: warmup_init=true requires relative_step=true");
  detail::check_state_dtype("Adafactor", state_dtype());
}

bool operator==(const AdafactorOptions& lhs, const AdafactorOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.beta2_decay() == rhs.beta2_decay() && lhs.eps() == rhs.eps() &&
         lhs.d() == rhs.d() && lhs.weight_decay() == rhs.weight_decay() && lhs.maximize() == rhs.maximize() &&
         lhs.beta1() == rhs.beta1() && lhs.relative_step() == rhs.relative_step() &&
         lhs.scale_parameter() == rhs.scale_parameter() && lhs.warmup_init() == rhs.warmup_init() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void AdafactorOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(beta2_decay);
  // The tuple holds an optional: stored as two entries (eps1 None when unset).
  archive.write("eps1", torch::IValue(std::get<0>(eps())));
  archive.write("eps2", torch::IValue(std::get<1>(eps())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(beta1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(relative_step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(scale_parameter);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(warmup_init);
  detail::write_storage_options(archive, *this);
}

void AdafactorOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, beta2_decay);
  torch::IValue eps1;
  torch::IValue eps2;
  archive.read("eps1", eps1);
  archive.read("eps2", eps2);
  eps(std::make_tuple(eps1.toOptional<double>(), eps2.toDouble()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG_OPTIONAL(double, beta1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, relative_step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, scale_parameter);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, warmup_init);
  detail::read_storage_options(archive, *this);
}

double AdafactorOptions::get_lr() const { return lr(); }

void AdafactorOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const AdafactorParamState& lhs, const AdafactorParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.row_var(), rhs.row_var()) &&
         same_state_tensor(lhs.col_var(), rhs.col_var()) && same_state_tensor(lhs.variance(), rhs.variance()) &&
         same_state_tensor(lhs.exp_avg(), rhs.exp_avg());
}

void AdafactorParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(row_var);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(col_var);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(variance);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
}

void AdafactorParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, row_var);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, col_var);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, variance);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
}

Adafactor::Adafactor(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdafactorOptions defaults)
    : OptimizerBase<AdafactorOptions>(param_groups, defaults) {}

Adafactor::Adafactor(std::vector<at::Tensor> params, AdafactorOptions defaults)
    : Adafactor(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
                std::move(defaults)) {}

namespace {

at::Tensor zeros_shaped(const at::Tensor& param, std::vector<int64_t> shape,
                        const std::optional<at::ScalarType>& dtype) {
  return at::zeros(shape, param.options().dtype(dtype.value_or(param.scalar_type())));
}

}  // namespace

at::Tensor Adafactor::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, row_vars, col_vars, variances, exp_avgs, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      const bool factored = param.dim() >= 2;
      auto& state = state_of<AdafactorParamState>(param, [&] {
        auto fresh = std::make_unique<AdafactorParamState>();
        fresh->step(detail::new_step_counter(param));
        if (factored) {
          auto row_shape = param.sizes().vec();
          row_shape.back() = 1;
          auto col_shape = param.sizes().vec();
          col_shape[col_shape.size() - 2] = 1;
          fresh->row_var(zeros_shaped(param, row_shape, options.state_dtype()));
          fresh->col_var(zeros_shaped(param, col_shape, options.state_dtype()));
        } else {
          fresh->variance(detail::zeros_state(param, options.state_dtype()));
        }
        return fresh;
      });
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      // beta1 may be switched on after the first step: its moment starts at zero then.
      if (options.beta1() && !state.exp_avg().defined()) {
        state.exp_avg(detail::zeros_state(param, options.state_dtype()));
      }
      if (factored) {
        row_vars.push_back(state.row_var());
        col_vars.push_back(state.col_var());
      } else {
        variances.push_back(state.variance());
      }
      if (options.beta1()) {
        exp_avgs.push_back(state.exp_avg());
      }
      params.push_back(param);
      grads.push_back(param.grad());
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    const auto [eps1, eps2] = options.eps();
    functional::adafactor_step_(params, grads, row_vars, col_vars, variances, exp_avgs, steps,
                                at::scalar_tensor(options.lr(), at::kDouble), options.beta2_decay(), eps1, eps2,
                                options.d(), options.weight_decay(), options.beta1(), options.relative_step(),
                                options.scale_parameter(), options.warmup_init(), options.maximize(),
                                options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void Adafactor::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdafactorParamState, AdafactorOptions>(archive, *this);
}

void Adafactor::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdafactorParamState, AdafactorOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
