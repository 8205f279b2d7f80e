// torchopt_ext::optim::QHAdamW (Ma & Yarats 2019), options named as qhoptim's.
// State: AdamParamState (bias-corrected moments) without max_exp_avg_sq.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/adam.h"

namespace torchopt_ext::optim {

struct QHAdamWOptions : public torch::optim::OptimizerCloneableOptions<QHAdamWOptions> {
  QHAdamWOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  typedef std::tuple<double, double> nus_t;
  TORCH_ARG(nus_t, nus) = std::make_tuple(1.0, 1.0);
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(double, eps) = 1e-8;
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
  friend bool operator==(const QHAdamWOptions& lhs, const QHAdamWOptions& rhs);
};

class QHAdamW : public AdamFamilyOptimizer<QHAdamWOptions> {
 public:
  explicit QHAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, QHAdamWOptions defaults = {});
  explicit QHAdamW(std::vector<at::Tensor> params, QHAdamWOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
