// torchopt_ext::optim::Adam: Adam with coupled (L2) weight decay by default,
// or decoupled with decoupled_weight_decay(true), as torch.optim.Adam.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct AdamOptions : public torch::optim::OptimizerCloneableOptions<AdamOptions> {
  AdamOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, decoupled_weight_decay) = false;
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(bool, maximize) = false;
  // Storage dtype of exp_avg / exp_avg_sq (nullopt: the param's dtype). Math is fp32 or wider.
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  // Round bf16 params stochastically after each update (unbiased; others ignore it).
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;
  // Magma masking (rollfast.md §5; see functional::adam_magma_step_): the
  // update, decoupled decay included, scaled by z * score per tensor, z a
  // Bernoulli(magma_p) draw keyed by (seed, tensor index, step).
  TORCH_ARG(bool, use_magma) = false;
  TORCH_ARG(double, magma_p) = 0.5;
  TORCH_ARG(double, magma_tau) = 2.0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  // Throws a ValueError-style c10::Error naming the first invalid option.
  void validate() const;
  friend bool operator==(const AdamOptions& lhs, const AdamOptions& rhs);
};

// AdamW's defaults: weight_decay 1e-2, decoupled.
struct AdamWOptions : public AdamOptions {
  AdamWOptions(double lr = 1e-3);  // NOLINT
};

struct AdamParamState : public torch::optim::OptimizerCloneableParamState<AdamParamState> {
  TORCH_ARG(at::Tensor, step);  // float32 scalar, as in torch.optim
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq);
  TORCH_ARG(at::Tensor, max_exp_avg_sq) = {};
  TORCH_ARG(at::Tensor, magma_score) = {};  // 0-d float32, with use_magma

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const AdamParamState& lhs, const AdamParamState& rhs);
};

namespace detail {
// Fresh Adam-style state (step, exp_avg, exp_avg_sq and, with amsgrad,
// max_exp_avg_sq) in the given storage dtype; also used by RAdam and QHAdamW.
std::unique_ptr<AdamParamState> new_adam_state(const at::Tensor& param, const std::optional<at::ScalarType>& dtype,
                                               bool amsgrad);

// One param group's Adam-style lists: the params that have grads, their
// grads and their state, in the order the functional steps take them.
struct AdamGroupLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  std::vector<at::Tensor> magma_scores;  // only when asked for (created at 0.5)
};
}  // namespace detail

// Base of the optimizers that keep AdamParamState (Adam, AdamW, RAdam,
// QHAdamW, LAMB): collects a group's lists, creating state on first use.
template <typename Options>
class AdamFamilyOptimizer : public OptimizerBase<Options> {
 public:
  using OptimizerBase<Options>::OptimizerBase;

 protected:
  detail::AdamGroupLists adam_lists(torch::optim::OptimizerParamGroup& group, bool amsgrad, bool magma = false) {
    const auto& options = this->options_of(group);
    detail::AdamGroupLists lists;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      auto& state = this->template state_of<AdamParamState>(
          param, [&] { return detail::new_adam_state(param, options.state_dtype(), amsgrad); });
      state.step(detail::placed_step(state.step(), param));  // e.g. host counters from a checkpoint
      lists.params.push_back(param);
      lists.grads.push_back(param.grad());
      lists.exp_avgs.push_back(state.exp_avg());
      lists.exp_avg_sqs.push_back(state.exp_avg_sq());
      if (amsgrad) {
        TORCH_CHECK_VALUE(state.max_exp_avg_sq().defined(),
                          "amsgrad was turned on after the first step; its max_exp_avg_sq state is missing");
        lists.max_exp_avg_sqs.push_back(state.max_exp_avg_sq());
      }
      lists.steps.push_back(state.step());
      if (magma) {
        state.magma_score(detail::placed_magma_score(state.magma_score(), param));
        lists.magma_scores.push_back(state.magma_score());
      }
    }
    return lists;
  }
};

class Adam : public AdamFamilyOptimizer<AdamOptions> {
 public:
  explicit Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults = {});
  explicit Adam(std::vector<at::Tensor> params, AdamOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  // AdamW decouples weight decay in every group whatever the group's options say.
  bool always_decoupled_ = false;
};

}  // namespace torchopt_ext::optim
