// torchopt_ext::optim::SophiaH / SophiaG (Liu et al. 2023; classic.md §12).
// Options are named as the Python classes (SophiaG: as the official code).
#pragma once

#include <ATen/core/Generator.h>
#include <torch/arg.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct SophiaHOptions : public torch::optim::OptimizerCloneableOptions<SophiaHOptions> {
  SophiaHOptions(double lr = 1e-4);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-4;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.965, 0.99);
  TORCH_ARG(double, gamma) = 0.01;
  TORCH_ARG(double, weight_decay) = 0.1;  // decoupled: theta *= 1 - lr * weight_decay
  TORCH_ARG(double, eps) = 1e-12;
  TORCH_ARG(std::string, eps_mode) = "max";  // "max": max(gamma h, eps); "add": gamma h + eps
  TORCH_ARG(int64_t, update_period) = 10;
  TORCH_ARG(int64_t, n_samples) = 1;
  TORCH_ARG(std::string, distribution) = "rademacher";  // or "gaussian"
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;  // seeds the probe generator and stochastic rounding

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  double curvature_scale() const { return gamma(); }
  friend bool operator==(const SophiaHOptions& lhs, const SophiaHOptions& rhs);
};

struct SophiaGOptions : public torch::optim::OptimizerCloneableOptions<SophiaGOptions> {
  SophiaGOptions(double lr = 1e-4);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-4;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.965, 0.99);
  TORCH_ARG(double, rho) = 0.04;  // gamma of the paper; the estimate already holds the token count
  TORCH_ARG(double, weight_decay) = 0.1;
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(double, eps) = 1e-15;
  TORCH_ARG(std::string, eps_mode) = "add";
  TORCH_ARG(int64_t, update_period) = 10;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;  // seeds the label sampler and stochastic rounding

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  double curvature_scale() const { return rho(); }
  friend bool operator==(const SophiaGOptions& lhs, const SophiaGOptions& rhs);
};

struct SophiaParamState : public torch::optim::OptimizerCloneableParamState<SophiaParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, hessian);  // EMA of the diagonal estimate, not bias-corrected

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const SophiaParamState& lhs, const SophiaParamState& rhs);
};

// Step, state, explicit Hessian refresh and checkpoints shared by SophiaH and
// SophiaG. step() runs no autograd; with no estimate ever applied h = 0 and the
// step is lr * sign(m) (lr * m / eps where |m| < eps).
template <typename Options>
class SophiaBase : public OptimizerBase<Options> {
 public:
  SophiaBase(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, const Options& defaults);

  at::Tensor step(torch::optim::Optimizer::LossClosure closure = nullptr) override;

  // h <- beta2 h + (1 - beta2) estimate now, without counting: one entry per
  // param over all groups in order (an undefined tensor skips that param).
  void update_hessian(const std::vector<at::Tensor>& estimates);

  // Calls of the closure form of update_hessian so far (saved with the state).
  int64_t hessian_calls() const { return hessian_calls_; }
  // The generator of the probes / sampled labels, seeded by the defaults' seed.
  at::Generator& generator() { return generator_; }

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  // Counts one closure call; returns the params (with their group) of the
  // groups whose update_period divides the call index, requiring grad.
  std::vector<std::pair<size_t, at::Tensor>> next_due_params();
  void apply_estimates(const std::vector<std::pair<size_t, at::Tensor>>& targets,
                       const std::vector<at::Tensor>& estimates);

 private:
  SophiaParamState& state_for(const at::Tensor& param, const Options& options);

  at::Generator generator_;
  int64_t hessian_calls_ = 0;
};

class SophiaH : public SophiaBase<SophiaHOptions> {
 public:
  explicit SophiaH(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SophiaHOptions defaults = {});
  explicit SophiaH(std::vector<at::Tensor> params, SophiaHOptions defaults = {});

  using SophiaBase<SophiaHOptions>::update_hessian;
  // Call once per iteration: on calls 0, k, 2k, ... runs `closure` (a scalar
  // loss built with autograd on) and refreshes h from Hutchinson's estimate
  // (n_samples and distribution of the first group). Returns the loss when
  // the closure ran, else an undefined tensor.
  at::Tensor update_hessian(const std::function<at::Tensor()>& closure);
};

class SophiaG : public SophiaBase<SophiaGOptions> {
 public:
  explicit SophiaG(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, SophiaGOptions defaults = {});
  explicit SophiaG(std::vector<at::Tensor> params, SophiaGOptions defaults = {});

  using SophiaBase<SophiaGOptions>::update_hessian;
  // Call once per iteration: on calls 0, k, 2k, ... runs `closure` (logits
  // (..., C) built with autograd on) and refreshes h from the
  // Gauss-Newton-Bartlett estimate B g*g. Returns the logits when the closure
  // ran, else an undefined tensor.
  at::Tensor update_hessian(const std::function<at::Tensor()>& closure);
};

}  // namespace torchopt_ext::optim
