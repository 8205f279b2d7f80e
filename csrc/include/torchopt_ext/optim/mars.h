// torchopt_ext::optim::MARS (mars-adamw, mars-lion and mars-shampoo; the
// approximate mode and the exact one), options named as the official
// implementation's. 2-D params (all with optimize_1d) take the MARS step, the
// others AdamW with the *_1d options; with mars-shampoo, non-2-D params of the
// MARS branch take mars-adamw, as in the official code.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct MARSOptions : public torch::optim::OptimizerCloneableOptions<MARSOptions> {
  MARSOptions(double lr = 3e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 3e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.95, 0.99);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(double, gamma) = 0.025;
  TORCH_ARG(std::string, mars_type) = "mars-adamw";  // or "mars-lion", "mars-shampoo"
  // false: exact MARS, g_prev set by update_previous_grad / update_last_grad.
  TORCH_ARG(bool, is_approx) = true;
  TORCH_ARG(bool, optimize_1d) = false;
  TORCH_ARG(double, lr_1d) = 3e-3;
  TORCH_ARG(betas_t, betas_1d) = std::make_tuple(0.9, 0.95);
  TORCH_ARG(double, weight_decay_1d) = 0.1;
  TORCH_ARG(bool, maximize) = false;
  // mars-shampoo's Newton-Schulz dtype (bf16 as the official code; nullopt: fp32).
  TORCH_ARG(std::optional<at::ScalarType>, ns_dtype) = at::kBFloat16;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const MARSOptions& lhs, const MARSOptions& rhs);
};

struct MARSParamState : public torch::optim::OptimizerCloneableParamState<MARSParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq) = {};      // mars-adamw and the AdamW branch
  TORCH_ARG(at::Tensor, max_exp_avg_sq) = {};  // amsgrad
  TORCH_ARG(at::Tensor, last_grad) = {};       // the MARS branch
  TORCH_ARG(at::Tensor, previous_grad) = {};   // exact mode: update_previous_grad's copy

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const MARSParamState& lhs, const MARSParamState& rhs);
};

class MARS : public OptimizerBase<MARSOptions> {
 public:
  explicit MARS(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, MARSOptions defaults = {});
  explicit MARS(std::vector<at::Tensor> params, MARSOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  // Exact MARS (is_approx = false), the official two-call protocol: after a
  // backward pass at the current params on the *next* batch,
  // update_previous_grad() keeps those grads; after step(),
  // update_last_grad() makes them the next step's g_prev. Both touch only
  // MARS-branch params of groups with is_approx = false.
  void update_previous_grad();
  void update_last_grad();
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  MARSParamState& state_for(const at::Tensor& param, const MARSOptions& options);
  // fn(param, options) for the MARS-branch params of groups with is_approx = false.
  template <typename Fn>
  void for_each_exact_param(const Fn& fn);

  double lr_1d_factor_;  // lr_1d / lr at construction: a schedule scales both branches alike
};

}  // namespace torchopt_ext::optim
