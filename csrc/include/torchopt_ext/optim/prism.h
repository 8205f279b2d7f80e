// torchopt_ext::optim::PRISM, options named as rollfast's `prism` (lr is the
// learning rate). Matrix params take the PRISM step (functional/prism.h); the
// others an AdamW fallback with the adam_* options (see
// torchopt_ext/optim/prism.py for the routing rule).
#pragma once

#include <torch/arg.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "torchopt_ext/common/matrix_dims.h"
#include "torchopt_ext/optim/matrix_optimizer.h"
#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct PRISMOptions : public torch::optim::OptimizerCloneableOptions<PRISMOptions> {
  PRISMOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, b1) = 0.95;
  TORCH_ARG(double, gamma) = 1.0;
  TORCH_ARG(double, weight_decay) = 0.0;  // both branches, decoupled
  TORCH_ARG(int64_t, ns_iters) = 5;
  // (a, b, c) triples, one per Newton-Schulz iteration (the last repeats).
  TORCH_ARG(std::vector<double>, ns_coeffs) = std::vector<double> { 3.4445, -4.775, 2.0315 };
  TORCH_ARG(std::string, mode) = "original";  // or "bidirectional"
  TORCH_ARG(std::string, preconditioning) = "frobenius";
  // A named coefficient preset ("standard", "dion", "polar_express": the
  // tables of common/newton_schulz.h for this iteration count); when set it
  // replaces ns_coeffs. Empty: use ns_coeffs.
  TORCH_ARG(std::string, ns_preset) = "";
  // A dimension spec (common/matrix_dims.h) for this group's params with as
  // many dims as the spec has axes: each is a batch of (output, reduction)
  // matrices and takes the matrix step unless the route option says false.
  TORCH_ARG(std::optional<common::MatrixDims>, matrix_dims) = std::nullopt;
  TORCH_ARG(int64_t, inv_steps) = 6;
  TORCH_ARG(double, inv_eps) = 1e-5;
  TORCH_ARG(double, inv_scale) = 1.001;
  TORCH_ARG(double, eps_gram) = 1e-6;
  TORCH_ARG(std::optional<double>, gamma_l) = std::nullopt;  // nullopt: gamma
  TORCH_ARG(std::optional<double>, gamma_r) = std::nullopt;
  TORCH_ARG(bool, nesterov) = true;
  TORCH_ARG(bool, shape_nesterov) = true;
  TORCH_ARG(bool, bias_correction) = false;
  TORCH_ARG(std::string, momentum_accumulator) = "ema";  // or "heavy_ball"
  typedef std::tuple<double, double> amps_t;
  // (RMS cap, element cap) of the post-clip; nullopt disables it.
  TORCH_ARG(std::optional<amps_t>, grad_clip_max_amps) = std::make_tuple(2.0, 10.0);
  TORCH_ARG(std::optional<double>, raw_global_grad_clip) = std::nullopt;
  TORCH_ARG(bool, permissive_spike_protection) = true;
  // Momentum storage (nullopt: the param's dtype); bf16 is stochastically rounded.
  TORCH_ARG(std::optional<at::ScalarType>, mu_dtype) = std::nullopt;
  // Dtype of the shaping iterations (rollfast: float32; nullopt: the momentum math dtype).
  TORCH_ARG(std::optional<at::ScalarType>, ns_dtype) = at::kFloat;
  // nullopt: 2-D params take PRISM; true: every >= 2-D param; false: none.
  TORCH_ARG(std::optional<bool>, use_prism) = std::nullopt;
  // The AdamW branch's lr when the group's lr is `initial_lr`; it follows lr
  // schedules in proportion (nullopt: lr itself).
  TORCH_ARG(std::optional<double>, adam_lr) = std::nullopt;
  TORCH_ARG(std::optional<double>, initial_lr) = std::nullopt;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, adam_betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, adam_eps) = 1e-8;
  // The fallback's Nesterov (NAdamW) form, rollfast's adamw(nesterov=True);
  // false: plain AdamW.
  TORCH_ARG(bool, adam_nesterov) = false;
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(bool, use_magma) = false;
  TORCH_ARG(double, magma_p) = 0.5;
  TORCH_ARG(double, magma_tau) = 2.0;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const PRISMOptions& lhs, const PRISMOptions& rhs);
};

struct PRISMParamState : public torch::optim::OptimizerCloneableParamState<PRISMParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, mu) = {};           // PRISM-routed params
  TORCH_ARG(at::Tensor, magma_score) = {};  // PRISM-routed params with use_magma
  TORCH_ARG(at::Tensor, exp_avg) = {};      // AdamW-routed params
  TORCH_ARG(at::Tensor, exp_avg_sq) = {};

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const PRISMParamState& lhs, const PRISMParamState& rhs);
};

class PRISM : public MatrixOptimizer<PRISM, PRISMOptions, PRISMParamState> {
 public:
  explicit PRISM(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, PRISMOptions defaults = {});
  explicit PRISM(std::vector<at::Tensor> params, PRISMOptions defaults = {});

  // Hooks of MatrixOptimizer.
  static std::optional<bool> route(const PRISMOptions& options) { return options.use_prism(); }
  static std::optional<at::ScalarType> storage_dtype(const PRISMOptions& options) { return options.mu_dtype(); }
  static at::Tensor& momentum(PRISMParamState& state) { return state.mu(); }
  static double adam_weight_decay(const PRISMOptions& options) { return options.weight_decay(); }
  void matrix_step(PRISMOptions& options, MatrixGroupLists& lists);
  void fallback_step(PRISMOptions& options, MatrixGroupLists& lists);
  // The raw global norm over the PRISM grads of every group that sets
  // raw_global_grad_clip (rollfast's partition sees all PRISM leaves at once).
  void before_groups();

 private:
  std::optional<at::Tensor> raw_grad_norm_;
};

}  // namespace torchopt_ext::optim
