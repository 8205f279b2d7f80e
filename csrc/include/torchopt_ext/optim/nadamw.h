// torchopt_ext::optim::NAdamW: NAdam with torch's momentum-decay schedule and
// decoupled weight decay (coupled with decoupled_weight_decay(false)).
#pragma once

#include <torch/arg.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct NAdamWOptions : public torch::optim::OptimizerCloneableOptions<NAdamWOptions> {
  NAdamWOptions(double lr = 2e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 2e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;
  TORCH_ARG(double, momentum_decay) = 4e-3;
  TORCH_ARG(bool, decoupled_weight_decay) = true;
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const NAdamWOptions& lhs, const NAdamWOptions& rhs);
};

struct NAdamWParamState : public torch::optim::OptimizerCloneableParamState<NAdamWParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, mu_product);  // float32 scalar, starts at 1
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const NAdamWParamState& lhs, const NAdamWParamState& rhs);
};

class NAdamW : public OptimizerBase<NAdamWOptions> {
 public:
  explicit NAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, NAdamWOptions defaults = {});
  explicit NAdamW(std::vector<at::Tensor> params, NAdamWOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
