// torchopt_ext::optim::KronPSGD: rlx-optim's `KronPsgd` (seed 002) with the
// crate's field names and defaults (lr has none: KronPSGDOptions(lr)). 2-D
// params: triangular Kronecker preconditioner fitted on the gradient,
// max-abs clip, heavy-ball momentum; every other param: SGD with momentum
// (functional/kron_psgd.h).
#pragma once

#include <torch/arg.h>

#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct KronPSGDOptions : public torch::optim::OptimizerCloneableOptions<KronPSGDOptions> {
  explicit KronPSGDOptions(double lr);
  TORCH_ARG(double, lr);
  TORCH_ARG(double, precond_lr) = 0.1;    // Lie-group step size of Q_L / Q_R
  TORCH_ARG(double, momentum) = 0.9;      // heavy ball, after preconditioning
  TORCH_ARG(double, weight_decay) = 0.0;  // L2, added to the clipped direction
  TORCH_ARG(double, eps) = 1e-8;          // floor of the factor-step normaliser
  TORCH_ARG(double, clip) = 1.0;          // max-abs cap of the preconditioned gradient
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(bool, stochastic_rounding) = false;  // bf16 params
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const KronPSGDOptions& lhs, const KronPSGDOptions& rhs);
};

struct KronPSGDParamState : public torch::optim::OptimizerCloneableParamState<KronPSGDParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, momentum_buffer) = {};
  TORCH_ARG(at::Tensor, ql) = {};  // 2-D params: (m, m) upper-triangular
  TORCH_ARG(at::Tensor, qr) = {};  // 2-D params: (n, n) upper-triangular

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const KronPSGDParamState& lhs, const KronPSGDParamState& rhs);
};

class KronPSGD : public OptimizerBase<KronPSGDOptions> {
 public:
  explicit KronPSGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, KronPSGDOptions defaults);
  explicit KronPSGD(std::vector<at::Tensor> params, KronPSGDOptions defaults);

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace torchopt_ext::optim
