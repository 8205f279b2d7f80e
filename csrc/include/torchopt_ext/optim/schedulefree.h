// Schedule-Free optimizers (Defazio et al. 2024; rollfast.md §4):
// ScheduleFreeAdamW / ScheduleFreeSGD (fused, options named as the
// schedulefree package's AdamWScheduleFree / SGDScheduleFree) and the
// ScheduleFree wrapper around any torch::optim::Optimizer.
//
// The params hold y (where gradients are taken) while training and the
// averaged point x after eval(); call train() before stepping again (step()
// throws in eval mode). Optimizers start in train mode.
#pragma once

#include <torch/arg.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "torchopt_ext/optim/kron.h"
#include "torchopt_ext/optim/optimizer_base.h"
#include "torchopt_ext/optim/prism.h"
#include "torchopt_ext/schedules/wsd.h"

namespace torchopt_ext::optim {

struct ScheduleFreeAdamWOptions : public torch::optim::OptimizerCloneableOptions<ScheduleFreeAdamWOptions> {
  ScheduleFreeAdamWOptions(double lr = 0.0025);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 0.0025;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(int64_t, warmup_steps) = 0;
  TORCH_ARG(double, r) = 0;
  TORCH_ARG(double, weight_lr_power) = 2.0;
  // Whether the params hold y (true) or x; kept per group and saved.
  TORCH_ARG(bool, train_mode) = true;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const ScheduleFreeAdamWOptions& lhs, const ScheduleFreeAdamWOptions& rhs);
};

struct ScheduleFreeSGDOptions : public torch::optim::OptimizerCloneableOptions<ScheduleFreeSGDOptions> {
  ScheduleFreeSGDOptions(double lr = 1.0);  // NOLINT: implicit, as LibTorch's options
  TORCH_ARG(double, lr) = 1.0;
  TORCH_ARG(double, momentum) = 0.9;
  TORCH_ARG(double, weight_decay) = 0;
  TORCH_ARG(int64_t, warmup_steps) = 0;
  TORCH_ARG(double, r) = 0;
  TORCH_ARG(double, weight_lr_power) = 2.0;
  TORCH_ARG(bool, train_mode) = true;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(bool, stochastic_rounding) = false;
  TORCH_ARG(int64_t, seed) = 0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  void validate() const;
  friend bool operator==(const ScheduleFreeSGDOptions& lhs, const ScheduleFreeSGDOptions& rhs);
};

// Per-param state of both fused optimizers: z (param-shaped), exp_avg_sq
// (AdamW only), and float64 scalars step, weight_sum (from 0), lr_max (from -1).
struct ScheduleFreeParamState : public torch::optim::OptimizerCloneableParamState<ScheduleFreeParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, z);
  TORCH_ARG(at::Tensor, exp_avg_sq);
  TORCH_ARG(at::Tensor, weight_sum);
  TORCH_ARG(at::Tensor, lr_max);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  friend bool operator==(const ScheduleFreeParamState& lhs, const ScheduleFreeParamState& rhs);
};

