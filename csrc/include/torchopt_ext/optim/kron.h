// torchopt_ext::optim::Kron, options named as rollfast's `kron` (lr is the
// learning rate); the step is functional::kron_step_ (functional/kron.h), the
// same code torchopt_ext.optim.Kron calls. Every param is Kron-preconditioned.
#pragma once

#include <torch/arg.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

struct KronOptions : public torch::optim::OptimizerCloneableOptions<KronOptions> {
  KronOptions(double lr = 1e-3);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, b1) = 0.9;
  TORCH_ARG(double, weight_decay) = 0.0;  // decoupled: p -= lr (d + weight_decay p)
  // A fixed probability in [0, 1]; nullopt: rollfast's default schedule
  // clamp(exp(-0.001 (n - 500)), 0.03, 1) of the 1-based step n.
  TORCH_ARG(std::optional<double>, preconditioner_update_probability) = std::nullopt;
  TORCH_ARG(int64_t, max_size_triangular) = 8192;
  TORCH_ARG(double, max_skew_triangular) = 1.0;
  TORCH_ARG(int64_t, min_ndim_triangular) = 2;
  TORCH_ARG(std::optional<std::string>, memory_save_mode) = std::nullopt;  // "one_diag" / "all_diag"
  TORCH_ARG(bool, whiten_grad) = true;
  TORCH_ARG(bool, update_preconditioner_first) = true;
  TORCH_ARG(double, preconditioner_lr) = 0.1;
  TORCH_ARG(std::optional<double>, preconditioner_init_scale) = std::nullopt;  // nullopt: lazy
  // Storage (nullopt: float32, float64 for float64 params); bf16 is
  // stochastically rounded, math stays float32.
  TORCH_ARG(std::optional<at::ScalarType>, mu_dtype) = std::nullopt;
  TORCH_ARG(std::optional<at::ScalarType>, precond_dtype) = std::nullopt;
  TORCH_ARG(std::string, preconditioner_mode) = "Q0.5EQ1.5";
  TORCH_ARG(double, beta_lipschitz) = 0.9;
  TORCH_ARG(bool, track_lipschitz) = true;
  TORCH_ARG(double, damping) = 1e-9;
  typedef std::tuple<double, double> amps_t;
  // (RMS cap, element cap) of the post-clip; nullopt disables it.
  TORCH_ARG(std::optional<amps_t>, grad_clip_max_amps) = std::make_tuple(2.0, 10.0);
  TORCH_ARG(std::string, grad_clip_mode) = "per_tensor_rms";  // or "global_rms"
  TORCH_ARG(std::optional<double>, raw_global_grad_clip) = std::nullopt;
  TORCH_ARG(bool, permissive_spike_protection) = true;
  TORCH_ARG(int64_t, newton_schulz_iters) = 5;
  TORCH_ARG(bool, maximize) = false;
  TORCH_ARG(bool, use_magma) = false;
  TORCH_ARG(double, magma_p) = 0.5;
  TORCH_ARG(double, magma_tau) = 2.0;
  TORCH_ARG(bool, stochastic_rounding) = false;  // bf16/fp16 params
  // Seeds the optimizer's generator (and the rounding / Magma hash streams).
  TORCH_ARG(int64_t, seed) = 0;
  // Scanned layers: every param is (L, ...) and slice p[i] gets its own
  // factors (laid out from p.shape[1:]); Q, L and magma_score gain a leading
  // L axis. The functional updates the slices as batches (draws in the order
  // of L separate params listed slice by slice).
  TORCH_ARG(bool, stacked) = false;
  // Slices per batch of a stacked param (bounds the batched temporaries);
  // nullopt: all L at once. >= 1.
  TORCH_ARG(std::optional<int64_t>, stacked_chunk_size) = std::nullopt;
  // Problems of one slice shape (the slices of a stacked param, unstacked
  // params of equal shape) updated as one batch (true) or one at a time
  // (false); nullopt: batched on CUDA, on the CPU only for small slices
  // (common::psgd::prefer_batched). Results agree up to rounding.
  TORCH_ARG(std::optional<bool>, batch_equal_shapes) = std::nullopt;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const KronOptions& lhs, const KronOptions& rhs);
};

struct KronParamState : public torch::optim::OptimizerCloneableParamState<KronParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, mu) = {};  // b1 > 0
  // With stacked, Q, L and magma_score have a leading axis of one entry per slice.
  TORCH_ARG(at::Tensor, Q) = {};            // all factors, flattened back to back
  TORCH_ARG(at::Tensor, L) = {};            // one Lipschitz estimate per factor
  TORCH_ARG(at::Tensor, magma_score) = {};  // use_magma

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const KronParamState& lhs, const KronParamState& rhs);
};

class Kron : public OptimizerBase<KronOptions> {
 public:
  explicit Kron(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, KronOptions defaults = {});
  explicit Kron(std::vector<at::Tensor> params, KronOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  // Saves / loads the param states, the groups' options and the generator.
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  // The optimizer's generator state (a CPU torch.Generator state, uint8):
  // one per optimizer, shared by all groups, seeded from the defaults' seed.
  const at::Tensor& rng_state() const { return rng_state_; }

 private:
  at::Tensor rng_state_;
};

}  // namespace torchopt_ext::optim
