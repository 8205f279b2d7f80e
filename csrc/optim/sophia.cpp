#include "torchopt_ext/optim/sophia.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/sophia.h"
#include "torchopt_ext/hessian.h"

namespace torchopt_ext::optim {
namespace {

// Checks shared by both option types; `scale_name` is gamma or rho.
template <typename Options>
void validate_common(const char* name, const Options& o, const char* scale_name) {
  const auto [beta1, beta2] = o.betas();
  TORCH_CHECK_VALUE(std::isfinite(o.lr()) && o.lr() >= 0.0, name, ": lr must be >= 0, got ", o.lr());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, name, ": betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, name, ": betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(o.curvature_scale()) && o.curvature_scale() >= 0.0, name, ": ", scale_name,
                    " must be >= 0, got ", o.curvature_scale());
  TORCH_CHECK_VALUE(o.weight_decay() >= 0.0, name, ": weight_decay must be >= 0, got ", o.weight_decay());
  TORCH_CHECK_VALUE(std::isfinite(o.eps()) && o.eps() > 0.0, name, ": eps must be > 0, got ", o.eps());
  TORCH_CHECK_VALUE(o.eps_mode() == "max" || o.eps_mode() == "add", name,
                    ": eps_mode must be \"max\" or \"add\", got \"", o.eps_mode(), "\"");
  TORCH_CHECK_VALUE(o.update_period() >= 1, name, ": update_period must be >= 1, got ", o.update_period());
  detail::check_state_dtype(name, o.state_dtype());
}

template <typename T>
void write_value(torch::serialize::OutputArchive& archive, const char* key, const T& value) {
  archive.write(key, torch::IValue(value));
}

}  // namespace

// ---- options ----------------------------------------------------------------

SophiaHOptions::SophiaHOptions(double lr) : lr_(lr) {}
SophiaGOptions::SophiaGOptions(double lr) : lr_(lr) {}

void SophiaHOptions::validate() const {
  validate_common("SophiaH", *this, "gamma");
  TORCH_CHECK_VALUE(n_samples() >= 1, "SophiaH: n_samples must be >= 1, got ", n_samples());
  TORCH_CHECK_VALUE(distribution() == "rademacher" || distribution() == "gaussian",
                    "SophiaH: distribution must be \"rademacher\" or \"gaussian\", got \"", distribution(), "\"");
}

void SophiaGOptions::validate() const { validate_common("SophiaG", *this, "rho"); }

bool operator==(const SophiaHOptions& lhs, const SophiaHOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.gamma() == rhs.gamma() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.eps() == rhs.eps() && lhs.eps_mode() == rhs.eps_mode() &&
         lhs.update_period() == rhs.update_period() && lhs.n_samples() == rhs.n_samples() &&
         lhs.distribution() == rhs.distribution() && lhs.maximize() == rhs.maximize() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

bool operator==(const SophiaGOptions& lhs, const SophiaGOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.rho() == rhs.rho() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.maximize() == rhs.maximize() && lhs.eps() == rhs.eps() &&
         lhs.eps_mode() == rhs.eps_mode() && lhs.update_period() == rhs.update_period() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void SophiaHOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gamma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps_mode);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(update_period);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(n_samples);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(distribution);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  detail::write_storage_options(archive, *this);
}

void SophiaHOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, gamma);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, eps_mode);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, update_period);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, n_samples);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, distribution);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  detail::read_storage_options(archive, *this);
}

void SophiaGOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(rho);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps_mode);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(update_period);
  detail::write_storage_options(archive, *this);
}

void SophiaGOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, rho);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, eps_mode);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, update_period);
  detail::read_storage_options(archive, *this);
}

double SophiaHOptions::get_lr() const { return lr(); }
void SophiaHOptions::set_lr(const double lr) { this->lr(lr); }
double SophiaGOptions::get_lr() const { return lr(); }
void SophiaGOptions::set_lr(const double lr) { this->lr(lr); }

// ---- state ------------------------------------------------------------------

bool operator==(const SophiaParamState& lhs, const SophiaParamState& rhs) {
  return detail::same_state_tensor(lhs.step(), rhs.step()) && detail::same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) &&
         detail::same_state_tensor(lhs.hessian(), rhs.hessian());
}

void SophiaParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(hessian);
}

void SophiaParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, hessian);
}

// ---- shared optimizer -----------------------------------------------------------

template <typename Options>
SophiaBase<Options>::SophiaBase(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                                const Options& defaults)
    : OptimizerBase<Options>(param_groups, defaults),
      generator_(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(defaults.seed()))) {}

template <typename Options>
SophiaParamState& SophiaBase<Options>::state_for(const at::Tensor& param, const Options& options) {
  return this->template state_of<SophiaParamState>(param, [&] {
    auto fresh = std::make_unique<SophiaParamState>();
    fresh->step(detail::new_step_counter(param));
    fresh->exp_avg(detail::zeros_state(param, options.state_dtype()));
    fresh->hessian(detail::zeros_state(param, options.state_dtype()));
    return fresh;
  });
}

