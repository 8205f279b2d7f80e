// torchopt_ext::optim::RAdam, as torch.optim.RAdam (coupled weight decay
// unless decoupled_weight_decay(true)). State: AdamParamState without max_exp_avg_sq.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/adam.h"

namespace torchopt_ext::optim {

struct RAdamOptions : public torch::optim::OptimizerCloneableOptions<RAdamOptions> {
  RAdamOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, decoupled_weight_decay) = false;
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
  friend bool operator==(const RAdamOptions& lhs, const RAdamOptions& rhs);
};

class RAdam : public AdamFamilyOptimizer<RAdamOptions> {
 public:
  explicit RAdam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, RAdamOptions defaults = {});
  explicit RAdam(std::vector<at::Tensor> params, RAdamOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
