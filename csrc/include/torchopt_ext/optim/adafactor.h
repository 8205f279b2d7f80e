// torchopt_ext::optim::Adafactor: torch.optim.Adafactor's options and
// defaults, plus the Hugging Face extras (beta1, relative_step,
// scale_parameter, warmup_init). The math is functional::adafactor_step_.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct AdafactorOptions : public torch::optim::OptimizerCloneableOptions<AdafactorOptions> {
  AdafactorOptions(double lr = 1e-2);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-2;
  TORCH_ARG(double, beta2_decay) = -0.8;
  // (eps1, eps2): eps1 nullopt is finfo(param dtype).eps, as in torch.
  typedef std::tuple<std::optional<double>, double> eps_t;
  TORCH_ARG(eps_t, eps) = std::make_tuple(std::nullopt, 1e-3);
  TORCH_ARG(double, d) = 1.0;  // update clipping threshold
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(bool, maximize) = false;
  // First moment of the scaled, clipped update (Hugging Face); nullopt: none kept.
  TORCH_ARG(std::optional<double>, beta1) = std::nullopt;
  TORCH_ARG(bool, relative_step) = true;    // rho_t = min(lr, 1/sqrt(t)); false: rho_t = lr
  TORCH_ARG(bool, scale_parameter) = true;  // alpha_t = max(eps2, RMS(theta)) rho_t; false: rho_t
  TORCH_ARG(bool, warmup_init) = false;     // rho_t also <= 1e-6 t; needs relative_step
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const AdafactorOptions& lhs, const AdafactorOptions& rhs);
};

// torch's state layout: a param with dim >= 2 keeps row_var (shape[:-1] + {1})
// and col_var (shape[:-2] + {1} + shape[-1:]); others keep variance (param
// shaped); exp_avg only with beta1. Absent entries are undefined tensors.
struct AdafactorParamState : public torch::optim::OptimizerCloneableParamState<AdafactorParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, row_var) = {};
  TORCH_ARG(at::Tensor, col_var) = {};
  TORCH_ARG(at::Tensor, variance) = {};
  TORCH_ARG(at::Tensor, exp_avg) = {};

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const AdafactorParamState& lhs, const AdafactorParamState& rhs);
};

class Adafactor : public OptimizerBase<AdafactorOptions> {
 public:
  explicit Adafactor(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                     AdafactorOptions defaults = {});
  explicit Adafactor(std::vector<at::Tensor> params, AdafactorOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
