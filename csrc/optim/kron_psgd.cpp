#include "torchopt_ext/optim/kron_psgd.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/kron_psgd.h"

namespace torchopt_ext::optim {

KronPSGDOptions::KronPSGDOptions(double lr) : lr_(lr) {}

void KronPSGDOptions::validate() const {
  constexpr const char* name = "KronPSGD";
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, name, ": lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(std::isfinite(precond_lr()) && precond_lr() >= 0.0, name, ": precond_lr must be >= 0, got ",
                    precond_lr());
  TORCH_CHECK_VALUE(momentum() >= 0.0 && momentum() < 1.0, name, ": momentum must be in [0, 1), got ", momentum());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, name, ": weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(std::isfinite(eps()) && eps() > 0.0, name, ": eps must be > 0, got ", eps());
  TORCH_CHECK_VALUE(clip() > 0.0, name, ": clip must be > 0, got ", clip());
}

bool operator==(const KronPSGDOptions& lhs, const KronPSGDOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.precond_lr() == rhs.precond_lr() && lhs.momentum() == rhs.momentum() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.eps() == rhs.eps() && lhs.clip() == rhs.clip() &&
         lhs.maximize() == rhs.maximize() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

void KronPSGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(precond_lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(clip);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stochastic_rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
}

void KronPSGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, precond_lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, clip);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, stochastic_rounding);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
}

double KronPSGDOptions::get_lr() const { return lr(); }

void KronPSGDOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const KronPSGDParamState& lhs, const KronPSGDParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.momentum_buffer(), rhs.momentum_buffer()) &&
         same_state_tensor(lhs.ql(), rhs.ql()) && same_state_tensor(lhs.qr(), rhs.qr());
}

void KronPSGDParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ql);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(qr);
}

void KronPSGDParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, momentum_buffer);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, ql);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, qr);
}

KronPSGD::KronPSGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, KronPSGDOptions defaults)
    : OptimizerBase<KronPSGDOptions>(param_groups, defaults) {}

KronPSGD::KronPSGD(std::vector<at::Tensor> params, KronPSGDOptions defaults)
    : KronPSGD(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
               std::move(defaults)) {}

at::Tensor KronPSGD::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, buffers, ql, qr, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = state_of<KronPSGDParamState>(param, [&] {
        auto fresh = std::make_unique<KronPSGDParamState>();
        fresh->step(detail::new_step_counter());
        // Math (and so state) in fp32 for reduced-precision params.
        const auto math = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
        fresh->momentum_buffer(at::zeros_like(param, param.options().dtype(math)));
        if (param.dim() == 2) {
          fresh->ql(at::eye(param.size(0), param.options().dtype(math)));
          fresh->qr(at::eye(param.size(1), param.options().dtype(math)));
        }
        return fresh;
      });
      params.push_back(param);
      grads.push_back(param.grad());
      buffers.push_back(state.momentum_buffer());
      if (param.dim() == 2) {
        ql.push_back(state.ql());
        qr.push_back(state.qr());
      }
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    functional::kron_psgd_step_(params, grads, buffers, ql, qr, steps, at::scalar_tensor(options.lr(), at::kDouble),
                                options.precond_lr(), options.momentum(), options.weight_decay(), options.eps(),
                                options.clip(), options.maximize(), options.stochastic_rounding(), options.seed(),
                                std::nullopt, std::nullopt);
  }
  return loss;
}

void KronPSGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<KronPSGDParamState, KronPSGDOptions>(archive, *this);
}

void KronPSGD::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<KronPSGDParamState, KronPSGDOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
