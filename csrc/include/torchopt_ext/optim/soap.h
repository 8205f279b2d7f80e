// torchopt_ext::optim::SOAP, options named as the reference soap.py's
// (classic.md §10). The first step() a param takes only initializes its
// preconditioner (no update, step stays 0).
#pragma once

#include <torch/arg.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct SOAPOptions : public torch::optim::OptimizerCloneableOptions<SOAPOptions> {
  SOAPOptions(double lr = 3e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 3e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.95, 0.95);
  TORCH_ARG(double, shampoo_beta) = -1.0;  // < 0: betas[1]
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0.01;
  TORCH_ARG(int64_t, precondition_frequency) = 10;
  TORCH_ARG(int64_t, max_precond_dim) = 10000;
  TORCH_ARG(bool, merge_dims) = false;
  TORCH_ARG(bool, precondition_1d) = false;
  TORCH_ARG(bool, normalize_grads) = false;
  TORCH_ARG(std::string, data_format) = "channels_first";  // or "channels_last"
  TORCH_ARG(bool, correct_bias) = true;
  // exp_avg / exp_avg_sq storage (GG / Q: float32, float64 for float64 params).
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const SOAPOptions& lhs, const SOAPOptions& rhs);
};

// GG / Q: the flat factor tensors of functional/soap.h.
struct SOAPParamState : public torch::optim::OptimizerCloneableParamState<SOAPParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq);
  TORCH_ARG(at::Tensor, GG);
  TORCH_ARG(at::Tensor, Q);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const SOAPParamState& lhs, const SOAPParamState& rhs);
};

class SOAP : public OptimizerBase<SOAPOptions> {
 public:
  explicit SOAP(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SOAPOptions defaults = {});
  explicit SOAP(std::vector<at::Tensor> params, SOAPOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