template <typename Options>
at::Tensor SophiaBase<Options>::step(torch::optim::Optimizer::LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = this->run_closure(closure);
  for (auto& group : this->param_groups_) {
    auto& options = this->options_of(group);
    std::vector<at::Tensor> params, grads, exp_avgs, hessians, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = state_for(param, options);
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      params.push_back(param);
      grads.push_back(param.grad());
      exp_avgs.push_back(state.exp_avg());
      hessians.push_back(state.hessian());
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    functional::sophia_step_(params, grads, exp_avgs, hessians, steps, at::scalar_tensor(options.lr(), at::kDouble),
                             std::get<0>(options.betas()), options.curvature_scale(), options.eps(),
                             options.weight_decay(), options.eps_mode(), options.maximize(),
                             options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

template <typename Options>
std::vector<std::pair<size_t, at::Tensor>> SophiaBase<Options>::next_due_params() {
  const int64_t call = hessian_calls_++;
  std::vector<std::pair<size_t, at::Tensor>> due;
  for (size_t g = 0; g < this->param_groups_.size(); ++g) {
    auto& group = this->param_groups_[g];
    if (call % this->options_of(group).update_period() != 0) {
      continue;
    }
    for (const auto& param : group.params()) {
      if (param.requires_grad()) {
        due.emplace_back(g, param);
      }
    }
  }
  return due;
}

template <typename Options>
void SophiaBase<Options>::apply_estimates(const std::vector<std::pair<size_t, at::Tensor>>& targets,
                                          const std::vector<at::Tensor>& estimates) {
  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < this->param_groups_.size(); ++g) {
    auto& options = this->options_of(this->param_groups_[g]);
    std::vector<at::Tensor> hessians, values;
    for (size_t i = 0; i < targets.size(); ++i) {
      if (targets[i].first == g && estimates[i].defined()) {
        hessians.push_back(state_for(targets[i].second, options).hessian());
        values.push_back(estimates[i].detach());
      }
    }
    if (!hessians.empty()) {
      functional::sophia_update_hessian_(hessians, values, std::get<1>(options.betas()));
    }
  }
}

template <typename Options>
void SophiaBase<Options>::update_hessian(const std::vector<at::Tensor>& estimates) {
  std::vector<std::pair<size_t, at::Tensor>> targets;
  for (size_t g = 0; g < this->param_groups_.size(); ++g) {
    for (const auto& param : this->param_groups_[g].params()) {
      targets.emplace_back(g, param);
    }
  }
  TORCH_CHECK_VALUE(estimates.size() == targets.size(), "update_hessian: got ", estimates.size(),
                    " estimates but the optimizer has ", targets.size(), " params");
  apply_estimates(targets, estimates);
}

template <typename Options>
void SophiaBase<Options>::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<SophiaParamState, Options>(archive, *this);
  // The refresh schedule and the probe stream resume where they were.
  write_value(archive, "hessian_calls", hessian_calls_);
  archive.write("generator_state", generator_.get_state());
}

template <typename Options>
void SophiaBase<Options>::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<SophiaParamState, Options>(archive, *this);
  torch::IValue calls;
  if (archive.try_read("hessian_calls", calls)) {
    hessian_calls_ = calls.toInt();
  }
  at::Tensor generator_state;
  if (archive.try_read("generator_state", generator_state)) {
    generator_.set_state(generator_state);
  }
}

template class SophiaBase<SophiaHOptions>;
template class SophiaBase<SophiaGOptions>;

// ---- SophiaH / SophiaG ------------------------------------------------------------

SophiaH::SophiaH(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SophiaHOptions defaults)
    : SophiaBase<SophiaHOptions>(param_groups, defaults) {}

SophiaH::SophiaH(std::vector<at::Tensor> params, SophiaHOptions defaults)
    : SophiaH(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
              std::move(defaults)) {}

at::Tensor SophiaH::update_hessian(const std::function<at::Tensor()>& closure) {
  TORCH_CHECK_VALUE(static_cast<bool>(closure), "SophiaH::update_hessian: closure must be callable");
  const auto due = next_due_params();
  if (due.empty()) {
    return {};
  }
  at::AutoGradMode enable_grad(true);
  at::Tensor loss = closure();
  std::vector<at::Tensor> params;
  for (const auto& entry : due) {
    params.push_back(entry.second);
  }
  const auto& first = options_of(param_groups_.front());
  const auto estimates = hessian::hutchinson(loss, params, generator(), first.n_samples(), first.distribution());
  apply_estimates(due, estimates);
  return loss;
}

SophiaG::SophiaG(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SophiaGOptions defaults)
    : SophiaBase<SophiaGOptions>(param_groups, defaults) {}

SophiaG::SophiaG(std::vector<at::Tensor> params, SophiaGOptions defaults)
    : SophiaG(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
              std::move(defaults)) {}

at::Tensor SophiaG::update_hessian(const std::function<at::Tensor()>& closure) {
  TORCH_CHECK_VALUE(static_cast<bool>(closure), "SophiaG::update_hessian: closure must be callable");
  const auto due = next_due_params();
  if (due.empty()) {
    return {};
  }
  at::AutoGradMode enable_grad(true);
  at::Tensor logits = closure();
  std::vector<at::Tensor> params;
  for (const auto& entry : due) {
    params.push_back(entry.second);
  }
  const auto estimates = hessian::gauss_newton_bartlett(logits, params, generator());
  apply_estimates(due, estimates);
  return logits;
}

}  // namespace torchopt_ext::optim
