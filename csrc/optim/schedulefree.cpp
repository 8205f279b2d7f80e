#include "torchopt_ext/optim/schedulefree.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>
#include <string>

#include "torchopt_ext/functional/schedulefree.h"
#include "torchopt_ext/optim/adamw.h"

namespace torchopt_ext::optim {
namespace {

void check_schedule(const char* name, double lr, double weight_decay, int64_t warmup_steps, double r,
                    double weight_lr_power, const std::optional<at::ScalarType>& state_dtype) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0.0, name, ": lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, name, ": weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(warmup_steps >= 0, name, ": warmup_steps must be >= 0, got ", warmup_steps);
  TORCH_CHECK_VALUE(std::isfinite(r), name, ": r must be finite, got ", r);
  TORCH_CHECK_VALUE(std::isfinite(weight_lr_power), name, ": weight_lr_power must be finite, got ", weight_lr_power);
  detail::check_state_dtype(name, state_dtype);
}

// Weights live with the step counter (on a CUDA param's device the kernel advances them).
at::Tensor scalar_state(double value, const at::Tensor& param) {
  return at::full({}, value, at::TensorOptions().dtype(at::kDouble).device(detail::scalar_device(param)));
}

// Moves loaded counters and weights next to the param (host ones from a
// checkpoint onto a CUDA param's device); nothing moves when they are there.
void place_scalars(ScheduleFreeParamState& state, const at::Tensor& param) {
  state.step(detail::placed_step(state.step(), param));
  state.weight_sum(detail::placed_scalar(state.weight_sum(), param));
  state.lr_max(detail::placed_scalar(state.lr_max(), param));
}

// State of a param on its first step: z = copy of the param (in state_dtype).
std::unique_ptr<ScheduleFreeParamState> fresh_state(const at::Tensor& param,
                                                    const std::optional<at::ScalarType>& state_dtype, bool adam) {
  auto state = std::make_unique<ScheduleFreeParamState>();
  state->step(detail::new_step_counter(param));
  state->z(param.detach().to(state_dtype.value_or(param.scalar_type()), /*non_blocking=*/false, /*copy=*/true,
                             at::MemoryFormat::Preserve));
  if (adam) {
    state->exp_avg_sq(detail::zeros_state(param, state_dtype));
  }
  state->weight_sum(scalar_state(0.0, param));
  state->lr_max(scalar_state(-1.0, param));  // as the schedulefree package: any lr >= 0 replaces it
  return state;
}

// y <-> x for every param of the group that has state.
void switch_group(torch::optim::OptimizerParamGroup& group,
                  const ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>>& states,
                  double beta, bool to_eval) {
  std::vector<at::Tensor> params, zs;
  for (auto& param : group.params()) {
    auto it = states.find(param.unsafeGetTensorImpl());
    if (it == states.end()) {
      continue;
    }
    params.push_back(param);
    zs.push_back(static_cast<const ScheduleFreeParamState&>(*it->second).z());
  }
  if (!params.empty()) {
    torch::NoGradGuard no_grad;
    functional::schedulefree_set_mode_(params, zs, beta, to_eval);
  }
}

// eval() / train() of the fused optimizers: every group not yet in the
// requested mode switches; beta_of(options) is the interpolation's beta.
template <typename Options, typename BetaOf>
void switch_groups(std::vector<torch::optim::OptimizerParamGroup>& groups,
                   const ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>>& states,
                   bool train, const BetaOf& beta_of) {
  for (auto& group : groups) {
    auto& options = static_cast<Options&>(group.options());
    if (options.train_mode() != train) {
      switch_group(group, states, beta_of(options), /*to_eval=*/!train);
      options.train_mode(train);
    }
  }
}

void check_train_mode(const char* name, bool train_mode) {
  TORCH_CHECK(train_mode, name,
              ".step() called in eval mode: the params hold the averaged point x; call train() before training steps");
}

}  // namespace

// --- options -----------------------------------------------------------------

ScheduleFreeAdamWOptions::ScheduleFreeAdamWOptions(double lr) : lr_(lr) {}

void ScheduleFreeAdamWOptions::validate() const {
  const auto [beta1, beta2] = betas();
  check_schedule("ScheduleFreeAdamW", lr(), weight_decay(), warmup_steps(), r(), weight_lr_power(), state_dtype());
  TORCH_CHECK_VALUE(beta1 > 0.0 && beta1 < 1.0, "ScheduleFreeAdamW: betas[0] must be in (0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "ScheduleFreeAdamW: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps() >= 0.0, "ScheduleFreeAdamW: eps must be >= 0, got ", eps());
}