class ScheduleFreeAdamW : public OptimizerBase<ScheduleFreeAdamWOptions> {
 public:
  explicit ScheduleFreeAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                             ScheduleFreeAdamWOptions defaults = {});
  explicit ScheduleFreeAdamW(std::vector<at::Tensor> params, ScheduleFreeAdamWOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  // Params of every group to x (eval) or back to y (train); no-op if already there.
  void eval();
  void train();
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

class ScheduleFreeSGD : public OptimizerBase<ScheduleFreeSGDOptions> {
 public:
  explicit ScheduleFreeSGD(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                           ScheduleFreeSGDOptions defaults = {});
  explicit ScheduleFreeSGD(std::vector<at::Tensor> params, ScheduleFreeSGDOptions defaults = {});

  at::Tensor step(LossClosure closure = nullptr) override;
  void eval();
  void train();
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

// Options of the generic wrapper (see torchopt_ext.optim.ScheduleFree for the math).
struct ScheduleFreeOptions {
  TORCH_ARG(double, b1) = 0.9;
  // "theoretical", "practical", "schedulet" or "power", any case.
  TORCH_ARG(std::string, weighting_mode) = "practical";
  TORCH_ARG(double, r) = 0.0;
  TORCH_ARG(double, weight_lr_power) = 2.0;
  // Weight with the running max of the lr (the schedulefree package's wrapper) instead of the current lr.
  TORCH_ARG(bool, use_lr_max) = false;
  TORCH_ARG(int64_t, c_warmup) = 0;
  TORCH_ARG(int64_t, b1_anneal_steps) = 0;
  TORCH_ARG(double, b1_max) = 0.965;
  TORCH_ARG(double, weight_decay_at_y) = 0.0;
  TORCH_ARG(double, adamc_weight_decay) = 0.0;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  // Start of the running lr max (rollfast's lr_max_init).
  TORCH_ARG(double, lr_max_init) = 1e-8;
  // Schedule-Free+ Polyak scalar rho (functional::schedulefree_polyak_): the
  // step needs the loss (closure or the loss argument of step()).
  TORCH_ARG(bool, polyak) = false;
  TORCH_ARG(double, polyak_beta) = 0.0;
  TORCH_ARG(double, polyak_f_star) = 0.0;
  TORCH_ARG(double, polyak_eps) = 1e-30;

 public:
  void validate() const;
};

// Schedule-Free around any torch::optim::Optimizer: the base optimizer steps
// z, the wrapper keeps z (one param-sized buffer per param) and the per-group
// scalars [k, weight sum, lr_max, b1 in use]. LR schedulers attach to the base
// optimizer (the wrapper reads each base group's lr every step).
class ScheduleFree {
 public:
  explicit ScheduleFree(std::shared_ptr<torch::optim::Optimizer> base, ScheduleFreeOptions options = {});

  // With polyak(true) the loss at y comes from the closure or, without one,
  // from `loss` (a one-element CPU tensor).
  at::Tensor step(torch::optim::Optimizer::LossClosure closure = nullptr, at::Tensor loss = {});
  void zero_grad(bool set_to_none = true);
  void eval();
  void train();
  bool train_mode() const { return train_mode_; }
  torch::optim::Optimizer& base() { return *base_; }
  const ScheduleFreeOptions& options() const { return options_; }
  // The group's [k, weight_sum, lr_max, b1] (float64, created on first use).
  const at::Tensor& sf_state(size_t group);
  // [g1 EMA, count, rho] of the Polyak scalar (rho = 1 until a Polyak step).
  const at::Tensor& polyak_state() const { return polyak_state_; }

  // Saves the base optimizer under "base", z by flat param index, the group
  // scalars and the mode.
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  void set_mode(bool train);

  std::shared_ptr<torch::optim::Optimizer> base_;
  ScheduleFreeOptions options_;
  std::string mode_;  // canonical weighting_mode
  bool train_mode_ = true;
  std::unordered_map<c10::TensorImpl*, at::Tensor> z_;
  std::vector<at::Tensor> sf_state_;
  at::Tensor polyak_state_;
};

// The Schedule-Free+ knobs of rollfast's convenience wrappers (rollfast.md
// §4.4). sf_use_lr_max and polyak (and the configs' use_adamc) default to
// schedule_free_plus.
struct ScheduleFreePlusKnobs {
  TORCH_ARG(bool, schedule_free_plus) = false;
  TORCH_ARG(double, sf_r) = 0.0;
  TORCH_ARG(int64_t, sf_c_warmup) = 0;
  TORCH_ARG(double, sf_weight_lr_power) = 2.0;
  TORCH_ARG(std::optional<bool>, sf_use_lr_max) = std::nullopt;
  TORCH_ARG(std::optional<bool>, polyak) = std::nullopt;
  TORCH_ARG(int64_t, sf_b1_anneal_steps) = 0;
  TORCH_ARG(double, sf_b1_max) = 0.965;
  TORCH_ARG(double, polyak_beta) = 0.0;
  TORCH_ARG(double, polyak_f_star) = 0.0;
};

// rollfast's schedule_free_adam: Schedule-Free around AdamW(betas = (b1, b2),
// no decay of its own; b1/b2 default to 0 / 0.999, or 0.9 / 0.95 with
// schedule_free_plus) with one WSD schedule driving both the step size and
// the "practical" averaging weights. weight_decay acts at y inside the step
// (weight_decay_at_y), or as AdamC with use_adamc. lr_max starts at eps.
struct ScheduleFreeAdamWConfig {
  TORCH_ARG(std::string, weighting_mode) = "practical";
  TORCH_ARG(double, sf_b1) = 0.9;
  TORCH_ARG(std::optional<double>, b1) = std::nullopt;
  TORCH_ARG(std::optional<double>, b2) = std::nullopt;
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(std::optional<bool>, use_adamc) = std::nullopt;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(ScheduleFreePlusKnobs, sf_plus) = {};
};

// rollfast's schedule_free_prism: Schedule-Free around PRISM(b1 = prism_b1 = 0,
// nesterov = false, no Magma) whose params are split into two groups: the
// 2-D params (PRISM, peak lr `lr`) and the others (AdamW fallback, peak lr
// adam_lr or lr, betas (adam_b1, adam_b2) defaulting to (0, 0.999), or
// (0.9, 0.95) with schedule_free_plus). The WSD scheduler scales each group
// from its own peak (the fallback's own WSD) and the wrapper weights and
// decays each group with its own lr. `prism` carries the other PRISM options
// (gamma, ns_iters, mode, clipping, ns_dtype, ...); lr, b1, nesterov,
// weight_decay, mu_dtype (= state_dtype), use_magma, use_prism and the adam_*
// options are set here.
struct ScheduleFreePrismConfig {
  TORCH_ARG(std::string, weighting_mode) = "practical";
  TORCH_ARG(double, sf_b1) = 0.9;
  TORCH_ARG(double, prism_b1) = 0.0;
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(std::optional<bool>, use_adamc) = std::nullopt;
  TORCH_ARG(std::optional<double>, adam_lr) = std::nullopt;
  TORCH_ARG(std::optional<double>, adam_b1) = std::nullopt;
  TORCH_ARG(std::optional<double>, adam_b2) = std::nullopt;
  TORCH_ARG(double, adam_eps) = 1e-8;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(PRISMOptions, prism) = PRISMOptions();
  TORCH_ARG(ScheduleFreePlusKnobs, sf_plus) = {};
};

// rollfast's schedule_free_kron: Schedule-Free around Kron(b1 = 0,
// whiten_grad = true, no Magma, no decay of its own) with one WSD schedule
// driving the step size and the averaging weights. `kron` carries the other
// Kron options (preconditioner_mode, preconditioner_lr, clipping, seed, ...);
// lr, b1, whiten_grad, weight_decay and use_magma are set here (mu_dtype is
// unused with b1 = 0, as rollfast does not forward it).
struct ScheduleFreeKronConfig {
  TORCH_ARG(std::string, weighting_mode) = "practical";
  TORCH_ARG(double, sf_b1) = 0.9;
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(std::optional<bool>, use_adamc) = std::nullopt;
  TORCH_ARG(std::optional<at::ScalarType>, state_dtype) = std::nullopt;
  TORCH_ARG(KronOptions, kron) = KronOptions();
  TORCH_ARG(ScheduleFreePlusKnobs, sf_plus) = {};
};

// The optimizer and its schedule; call scheduler->step() after each
// optimizer->step(). The scheduler is declared last so it goes first.
struct ScheduleFreeWithSchedule {
  std::shared_ptr<ScheduleFree> optimizer;
  std::unique_ptr<schedules::WSD> scheduler;
};

ScheduleFreeWithSchedule schedule_free_adamw(std::vector<at::Tensor> params, double lr, schedules::WSDOptions schedule,
                                             ScheduleFreeAdamWConfig config = {});

ScheduleFreeWithSchedule schedule_free_prism(std::vector<at::Tensor> params, double lr, schedules::WSDOptions schedule,
                                             ScheduleFreePrismConfig config = {});

ScheduleFreeWithSchedule schedule_free_kron(std::vector<at::Tensor> params, double lr, schedules::WSDOptions schedule,
                                            ScheduleFreeKronConfig config = {});

// The part the convenience constructors share: ScheduleFree around `base`
// (built at its peak lrs with no weight decay of its own) with the SF+ knobs,
// weight_decay at y (or AdamC with use_adamc, default: schedule_free_plus),
// and a WSD scheduler on the base's groups. A new wrapper (Kron, ...) only
// builds its base.
ScheduleFreeWithSchedule schedule_free_with_wsd(std::shared_ptr<torch::optim::Optimizer> base,
                                                schedules::WSDOptions schedule, const std::string& weighting_mode,
                                                double sf_b1, std::optional<at::ScalarType> state_dtype,
                                                double weight_decay, std::optional<bool> use_adamc,
                                                const ScheduleFreePlusKnobs& knobs, double lr_max_init = 1e-8);

}  // namespace torchopt_ext::optim
