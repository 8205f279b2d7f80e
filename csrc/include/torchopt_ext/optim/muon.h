// torchopt_ext::optim::Muon, options named as torch.optim.Muon's. Matrix
// params take the Muon step; the others an AdamW fallback with the adam_*
// options (see torchopt_ext/optim/muon.py for the routing rule).
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

struct MuonOptions : public torch::optim::OptimizerCloneableOptions<MuonOptions> {
  MuonOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, weight_decay) = 0.1;
  TORCH_ARG(double, momentum) = 0.95;
  TORCH_ARG(bool, nesterov) = true;
  // (a, b, c) triples, one per Newton-Schulz iteration (the last repeats).
  TORCH_ARG(std::vector<double>, ns_coefficients) = std::vector<double> { 3.4445, -4.775, 2.0315 };
  TORCH_ARG(double, eps) = 1e-7;
  TORCH_ARG(int64_t, ns_steps) = 5;
  TORCH_ARG(std::string, adjust_lr_fn) = "original";  // or "match_rms_adamw"
  TORCH_ARG(std::string, ns_normalization) = "frobenius";
  // A named coefficient preset ("standard", "dion", "polar_express": the
  // tables of common/newton_schulz.h for this iteration count); when set it
  // replaces ns_coefficients. Empty: use ns_coefficients.
  TORCH_ARG(std::string, ns_preset) = "";
  // A dimension spec (common/matrix_dims.h) for this group's params with as
  // many dims as the spec has axes: each is a batch of (output, reduction)
  // matrices and takes the matrix step unless the route option says false.
  TORCH_ARG(std::optional<common::MatrixDims>, matrix_dims) = std::nullopt;
  TORCH_ARG(std::optional<at::ScalarType>, ns_dtype) = at::kBFloat16;  // nullopt: the param's dtype
  // nullopt: 2-D params take Muon; true: every >= 2-D param; false: none.
  TORCH_ARG(std::optional<bool>, use_muon) = std::nullopt;
  // The AdamW branch's lr when the group's lr is `initial_lr`; it follows lr
  // schedules in proportion (nullopt: lr itself).
  TORCH_ARG(std::optional<double>, adam_lr) = std::nullopt;
  // The group's lr when the optimizer took it (recorded then, and saved), the
  // reference for adam_lr.
  TORCH_ARG(std::optional<double>, initial_lr) = std::nullopt;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, adam_betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, adam_eps) = 1e-8;
  TORCH_ARG(std::optional<double>, adam_weight_decay) = std::nullopt;  // nullopt: weight_decay
  TORCH_ARG(bool, maximize) = false;
  // Magma masking of the Muon updates (rollfast.md §5; draws seeded by `seed`).
  TORCH_ARG(bool, use_magma) = false;
  TORCH_ARG(double, magma_p) = 0.5;
  TORCH_ARG(double, magma_tau) = 2.0;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const MuonOptions& lhs, const MuonOptions& rhs);
};

struct MuonParamState : public torch::optim::OptimizerCloneableParamState<MuonParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, momentum_buffer) = {};  // Muon-routed params
  TORCH_ARG(at::Tensor, magma_score) = {};      // Muon-routed params with use_magma
  TORCH_ARG(at::Tensor, exp_avg) = {};          // AdamW-routed params
  TORCH_ARG(at::Tensor, exp_avg_sq) = {};

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const MuonParamState& lhs, const MuonParamState& rhs);
};

class Muon : public MatrixOptimizer<Muon, MuonOptions, MuonParamState> {
 public:
  explicit Muon(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, MuonOptions defaults = {});
  explicit Muon(std::vector<at::Tensor> params, MuonOptions defaults = {});

  // Hooks of MatrixOptimizer.
  static std::optional<bool> route(const MuonOptions& options) { return options.use_muon(); }
  static std::optional<at::ScalarType> storage_dtype(const MuonOptions& options) { return options.state_dtype(); }
  static at::Tensor& momentum(MuonParamState& state) { return state.momentum_buffer(); }
  static double adam_weight_decay(const MuonOptions& options) {
    return options.adam_weight_decay().value_or(options.weight_decay());
  }
  void matrix_step(MuonOptions& options, MatrixGroupLists& lists);
};

}  // namespace torchopt_ext::optim