bool operator==(const ScheduleFreeAdamWOptions& lhs, const ScheduleFreeAdamWOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.warmup_steps() == rhs.warmup_steps() && lhs.r() == rhs.r() &&
         lhs.weight_lr_power() == rhs.weight_lr_power() && lhs.train_mode() == rhs.train_mode() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void ScheduleFreeAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(warmup_steps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(r);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_lr_power);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(train_mode);
  detail::write_storage_options(archive, *this);
}

void ScheduleFreeAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, warmup_steps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, r);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_lr_power);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, train_mode);
  detail::read_storage_options(archive, *this);
}

double ScheduleFreeAdamWOptions::get_lr() const { return lr(); }

void ScheduleFreeAdamWOptions::set_lr(const double lr) { this->lr(lr); }

ScheduleFreeSGDOptions::ScheduleFreeSGDOptions(double lr) : lr_(lr) {}

void ScheduleFreeSGDOptions::validate() const {
  check_schedule("ScheduleFreeSGD", lr(), weight_decay(), warmup_steps(), r(), weight_lr_power(), state_dtype());
  TORCH_CHECK_VALUE(momentum() > 0.0 && momentum() < 1.0, "ScheduleFreeSGD: momentum must be in (0, 1), got ",
                    momentum());
}

bool operator==(const ScheduleFreeSGDOptions& lhs, const ScheduleFreeSGDOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.momentum() == rhs.momentum() && lhs.weight_decay() == rhs.weight_decay() &&
         lhs.warmup_steps() == rhs.warmup_steps() && lhs.r() == rhs.r() &&
         lhs.weight_lr_power() == rhs.weight_lr_power() && lhs.train_mode() == rhs.train_mode() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void ScheduleFreeSGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(warmup_steps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(r);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_lr_power);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(train_mode);
  detail::write_storage_options(archive, *this);
}

void ScheduleFreeSGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, warmup_steps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, r);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_lr_power);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, train_mode);
  detail::read_storage_options(archive, *this);
}

double ScheduleFreeSGDOptions::get_lr() const { return lr(); }

void ScheduleFreeSGDOptions::set_lr(const double lr) { this->lr(lr); }

// --- param state ---------------------------------------------------------------

bool operator==(const ScheduleFreeParamState& lhs, const ScheduleFreeParamState& rhs) {
  return detail::same_state_tensor(lhs.step(), rhs.step()) && detail::same_state_tensor(lhs.z(), rhs.z()) &&
         detail::same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq()) &&
         detail::same_state_tensor(lhs.weight_sum(), rhs.weight_sum()) &&
         detail::same_state_tensor(lhs.lr_max(), rhs.lr_max());
}

void ScheduleFreeParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(z);
  if (exp_avg_sq().defined()) {  // AdamW only
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  }
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_sum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr_max);
}

void ScheduleFreeParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, z);
  at::Tensor exp_avg_sq;
  if (archive.try_read("exp_avg_sq", exp_avg_sq)) {
    this->exp_avg_sq(exp_avg_sq);
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, weight_sum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, lr_max);
}

// --- fused optimizers -------------------------------------------------------------

ScheduleFreeAdamW::ScheduleFreeAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                                     ScheduleFreeAdamWOptions defaults)
    : OptimizerBase<ScheduleFreeAdamWOptions>(param_groups, defaults) {}

ScheduleFreeAdamW::ScheduleFreeAdamW(std::vector<at::Tensor> params, ScheduleFreeAdamWOptions defaults)
    : ScheduleFreeAdamW(
          std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
          std::move(defaults)) {}

