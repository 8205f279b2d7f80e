// torchopt_ext::optim::WhiteKron: eformer's blocked Kronecker PSGD "skew" /
// "quad" (white_kron.md), options named as there (lr is the learning rate,
// update_style picks "skew" or "quad"). Math in functional/white_kron.h.
#pragma once

#include <torch/arg.h>

#include <string>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct WhiteKronOptions : public torch::optim::OptimizerCloneableOptions<WhiteKronOptions> {
  WhiteKronOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, b1) = 0.95;
  TORCH_ARG(double, weight_decay) = 0.1;          // decoupled
  TORCH_ARG(std::string, update_style) = "skew";  // or "quad"
  TORCH_ARG(std::string, lr_style) = "adam";      // or "none"
  TORCH_ARG(bool, normalize_grads) = false;
  TORCH_ARG(int64_t, max_size_dense) = 16384;
  TORCH_ARG(double, preconditioner_lr) = 0.7;
  TORCH_ARG(double, preconditioner_init_scale) = 1.0;
  TORCH_ARG(at::ScalarType, dtype) = at::kBFloat16;  // factor / mu storage: bf16 or fp32
  TORCH_ARG(int64_t, block_size) = 256;
  TORCH_ARG(double, noise_scale) = 1e-9;
  TORCH_ARG(int64_t, balance_every) = 100;
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(bool, stochastic_rounding) = false;  // bf16 params
  TORCH_ARG(int64_t, seed) = 0;                  // noise and norm-bound draws
  // Scanned layers: every param is (L, ...) and slice p[i] is preconditioned
  // on its own (path and tiles of p.shape[1:]); ql, qr, lip_l, lip_r gain a
  // leading L axis. The functional gets the slices as params (views), so all
  // their dense tiles join the one tile stack.
  TORCH_ARG(bool, stacked) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const WhiteKronOptions& lhs, const WhiteKronOptions& rhs);
};

struct WhiteKronParamState : public torch::optim::OptimizerCloneableParamState<WhiteKronParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, mu) = {};  // with b1 > 0
  TORCH_ARG(at::Tensor, ql);
  TORCH_ARG(at::Tensor, qr);
  TORCH_ARG(at::Tensor, lip_l);
  TORCH_ARG(at::Tensor, lip_r);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const WhiteKronParamState& lhs, const WhiteKronParamState& rhs);
};

class WhiteKron : public OptimizerBase<WhiteKronOptions> {
 public:
  explicit WhiteKron(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                     WhiteKronOptions defaults = {});
  explicit WhiteKron(std::vector<at::Tensor> params, WhiteKronOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
