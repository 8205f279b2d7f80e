#include "torchopt_ext/functional/mars.h"

#include <c10/util/Exception.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/norm_sqs.h"
#include "common/tensor_lists.h"
#include "functional/matrix_parts.h"
#include "kernels/cpu/mars.h"
#include "kernels/cuda/elementwise.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/common/side_by_side.h"

namespace torchopt_ext::functional {
namespace {

constexpr int64_t kMarsNorms = 1;  // ||c||^2

struct MarsArgs {
  std::optional<common::DenseGroup<4>> group;
  kernels::cpu::MARSHyperparams hp;
};

// Checks shared by mars_step_ and mars_norm_sqs; prepares the group (which
// advances `state_steps`).
MarsArgs prepare_mars(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                      at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                      double weight_decay, double gamma, c10::string_view mars_type, bool amsgrad, bool maximize,
                      bool is_approx, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  using common::check_hyperparameter;
  const bool lion = mars_type == "mars-lion";
  const bool shampoo = mars_type == "mars-shampoo";
  TORCH_CHECK_VALUE(lion || shampoo || mars_type == "mars-adamw", op,
                    ": mars_type must be 'mars-adamw', 'mars-lion' or 'mars-shampoo', got '", mars_type, "'");
  TORCH_CHECK_VALUE(!(amsgrad && (lion || shampoo)), op, ": amsgrad applies to mars-adamw only (with mars-shampoo, ",
                    "pass the non-matrix params in a mars-adamw call)");
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "gamma", gamma, gamma >= 0.0, ">= 0");
  if (shampoo) {
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK_VALUE(params[i].dim() == 2, op, ": mars-shampoo orthogonalizes matrices, but params[", i, "] has ",
                        params[i].dim(), " dims (pass other params in a mars-adamw call)");
    }
  }
  MarsArgs out;
  out.group = common::prepare_elementwise_group<4>(op, params, grads,
                                                   {{{"exp_avgs", exp_avgs},
                                                     {"exp_avg_sqs", exp_avg_sqs, !lion && !shampoo},
                                                     {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad},
                                                     {"last_grads", last_grads}}},
                                                   state_steps, lr, grad_scale, found_inf);
  if (out.group) {
    out.hp = {out.group->lr, beta1, beta2, eps, weight_decay, gamma, lion, amsgrad, maximize, shampoo, is_approx};
  }
  return out;
}

// mars-shampoo's matrix step after the fused momentum pass: O = NS5(m / (1 - b1))
// (Keller Jordan's coefficients, X / (||X|| + eps) as the official code), then
// p <- p - lr (sqrt(max(1, rows / cols)) O + wd p). One matrix at a time (per
// thread), as Muon: on CPU a batched bf16 bmm is no faster than separate
// GEMMs, and each temporary is freed before the next matrix. CUDA params take Muon's apply
// kernel, which reads lr and the (already advanced) step on the device.
void mars_shampoo_apply(common::DenseGroup<4>& group, double beta1, double eps, double weight_decay,
                        std::optional<at::ScalarType> ns_dtype, bool stochastic_rounding, int64_t seed) {
  common::NewtonSchulzOptions ns;
  ns.eps = eps;
  ns.eps_clamp = false;
  ns.dtype = ns_dtype;
  // Side by side on a multi-threaded CPU (as Muon), costed by the GEMM work.
  std::vector<double> costs;
  for (const auto& param : group.params) {
    costs.push_back(static_cast<double>(param.numel()) * static_cast<double>(std::min(param.size(0), param.size(1))));
  }
  common::run_side_by_side(costs, !group.on_cuda, [&](size_t i) {
    at::Tensor& param = group.params[i];
    const at::Tensor& m = group.state[0][i];
    const at::Tensor moment = m.to(at::promote_types(m.scalar_type(), at::kFloat)) * (1.0 / (1.0 - beta1));
    // The official code casts O back to the momentum's dtype before the update.
    const at::Tensor update = common::newton_schulz(moment, ns).to(m.scalar_type());
    const double scale =
        std::sqrt(std::max(1.0, static_cast<double>(param.size(0)) / static_cast<double>(param.size(1))));
    if (group.on_cuda) {
      detail::apply_matrix_update_cuda(param, update, detail::matrix_scalars(group, i), at::Tensor(),
                                       common::MagmaOptions{}, weight_decay, scale, stochastic_rounding, seed,
                                       static_cast<int64_t>(i));
      return;
    }
    detail::apply_matrix_update(param, update, group.lr, 1.0, weight_decay, scale, stochastic_rounding, seed,
                                static_cast<int64_t>(i), group.steps[i]);
  });
}

}  // namespace

void mars_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList last_grads, at::TensorList state_steps,
                const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay, double gamma,
                c10::string_view mars_type, bool amsgrad, bool maximize, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& norm_sqs, bool is_approx, std::optional<at::ScalarType> ns_dtype) {
  constexpr const char* op = "mars_step_";
  const auto given = common::check_norm_sqs(op, params, norm_sqs, kMarsNorms);
  if (ns_dtype) {
    TORCH_CHECK_VALUE(at::isFloatingType(*ns_dtype), op, ": ns_dtype must be a floating dtype, got ", *ns_dtype);
  }
  auto args =
      prepare_mars(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, state_steps, lr, beta1, beta2,
                   eps, weight_decay, gamma, mars_type, amsgrad, maximize, is_approx, grad_scale, found_inf);
  auto& group = args.group;
  if (!group) {
    return;
  }
  // mars-shampoo's Newton-Schulz and apply are ATen work with no device-side
  // skip: a CUDA found_inf is read here (one sync), as Muon's step does.
  if (args.hp.momentum_only && group->on_cuda && group->device.found_inf.defined() &&
      group->device.found_inf.item<double>() != 0.0) {
    return;
  }
  const auto& s = group->state;
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, mars_step, group->params, group->grads, s[0], s[1], s[2], s[3], group->steps,
                               args.hp, {stochastic_rounding, seed, group->amp.grad_scale}, given);
  if (args.hp.momentum_only) {
    mars_shampoo_apply(*group, beta1, eps, weight_decay, ns_dtype, stochastic_rounding, seed);
  }
  group->finish();
}

at::Tensor mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                         at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                         double weight_decay, double gamma, c10::string_view mars_type, bool amsgrad, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "mars_norm_sqs";
  const auto steps = common::peek_steps(state_steps);
  auto out = common::empty_norm_sqs(params, kMarsNorms);
  auto args =
      prepare_mars(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, steps, lr, beta1, beta2, eps,
                   weight_decay, gamma, mars_type, amsgrad, maximize, /*is_approx=*/true, grad_scale, found_inf);
  auto& group = args.group;
  if (!group) {
    return out;  // zeros: nothing to do, or a skipped (found_inf) step
  }
  const auto& s = group->state;
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, mars_norm_sqs, group->params, group->grads, s[0], s[1], s[2], s[3], group->steps,
                               args.hp, {false, 0, group->amp.grad_scale}, out);
  return out;
}

}  // namespace torchopt_ext::functional