at::Tensor ScheduleFreeAdamW::step(LossClosure closure) {
  for (auto& group : param_groups_) {
    check_train_mode("ScheduleFreeAdamW", options_of(group).train_mode());
  }
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, zs, exp_avg_sqs, weight_sums, lr_maxes, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state =
          state_of<ScheduleFreeParamState>(param, [&] { return fresh_state(param, options.state_dtype(), true); });
      place_scalars(state, param);
      params.push_back(param);
      grads.push_back(param.grad());
      zs.push_back(state.z());
      exp_avg_sqs.push_back(state.exp_avg_sq());
      weight_sums.push_back(state.weight_sum());
      lr_maxes.push_back(state.lr_max());
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    const auto [beta1, beta2] = options.betas();
    functional::schedulefree_adamw_step_(
        params, grads, zs, exp_avg_sqs, weight_sums, lr_maxes, steps, at::scalar_tensor(options.lr(), at::kDouble),
        beta1, beta2, options.eps(), options.weight_decay(), options.warmup_steps(), options.r(),
        options.weight_lr_power(), options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void ScheduleFreeAdamW::eval() {
  switch_groups<ScheduleFreeAdamWOptions>(param_groups_, state_, /*train=*/false,
                                          [](const ScheduleFreeAdamWOptions& o) { return std::get<0>(o.betas()); });
}

void ScheduleFreeAdamW::train() {
  switch_groups<ScheduleFreeAdamWOptions>(param_groups_, state_, /*train=*/true,
                                          [](const ScheduleFreeAdamWOptions& o) { return std::get<0>(o.betas()); });
}

void ScheduleFreeAdamW::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<ScheduleFreeParamState, ScheduleFreeAdamWOptions>(archive, *this);
}

void ScheduleFreeAdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<ScheduleFreeParamState, ScheduleFreeAdamWOptions>(archive, *this);
}

ScheduleFreeSGD::ScheduleFreeSGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                                 ScheduleFreeSGDOptions defaults)
    : OptimizerBase<ScheduleFreeSGDOptions>(param_groups, defaults) {}

ScheduleFreeSGD::ScheduleFreeSGD(std::vector<at::Tensor> params, ScheduleFreeSGDOptions defaults)
    : ScheduleFreeSGD(
          std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
          std::move(defaults)) {}

at::Tensor ScheduleFreeSGD::step(LossClosure closure) {
  for (auto& group : param_groups_) {
    check_train_mode("ScheduleFreeSGD", options_of(group).train_mode());
  }
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, zs, weight_sums, lr_maxes, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state =
          state_of<ScheduleFreeParamState>(param, [&] { return fresh_state(param, options.state_dtype(), false); });
      place_scalars(state, param);
      params.push_back(param);
      grads.push_back(param.grad());
      zs.push_back(state.z());
      weight_sums.push_back(state.weight_sum());
      lr_maxes.push_back(state.lr_max());
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    functional::schedulefree_sgd_step_(
        params, grads, zs, weight_sums, lr_maxes, steps, at::scalar_tensor(options.lr(), at::kDouble),
        options.momentum(), options.weight_decay(), options.warmup_steps(), options.r(), options.weight_lr_power(),
        options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void ScheduleFreeSGD::eval() {
  switch_groups<ScheduleFreeSGDOptions>(param_groups_, state_, /*train=*/false,
                                        [](const ScheduleFreeSGDOptions& o) { return o.momentum(); });
}

void ScheduleFreeSGD::train() {
  switch_groups<ScheduleFreeSGDOptions>(param_groups_, state_, /*train=*/true,
                                        [](const ScheduleFreeSGDOptions& o) { return o.momentum(); });
}

void ScheduleFreeSGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<ScheduleFreeParamState, ScheduleFreeSGDOptions>(archive, *this);
}

void ScheduleFreeSGD::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<ScheduleFreeParamState, ScheduleFreeSGDOptions>(archive, *this);
}

// --- generic wrapper ----------------------------------------------------------------

