// The LibTorch side shared by the matrix optimizers (Muon, PRISM): routing
// between the matrix functional and the AdamW fallback, lazily created state,
// the adam_lr rule, save/load. A derived class (CRTP) supplies:
//   static std::optional<bool> route(const Options&);          // use_muon / use_prism
//   static std::optional<at::ScalarType> storage_dtype(const Options&);
//   static at::Tensor& momentum(ParamState&);                  // momentum_buffer / mu
//   static double adam_weight_decay(const Options&);
//   void matrix_step(Options&, MatrixGroupLists&);             // calls its functional
#pragma once

#include <ATen/ATen.h>
#include <torch/optim/serialize.h>
#include <torch/utils.h>

#include <optional>
#include <vector>

#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/matrix_dims.h"
#include "torchopt_ext/functional/adam.h"
#include "torchopt_ext/optim/optimizer_base.h"

namespace torchopt_ext::optim {

// One param group split by route: the matrix branch's lists (moments and, with
// Magma, scores) and the AdamW branch's.
struct MatrixGroupLists {
  std::vector<at::Tensor> params, grads, moments, scores, steps;
  std::vector<at::Tensor> params_adam, grads_adam, exp_avgs, exp_avg_sqs, steps_adam, scores_adam;
  std::vector<int64_t> matrix_dims;  // the matrix params' specs, common/matrix_dims.h encoding
};

template <typename Derived, typename Options, typename ParamState>
class MatrixOptimizer : public OptimizerBase<Options> {
 public:
  using LossClosure = torch::optim::Optimizer::LossClosure;

  MatrixOptimizer(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, const Options& defaults,
                  const char* name, const char* route_option)
      : OptimizerBase<Options>(param_groups, defaults) {
    for (auto& group : this->param_groups_) {
      auto& options = this->options_of(group);
      if (!options.initial_lr()) {
        options.initial_lr(options.lr());
      }
      for (const auto& param : group.params()) {
        TORCH_CHECK_VALUE(!(Derived::route(options).value_or(false) && param.dim() < 2), name, ": ", route_option,
                          "=true needs matrices, got a param of shape ", param.sizes());
      }
    }
  }

  // Whether the group's dimension spec applies to `param` (same number of axes).
  static bool has_spec(const Options& options, const at::Tensor& param) {
    return options.matrix_dims() && common::matrix_dims_ndim(*options.matrix_dims()) == param.dim();
  }

  // Whether `param` takes the matrix step under `options` (else AdamW): the
  // route option when set, else params the spec fits, else 2-D params.
  static bool routes_to_matrix(const Options& options, const at::Tensor& param) {
    const auto route = Derived::route(options);
    return route ? *route : (has_spec(options, param) || param.dim() == 2);
  }

  // The AdamW branch's current lr: adam_lr scaled as lr moved from initial_lr.
  static double adam_branch_lr(const Options& options) {
    if (!options.adam_lr()) {
      return options.lr();
    }
    const double initial = options.initial_lr().value_or(options.lr());
    return initial > 0.0 ? options.lr() * (*options.adam_lr() / initial) : 0.0;
  }

  at::Tensor step(LossClosure closure = nullptr) override {
    torch::NoGradGuard no_grad;
    at::Tensor loss = this->run_closure(closure);
    static_cast<Derived*>(this)->before_groups();
    for (auto& group : this->param_groups_) {
      auto& options = this->options_of(group);
      if (!options.initial_lr()) {  // a group added after construction
        options.initial_lr(options.lr());
      }
      MatrixGroupLists lists = collect(group, options);
      if (!lists.params.empty()) {
        static_cast<Derived*>(this)->matrix_step(options, lists);
      }
      if (!lists.params_adam.empty()) {
        static_cast<Derived*>(this)->fallback_step(options, lists);
      }
    }
    return loss;
  }

  // Runs once per step before the groups (a derived class may shadow it).
  void before_groups() {}

  // The AdamW branch (a derived class may shadow this, e.g. PRISM's NAdamW form).
  void fallback_step(Options& options, MatrixGroupLists& lists) {
    const auto [beta1, beta2] = options.adam_betas();
    if (options.use_magma()) {
      // rollfast masks every leaf, the fallback's too, with its own draws.
      functional::adam_magma_step_(
          lists.params_adam, lists.grads_adam, lists.exp_avgs, lists.exp_avg_sqs, {}, lists.scores_adam,
          lists.steps_adam, at::scalar_tensor(adam_branch_lr(options), at::kDouble), beta1, beta2, options.adam_eps(),
          Derived::adam_weight_decay(options), /*decoupled_weight_decay=*/true, /*amsgrad=*/false, options.maximize(),
          options.magma_p(), options.magma_tau(), options.stochastic_rounding(),
          options.seed() ^ common::kMagmaFallbackSeedSalt, std::nullopt, std::nullopt);
      return;
    }
    functional::adam_step_(lists.params_adam, lists.grads_adam, lists.exp_avgs, lists.exp_avg_sqs, {}, lists.steps_adam,
                           at::scalar_tensor(adam_branch_lr(options), at::kDouble), beta1, beta2, options.adam_eps(),
                           Derived::adam_weight_decay(options),
                           /*decoupled_weight_decay=*/true, /*amsgrad=*/false, options.maximize(),
                           options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    torch::optim::serialize<ParamState, Options>(archive, *this);
  }

  void load(torch::serialize::InputArchive& archive) override {
    torch::optim::serialize<ParamState, Options>(archive, *this);
  }

 private:
  MatrixGroupLists collect(torch::optim::OptimizerParamGroup& group, const Options& options) {
    MatrixGroupLists lists;
    const auto dtype = Derived::storage_dtype(options);
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      const bool matrix = routes_to_matrix(options, param);
      auto& state = this->template state_of<ParamState>(param, [&] {
        auto fresh = std::make_unique<ParamState>();
        fresh->step(detail::new_step_counter(param));
        if (matrix) {
          Derived::momentum(*fresh) = detail::zeros_state(param, dtype);
        } else {
          fresh->exp_avg(detail::zeros_state(param, dtype));
          fresh->exp_avg_sq(detail::zeros_state(param, dtype));
        }
        return fresh;
      });
      // Counters and Magma's score on a CUDA param's device, as the Python
      // classes keep them (no host sync; the AdamW branch's Magma kernel
      // needs its scores there); a checkpoint's host ones move there.
      state.step(detail::placed_step(state.step(), param));
      if (options.use_magma()) {
        state.magma_score(detail::placed_magma_score(state.magma_score(), param));
      }
      if (matrix) {
        lists.params.push_back(param);
        common::encode_matrix_dims(has_spec(options, param) ? options.matrix_dims() : std::nullopt, lists.matrix_dims);
        lists.grads.push_back(param.grad());
        lists.moments.push_back(Derived::momentum(state));
        if (options.use_magma()) {
          lists.scores.push_back(state.magma_score());
        }
        lists.steps.push_back(state.step());
      } else {
        lists.params_adam.push_back(param);
        lists.grads_adam.push_back(param.grad());
        lists.exp_avgs.push_back(state.exp_avg());
        lists.exp_avg_sqs.push_back(state.exp_avg_sq());
        lists.steps_adam.push_back(state.step());
        if (options.use_magma()) {
          lists.scores_adam.push_back(state.magma_score());
        }
      }
    }
    return lists;
  }
};

}  // namespace torchopt_ext::optim
