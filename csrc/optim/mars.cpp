#include "torchopt_ext/optim/mars.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/adam.h"
#include "torchopt_ext/functional/mars.h"

namespace torchopt_ext::optim {

MARSOptions::MARSOptions(double lr) : lr_(lr) {}

void MARSOptions::validate() const {
  const auto [beta1, beta2] = betas();
  const auto [beta1_1d, beta2_1d] = betas_1d();
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "MARS: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(eps() >= 0.0, "MARS: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "MARS: betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "MARS: betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(beta1_1d >= 0.0 && beta1_1d < 1.0, "MARS: betas_1d[0] must be in [0, 1), got ", beta1_1d);
  TORCH_CHECK_VALUE(beta2_1d >= 0.0 && beta2_1d < 1.0, "MARS: betas_1d[1] must be in [0, 1), got ", beta2_1d);
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "MARS: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(weight_decay_1d() >= 0.0, "MARS: weight_decay_1d must be >= 0, got ", weight_decay_1d());
  TORCH_CHECK_VALUE(gamma() >= 0.0, "MARS: gamma must be >= 0, got ", gamma());
  TORCH_CHECK_VALUE(lr_1d() >= 0.0, "MARS: lr_1d must be >= 0, got ", lr_1d());
  TORCH_CHECK_VALUE(mars_type() == "mars-adamw" || mars_type() == "mars-lion" || mars_type() == "mars-shampoo",
                    "MARS: mars_type must be 'mars-adamw', 'mars-lion' or 'mars-shampoo', got '", mars_type(), "'");
  TORCH_CHECK_VALUE(!(amsgrad() && mars_type() == "mars-lion"), "MARS: amsgrad applies to mars-adamw only");
  if (ns_dtype()) {
    TORCH_CHECK_VALUE(at::isFloatingType(*ns_dtype()), "MARS: ns_dtype must be a floating dtype, got ", *ns_dtype());
  }
  detail::check_state_dtype("MARS", state_dtype());
}

bool operator==(const MARSOptions& lhs, const MARSOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.amsgrad() == rhs.amsgrad() && lhs.gamma() == rhs.gamma() &&
         lhs.mars_type() == rhs.mars_type() && lhs.optimize_1d() == rhs.optimize_1d() && lhs.lr_1d() == rhs.lr_1d() &&
         lhs.betas_1d() == rhs.betas_1d() && lhs.weight_decay_1d() == rhs.weight_decay_1d() &&
         lhs.maximize() == rhs.maximize() && lhs.is_approx() == rhs.is_approx() && lhs.ns_dtype() == rhs.ns_dtype() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void MARSOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gamma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mars_type);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(optimize_1d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr_1d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas_1d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay_1d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(is_approx);
  archive.write("ns_dtype", torch::IValue(detail::encode_dtype(ns_dtype())));
  detail::write_storage_options(archive, *this);
}

void MARSOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, amsgrad);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, gamma);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, mars_type);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, optimize_1d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr_1d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas_1d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay_1d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  // Archives written before the exact mode and mars-shampoo lack these two.
  torch::IValue value;
  is_approx(archive.try_read("is_approx", value) ? value.toBool() : true);
  ns_dtype(archive.try_read("ns_dtype", value) ? detail::decode_dtype(value.toInt())
                                               : std::optional<at::ScalarType>(at::kBFloat16));
  detail::read_storage_options(archive, *this);
}

double MARSOptions::get_lr() const { return lr(); }

void MARSOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const MARSParamState& lhs, const MARSParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) &&
         same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq()) &&
         same_state_tensor(lhs.max_exp_avg_sq(), rhs.max_exp_avg_sq()) &&
         same_state_tensor(lhs.last_grad(), rhs.last_grad()) &&
         same_state_tensor(lhs.previous_grad(), rhs.previous_grad());
}

void MARSParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(last_grad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(previous_grad);
}

void MARSParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, max_exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, last_grad);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, previous_grad);
}

MARS::MARS(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, MARSOptions defaults)
    : OptimizerBase<MARSOptions>(param_groups, defaults),
      lr_1d_factor_(defaults.lr() > 0.0 ? defaults.lr_1d() / defaults.lr() : 0.0) {}