void ScheduleFreeOptions::validate() const {
  functional::schedulefree_weighting_mode(weighting_mode());
  TORCH_CHECK_VALUE(b1() > 0.0 && b1() <= 1.0, "ScheduleFree: b1 must be in (0, 1], got ", b1());
  TORCH_CHECK_VALUE(b1_max() > 0.0 && b1_max() <= 1.0, "ScheduleFree: b1_max must be in (0, 1], got ", b1_max());
  TORCH_CHECK_VALUE(b1_anneal_steps() == 0 || (b1() < 1.0 && b1_max() < 1.0),
                    "ScheduleFree: b1 and b1_max must be < 1 when b1_anneal_steps > 0");
  TORCH_CHECK_VALUE(std::isfinite(r()), "ScheduleFree: r must be finite, got ", r());
  TORCH_CHECK_VALUE(std::isfinite(weight_lr_power()), "ScheduleFree: weight_lr_power must be finite, got ",
                    weight_lr_power());
  TORCH_CHECK_VALUE(c_warmup() >= 0, "ScheduleFree: c_warmup must be >= 0, got ", c_warmup());
  TORCH_CHECK_VALUE(b1_anneal_steps() >= 0, "ScheduleFree: b1_anneal_steps must be >= 0, got ", b1_anneal_steps());
  TORCH_CHECK_VALUE(weight_decay_at_y() >= 0.0, "ScheduleFree: weight_decay_at_y must be >= 0, got ",
                    weight_decay_at_y());
  TORCH_CHECK_VALUE(adamc_weight_decay() >= 0.0, "ScheduleFree: adamc_weight_decay must be >= 0, got ",
                    adamc_weight_decay());
  detail::check_state_dtype("ScheduleFree", state_dtype());
  TORCH_CHECK_VALUE(lr_max_init() >= 0.0, "ScheduleFree: lr_max_init must be >= 0, got ", lr_max_init());
  TORCH_CHECK_VALUE(polyak_beta() >= 0.0 && polyak_beta() < 1.0, "ScheduleFree: polyak_beta must be in [0, 1), got ",
                    polyak_beta());
  TORCH_CHECK_VALUE(polyak_eps() > 0.0, "ScheduleFree: polyak_eps must be > 0, got ", polyak_eps());
  TORCH_CHECK_VALUE(std::isfinite(polyak_f_star()), "ScheduleFree: polyak_f_star must be finite, got ",
                    polyak_f_star());
}

ScheduleFree::ScheduleFree(std::shared_ptr<torch::optim::Optimizer> base, ScheduleFreeOptions options)
    : base_(std::move(base)), options_(std::move(options)) {
  TORCH_CHECK_VALUE(base_ != nullptr, "ScheduleFree: base optimizer must not be null");
  options_.validate();
  mode_ = functional::schedulefree_weighting_mode(options_.weighting_mode());
  polyak_state_ = at::tensor({0.0, 0.0, 1.0}, at::TensorOptions().dtype(at::kDouble));
}

const at::Tensor& ScheduleFree::sf_state(size_t group) {
  while (sf_state_.size() <= group) {
    sf_state_.push_back(
        at::tensor({0.0, 0.0, options_.lr_max_init(), options_.b1()}, at::TensorOptions().dtype(at::kDouble)));
  }
  return sf_state_[group];
}

void ScheduleFree::zero_grad(bool set_to_none) { base_->zero_grad(set_to_none); }

at::Tensor ScheduleFree::step(torch::optim::Optimizer::LossClosure closure, at::Tensor loss) {
  TORCH_CHECK(train_mode_,
              "ScheduleFree.step() called in eval mode: the params hold the averaged point x; call train() before "
              "training steps");
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;
  auto& groups = base_->param_groups();
  std::vector<std::vector<at::Tensor>> params(groups.size()), zs(groups.size());
  std::vector<at::Tensor> lrs(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    for (auto& param : groups[g].params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& z = z_[param.unsafeGetTensorImpl()];
      if (!z.defined()) {
        z = param.detach().to(options_.state_dtype().value_or(param.scalar_type()), false, true,
                              at::MemoryFormat::Preserve);
      }
      params[g].push_back(param);
      zs[g].push_back(z);
    }
  }
  double rho = 1.0;
  if (options_.polyak()) {
    TORCH_CHECK_VALUE(loss.defined(), "ScheduleFree(polyak=true).step() needs the loss: pass a closure or loss");
    std::vector<at::Tensor> all_params, all_grads, all_zs;
    for (size_t g = 0; g < groups.size(); ++g) {
      for (size_t i = 0; i < params[g].size(); ++i) {
        all_params.push_back(params[g][i]);
        all_grads.push_back(params[g][i].grad());
        all_zs.push_back(zs[g][i]);
      }
    }
    functional::schedulefree_polyak_(all_params, all_grads, all_zs, polyak_state_,
                                     loss.detach().to(at::kCPU).reshape({}), sf_state(0), options_.b1(),
                                     options_.b1_anneal_steps(), options_.b1_max(), options_.polyak_f_star(),
                                     options_.polyak_beta(), options_.polyak_eps());
    rho = polyak_state_[2].item<double>();  // CPU tensor: no device sync
  }
  std::vector<double> base_lrs(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    base_lrs[g] = groups[g].options().get_lr();
    lrs[g] = at::scalar_tensor(base_lrs[g] * rho, at::kDouble);
    functional::schedulefree_wrapper_pre_(params[g], zs[g], sf_state(g), lrs[g], options_.weight_decay_at_y(),
                                          options_.adamc_weight_decay());
  }
  if (options_.polyak()) {
    // gamma_eff = rho * gamma for the base step too (exact for updates linear in lr); restored after.
    for (size_t g = 0; g < groups.size(); ++g) {
      groups[g].options().set_lr(base_lrs[g] * rho);
    }
    base_->step();
    for (size_t g = 0; g < groups.size(); ++g) {
      groups[g].options().set_lr(base_lrs[g]);
    }
  } else {
    base_->step();
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    functional::schedulefree_wrapper_post_(params[g], zs[g], sf_state(g), lrs[g], mode_, options_.b1(), options_.r(),
                                           options_.weight_lr_power(), options_.use_lr_max(), options_.c_warmup(),
                                           options_.b1_anneal_steps(), options_.b1_max());
  }
  return loss;
}

