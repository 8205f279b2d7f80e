#include "torchopt_ext/optim/white_kron.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/functional/white_kron.h"

namespace torchopt_ext::optim {

WhiteKronOptions::WhiteKronOptions(double lr) : lr_(lr) {}

void WhiteKronOptions::validate() const {
  constexpr const char* name = "WhiteKron";
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, name, ": lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(b1() >= 0.0 && b1() < 1.0, name, ": b1 must be in [0, 1), got ", b1());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, name, ": weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(update_style() == "skew" || update_style() == "quad", name,
                    ": update_style must be 'skew' or 'quad', got '", update_style(), "'");
  TORCH_CHECK_VALUE(lr_style() == "adam" || lr_style() == "none", name, ": lr_style must be 'adam' or 'none', got '",
                    lr_style(), "'");
  TORCH_CHECK_VALUE(max_size_dense() >= 1, name, ": max_size_dense must be >= 1, got ", max_size_dense());
  TORCH_CHECK_VALUE(std::isfinite(preconditioner_lr()) && preconditioner_lr() > 0.0, name,
                    ": preconditioner_lr must be > 0, got ", preconditioner_lr());
  TORCH_CHECK_VALUE(std::isfinite(preconditioner_init_scale()) && preconditioner_init_scale() > 0.0, name,
                    ": preconditioner_init_scale must be > 0, got ", preconditioner_init_scale());
  TORCH_CHECK_VALUE(dtype() == at::kBFloat16 || dtype() == at::kFloat, name,
                    ": dtype must be bfloat16 or float32, got ", dtype());
  TORCH_CHECK_VALUE(block_size() >= 1, name, ": block_size must be >= 1, got ", block_size());
  TORCH_CHECK_VALUE(std::isfinite(noise_scale()) && noise_scale() >= 0.0, name, ": noise_scale must be >= 0, got ",
                    noise_scale());
  TORCH_CHECK_VALUE(balance_every() >= 1, name, ": balance_every must be >= 1, got ", balance_every());
}

bool operator==(const WhiteKronOptions& lhs, const WhiteKronOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.b1() == rhs.b1() && lhs.weight_decay() == rhs.weight_decay() &&
         lhs.update_style() == rhs.update_style() && lhs.lr_style() == rhs.lr_style() &&
         lhs.normalize_grads() == rhs.normalize_grads() && lhs.max_size_dense() == rhs.max_size_dense() &&
         lhs.preconditioner_lr() == rhs.preconditioner_lr() &&
         lhs.preconditioner_init_scale() == rhs.preconditioner_init_scale() && lhs.dtype() == rhs.dtype() &&
         lhs.block_size() == rhs.block_size() && lhs.noise_scale() == rhs.noise_scale() &&
         lhs.balance_every() == rhs.balance_every() && lhs.maximize() == rhs.maximize() &&
         lhs.stochastic_rounding() == rhs.stochastic_rounding() && lhs.seed() == rhs.seed() &&
         lhs.stacked() == rhs.stacked();
}

void WhiteKronOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(b1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(update_style);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr_style);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(normalize_grads);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_size_dense);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(preconditioner_lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(preconditioner_init_scale);
  archive.write("dtype", torch::IValue(static_cast<int64_t>(dtype())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(block_size);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(noise_scale);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(balance_every);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stochastic_rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stacked);
}

void WhiteKronOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, b1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, update_style);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, lr_style);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, normalize_grads);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, max_size_dense);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, preconditioner_lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, preconditioner_init_scale);
  torch::IValue value;
  archive.read("dtype", value);
  dtype(static_cast<at::ScalarType>(value.toInt()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, block_size);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, noise_scale);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, balance_every);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, stochastic_rounding);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
  // Archives written before `stacked` existed hold unstacked groups.
  torch::IValue stacked_value;
  stacked(archive.try_read("stacked", stacked_value) && stacked_value.toBool());
}

double WhiteKronOptions::get_lr() const { return lr(); }

void WhiteKronOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const WhiteKronParamState& lhs, const WhiteKronParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.mu(), rhs.mu()) &&
         same_state_tensor(lhs.ql(), rhs.ql()) && same_state_tensor(lhs.qr(), rhs.qr()) &&
         same_state_tensor(lhs.lip_l(), rhs.lip_l()) && same_state_tensor(lhs.lip_r(), rhs.lip_r());
}

void WhiteKronParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mu);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ql);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(qr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lip_l);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lip_r);
}

void WhiteKronParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, mu);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, ql);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, qr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, lip_l);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, lip_r);
}

WhiteKron::WhiteKron(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, WhiteKronOptions defaults)
    : OptimizerBase<WhiteKronOptions>(param_groups, defaults) {}

WhiteKron::WhiteKron(std::vector<at::Tensor> params, WhiteKronOptions defaults)
    : WhiteKron(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
                std::move(defaults)) {}

at::Tensor WhiteKron::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    std::vector<at::Tensor> params, grads, mus, ql, qr, lip_l, lip_r, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      const bool stacked = options.stacked();
      TORCH_CHECK_VALUE(!stacked || param.dim() >= 2, "WhiteKron: stacked=true needs params of shape (L, ...) with ",
                        "at least 2 dims (one preconditioner per slice), got a param of shape ", param.sizes());
      auto& state = state_of<WhiteKronParamState>(param, [&] {
        auto fresh = std::make_unique<WhiteKronParamState>();
        fresh->step(detail::new_step_counter());
        // Stacked: one slice's fresh state repeated along a leading L axis.
        auto factors = functional::white_kron_init_state(stacked ? param.detach()[0] : param.detach(),
                                                         options.max_size_dense(), options.block_size(),
                                                         options.preconditioner_init_scale(), options.dtype());
        if (stacked) {
          for (auto& t : factors) {
            std::vector<int64_t> repeats(t.dim() + 1, 1);
            repeats[0] = param.size(0);
            t = t.unsqueeze(0).repeat(repeats);
          }
        }
        fresh->ql(factors[0]);
        fresh->qr(factors[1]);
        fresh->lip_l(factors[2]);
        fresh->lip_r(factors[3]);
        return fresh;
      });
      if (options.b1() > 0.0 && !state.mu().defined()) {
        const auto storage = param.scalar_type() == at::kDouble ? at::kDouble : options.dtype();
        state.mu(at::zeros_like(param, param.options().dtype(storage), at::MemoryFormat::Contiguous));
      }
      // Stacked: one entry per slice, in order (views, so the functional's
      // in-place writes land in the stacked tensors).
      const int64_t layers = stacked ? param.size(0) : 1;
      auto entry = [&](const at::Tensor& t, int64_t i) { return stacked ? t.select(0, i) : t; };
      for (int64_t i = 0; i < layers; ++i) {
        params.push_back(entry(param, i));
        grads.push_back(entry(param.grad(), i));
        if (options.b1() > 0.0) {
          mus.push_back(entry(state.mu(), i));
        }
        ql.push_back(entry(state.ql(), i));
        qr.push_back(entry(state.qr(), i));
        lip_l.push_back(entry(state.lip_l(), i));
        lip_r.push_back(entry(state.lip_r(), i));
        // Every entry's step is counted: later slices get throwaway copies.
        steps.push_back(i == 0 ? state.step() : state.step().clone());
      }
    }
    if (params.empty()) {
      continue;
    }
    functional::white_kron_step_(params, grads, mus, ql, qr, lip_l, lip_r, steps,
                                 at::scalar_tensor(options.lr(), at::kDouble), options.update_style(), options.b1(),
                                 options.weight_decay(), options.lr_style(), options.normalize_grads(),
                                 options.max_size_dense(), options.preconditioner_lr(), options.block_size(),
                                 options.noise_scale(), options.balance_every(), options.maximize(),
                                 options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }
  return loss;
}

void WhiteKron::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<WhiteKronParamState, WhiteKronOptions>(archive, *this);
}

void WhiteKron::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<WhiteKronParamState, WhiteKronOptions>(archive, *this);
}

}  // namespace torchopt_ext::optim