MARS::MARS(std::vector<at::Tensor> params, MARSOptions defaults)
    : MARS(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

namespace {

bool mars_branch(const MARSOptions& options, const at::Tensor& param) {
  return options.optimize_1d() || param.dim() == 2;
}

}  // namespace

MARSParamState& MARS::state_for(const at::Tensor& param, const MARSOptions& options) {
  return state_of<MARSParamState>(param, [&] {
    const bool matrix = mars_branch(options, param);
    const bool shampoo = options.mars_type() == "mars-shampoo";
    const bool orthogonalized = shampoo && param.dim() == 2;
    auto fresh = std::make_unique<MARSParamState>();
    fresh->step(detail::new_step_counter(param));
    fresh->exp_avg(detail::zeros_state(param, options.state_dtype()));
    if (!matrix || options.mars_type() == "mars-adamw" || (shampoo && !orthogonalized)) {
      fresh->exp_avg_sq(detail::zeros_state(param, options.state_dtype()));
    }
    // The official code's 1-D (AdamW) branch honours amsgrad too.
    if (options.amsgrad() && !orthogonalized) {
      fresh->max_exp_avg_sq(detail::zeros_state(param, options.state_dtype()));
    }
    if (matrix) {
      fresh->last_grad(detail::zeros_state(param, options.state_dtype()));
    }
    return fresh;
  });
}

at::Tensor MARS::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    // One op call per rule: the MARS branch's matrices (mars-shampoo on 2-D
    // params), the rest of the MARS branch (mars-adamw under mars-shampoo) and
    // MARS's AdamW branch (everything else).
    struct Call {
      std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_sqs, last_grads, steps;
    };
    const bool shampoo = options.mars_type() == "mars-shampoo";
    Call main_call, shampoo_call;
    std::vector<at::Tensor> params_1d, grads_1d, exp_avgs_1d, exp_avg_sqs_1d, max_sqs_1d, steps_1d;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      const bool matrix = mars_branch(options, param);
      const bool orthogonalized = shampoo && param.dim() == 2;
      auto& state = state_for(param, options);
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      if (matrix) {
        Call& call = orthogonalized ? shampoo_call : main_call;
        call.params.push_back(param);
        call.grads.push_back(param.grad());
        call.exp_avgs.push_back(state.exp_avg());
        if (state.exp_avg_sq().defined()) {
          call.exp_avg_sqs.push_back(state.exp_avg_sq());
        }
        if (state.max_exp_avg_sq().defined()) {
          call.max_sqs.push_back(state.max_exp_avg_sq());
        }
        call.last_grads.push_back(state.last_grad());
        call.steps.push_back(state.step());
      } else {
        params_1d.push_back(param);
        grads_1d.push_back(param.grad());
        exp_avgs_1d.push_back(state.exp_avg());
        exp_avg_sqs_1d.push_back(state.exp_avg_sq());
        if (state.max_exp_avg_sq().defined()) {
          max_sqs_1d.push_back(state.max_exp_avg_sq());
        }
        steps_1d.push_back(state.step());
      }
    }
    const auto [beta1, beta2] = options.betas();
    const auto run = [&](Call& call, const std::string& mars_type, bool amsgrad) {
      if (call.params.empty()) {
        return;
      }
      functional::mars_step_(call.params, call.grads, call.exp_avgs, call.exp_avg_sqs, call.max_sqs, call.last_grads,
                             call.steps, at::scalar_tensor(options.lr(), at::kDouble), beta1, beta2, options.eps(),
                             options.weight_decay(), options.gamma(), mars_type, amsgrad, options.maximize(),
                             options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt, std::nullopt,
                             options.is_approx(), options.ns_dtype());
    };
    run(main_call, shampoo ? std::string("mars-adamw") : options.mars_type(), options.amsgrad());
    run(shampoo_call, "mars-shampoo", false);
    if (!params_1d.empty()) {
      const auto [beta1_1d, beta2_1d] = options.betas_1d();
      functional::adam_step_(params_1d, grads_1d, exp_avgs_1d, exp_avg_sqs_1d, max_sqs_1d, steps_1d,
                             at::scalar_tensor(options.lr() * lr_1d_factor_, at::kDouble), beta1_1d, beta2_1d,
                             options.eps(), options.weight_decay_1d(), /*decoupled_weight_decay=*/true,
                             options.amsgrad(), options.maximize(), options.stochastic_rounding(), options.seed(),
                             std::nullopt, std::nullopt);
    }
  }
  return loss;
}

template <typename Fn>
void MARS::for_each_exact_param(const Fn& fn) {
  torch::NoGradGuard no_grad;
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    if (options.is_approx()) {
      continue;
    }
    for (auto& param : group.params()) {
      if (mars_branch(options, param)) {
        fn(param, options);
      }
    }
  }
}

void MARS::update_previous_grad() {
  for_each_exact_param([&](const at::Tensor& param, const MARSOptions& options) {
    if (!param.grad().defined()) {
      return;
    }
    auto& state = state_for(param, options);
    if (!state.previous_grad().defined()) {
      state.previous_grad(detail::zeros_state(param, options.state_dtype()));
    }
    // g_prev keeps the step's sign convention (negated with maximize).
    if (options.maximize()) {
      at::neg_out(state.previous_grad(), param.grad());
    } else {
      state.previous_grad().copy_(param.grad());
    }
  });
}

void MARS::update_last_grad() {
  for_each_exact_param([&](const at::Tensor& param, const MARSOptions& /*options*/) {
    auto it = state_.find(param.unsafeGetTensorImpl());
    if (it == state_.end()) {
      return;
    }
    auto& state = static_cast<MARSParamState&>(*it->second);
    if (state.previous_grad().defined() && state.last_grad().defined()) {
      state.last_grad().copy_(state.previous_grad());
    }
  });
}

void MARS::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<MARSParamState, MARSOptions>(archive, *this);
}

void MARS::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<MARSParamState, MARSOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