void ScheduleFree::set_mode(bool train) {
  if (train_mode_ == train) {
    return;
  }
  torch::NoGradGuard no_grad;
  auto& groups = base_->param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<at::Tensor> params, zs;
    for (auto& param : groups[g].params()) {
      auto it = z_.find(param.unsafeGetTensorImpl());
      if (it != z_.end()) {
        params.push_back(param);
        zs.push_back(it->second);
      }
    }
    if (!params.empty()) {
      const double beta = std::max(sf_state(g)[3].item<double>(), 1e-8);
      functional::schedulefree_set_mode_(params, zs, beta, /*to_eval=*/!train);
    }
  }
  train_mode_ = train;
}

void ScheduleFree::eval() { set_mode(false); }

void ScheduleFree::train() { set_mode(true); }

void ScheduleFree::save(torch::serialize::OutputArchive& archive) const {
  torch::serialize::OutputArchive base_archive(archive.compilation_unit());
  base_->save(base_archive);
  archive.write("base", base_archive);
  archive.write("train_mode", torch::IValue(train_mode_));
  archive.write("polyak_state", polyak_state_);
  const auto& groups = base_->param_groups();
  archive.write("num_groups", torch::IValue(static_cast<int64_t>(groups.size())));
  int64_t index = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    if (g < sf_state_.size()) {
      archive.write("sf_state/" + std::to_string(g), sf_state_[g]);
    }
    for (const auto& param : groups[g].params()) {
      auto it = z_.find(param.unsafeGetTensorImpl());
      if (it != z_.end()) {
        archive.write("z/" + std::to_string(index), it->second);
      }
      ++index;
    }
  }
}

void ScheduleFree::load(torch::serialize::InputArchive& archive) {
  torch::serialize::InputArchive base_archive;
  archive.read("base", base_archive);
  base_->load(base_archive);
  torch::IValue value;
  archive.read("train_mode", value);
  train_mode_ = value.toBool();
  at::Tensor polyak;
  if (archive.try_read("polyak_state", polyak)) {
    polyak_state_ = polyak.to(at::kDouble).contiguous().clone();
  }
  archive.read("num_groups", value);
  auto& groups = base_->param_groups();
  TORCH_CHECK_VALUE(value.toInt() == static_cast<int64_t>(groups.size()), "ScheduleFree::load: the checkpoint has ",
                    value.toInt(), " param groups, the base optimizer ", groups.size());
  sf_state_.clear();
  z_.clear();
  int64_t index = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    at::Tensor state;
    if (archive.try_read("sf_state/" + std::to_string(g), state)) {
      sf_state(g);  // fills earlier groups with fresh state
      sf_state_[g] = state.to(at::kDouble).contiguous().clone();
    }
    for (const auto& param : groups[g].params()) {
      at::Tensor z;
      if (archive.try_read("z/" + std::to_string(index), z)) {
        TORCH_CHECK_VALUE(z.sizes() == param.sizes(), "ScheduleFree::load: z of param ", index, " has shape ",
                          z.sizes(), " but the param has ", param.sizes());
        z_[param.unsafeGetTensorImpl()] = z.to(options_.state_dtype().value_or(param.scalar_type())).clone();
      }
      ++index;
    }
  }
}

