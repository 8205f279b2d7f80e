// torchopt_ext::optim::LAMB (NVLAMB / timm form), options named as timm's
// Lamb. State: AdamParamState without max_exp_avg_sq.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/adam.h"

namespace torchopt_ext::optim {

struct LAMBOptions : public torch::optim::OptimizerCloneableOptions<LAMBOptions> {
  LAMBOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(bool, bias_correction) = true;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-6;
  TORCH_ARG(double, weight_decay) = 0.01;
  TORCH_ARG(bool, grad_averaging) = true;
  // Global-norm clipping over all groups; the optimizer's defaults decide it (as in timm).
  TORCH_ARG(std::optional<double>, max_grad_norm) = 1.0;
  TORCH_ARG(bool, trust_clip) = false;
  TORCH_ARG(bool, always_adapt) = false;
  TORCH_ARG(bool, decoupled_decay) = false;
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
  friend bool operator==(const LAMBOptions& lhs, const LAMBOptions& rhs);
};

class LAMB : public AdamFamilyOptimizer<LAMBOptions> {
 public:
  explicit LAMB(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, LAMBOptions defaults = {});
  explicit LAMB(std::vector<at::Tensor> params, LAMBOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