ScheduleFreeWithSchedule schedule_free_with_wsd(std::shared_ptr<torch::optim::Optimizer> base,
                                                schedules::WSDOptions schedule, const std::string& weighting_mode,
                                                double sf_b1, std::optional<at::ScalarType> state_dtype,
                                                double weight_decay, std::optional<bool> use_adamc,
                                                const ScheduleFreePlusKnobs& knobs, double lr_max_init) {
  const bool plus = knobs.schedule_free_plus();
  const bool adamc = use_adamc.value_or(plus);
  ScheduleFreeWithSchedule result;
  result.optimizer = std::make_shared<ScheduleFree>(base, ScheduleFreeOptions()
                                                              .b1(sf_b1)
                                                              .weighting_mode(weighting_mode)
                                                              .r(knobs.sf_r())
                                                              .weight_lr_power(knobs.sf_weight_lr_power())
                                                              .use_lr_max(knobs.sf_use_lr_max().value_or(plus))
                                                              .c_warmup(knobs.sf_c_warmup())
                                                              .b1_anneal_steps(knobs.sf_b1_anneal_steps())
                                                              .b1_max(knobs.sf_b1_max())
                                                              .weight_decay_at_y(adamc ? 0.0 : weight_decay)
                                                              .adamc_weight_decay(adamc ? weight_decay : 0.0)
                                                              .state_dtype(state_dtype)
                                                              .lr_max_init(lr_max_init)
                                                              .polyak(knobs.polyak().value_or(plus))
                                                              .polyak_beta(knobs.polyak_beta())
                                                              .polyak_f_star(knobs.polyak_f_star()));
  result.scheduler = std::make_unique<schedules::WSD>(result.optimizer->base(), std::move(schedule));
  return result;
}

ScheduleFreeWithSchedule schedule_free_adamw(std::vector<at::Tensor> params, double lr, schedules::WSDOptions schedule,
                                             ScheduleFreeAdamWConfig config) {
  const bool plus = config.sf_plus().schedule_free_plus();
  auto base = std::make_shared<AdamW>(
      std::move(params),
      AdamWOptions(lr)
          .betas(std::make_tuple(config.b1().value_or(plus ? 0.9 : 0.0), config.b2().value_or(plus ? 0.95 : 0.999)))
          .eps(config.eps())
          .weight_decay(0.0)
          .state_dtype(config.state_dtype()));
  return schedule_free_with_wsd(base, std::move(schedule), config.weighting_mode(), config.sf_b1(),
                                config.state_dtype(), config.weight_decay(), config.use_adamc(), config.sf_plus(),
                                /*lr_max_init=*/config.eps());
}

ScheduleFreeWithSchedule schedule_free_prism(std::vector<at::Tensor> params, double lr, schedules::WSDOptions schedule,
                                             ScheduleFreePrismConfig config) {
  const bool plus = config.sf_plus().schedule_free_plus();
  PRISMOptions options = config.prism();
  options.lr(lr)
      .b1(config.prism_b1())
      .nesterov(false)
      .weight_decay(0.0)
      .mu_dtype(config.state_dtype())
      .use_magma(false)
      .use_prism(std::nullopt)
      .adam_lr(std::nullopt)
      .initial_lr(std::nullopt)
      .adam_betas(
          std::make_tuple(config.adam_b1().value_or(plus ? 0.9 : 0.0), config.adam_b2().value_or(plus ? 0.95 : 0.999)))
      .adam_eps(config.adam_eps());
  std::vector<at::Tensor> matrices, others;
  for (auto& p : params) {
    (p.dim() == 2 ? matrices : others).push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!matrices.empty()) {
    groups.emplace_back(matrices, std::make_unique<PRISMOptions>(options));
  }
  if (!others.empty()) {
    // Its own group at its own peak lr: the fallback's WSD and SF weights.
    PRISMOptions fallback = options;
    fallback.lr(config.adam_lr().value_or(lr)).use_prism(false);
    groups.emplace_back(others, std::make_unique<PRISMOptions>(fallback));
  }
  auto base = std::make_shared<PRISM>(groups, options);
  return schedule_free_with_wsd(base, std::move(schedule), config.weighting_mode(), config.sf_b1(),
                                config.state_dtype(), config.weight_decay(), config.use_adamc(), config.sf_plus());
}

ScheduleFreeWithSchedule schedule_free_kron(std::vector<at::Tensor> params, double lr, schedules::WSDOptions schedule,
                                            ScheduleFreeKronConfig config) {
  KronOptions options = config.kron();
  options.lr(lr).b1(0.0).whiten_grad(true).weight_decay(0.0).use_magma(false);
  auto base = std::make_shared<Kron>(std::move(params), options);
  return schedule_free_with_wsd(base, std::move(schedule), config.weighting_mode(), config.sf_b1(),
                                config.state_dtype(), config.weight_decay(), config.use_adamc(), config.sf_plus());
}

}  // namespace torchopt_ext::optim
