#include "torchopt_ext/functional/lamb.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/norm_sqs.h"
#include "common/tensor_lists.h"
#include "kernels/cpu/lamb.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {
namespace {

constexpr int64_t kLambNorms = 2;  // ||theta||^2, ||r||^2

struct LambArgs {
  std::optional<common::DenseGroup<2>> group;
  kernels::cpu::LAMBHyperparams hp;
  at::Tensor grad_divisor_on_device;  // keeps a converted device divisor alive for the launch
};

// Checks shared by lamb_step_ and lamb_norm_sqs; prepares the group (which
// advances `state_steps`).
LambArgs prepare_lamb(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                      double beta2, double eps, double weight_decay, bool bias_correction, bool grad_averaging,
                      bool trust_clip, bool always_adapt, bool decoupled_decay, bool maximize,
                      const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  LambArgs out;
  double divisor = 1.0;
  const double* device_divisor = nullptr;
  if (grad_divisor.has_value() && grad_divisor->defined()) {
    TORCH_CHECK_VALUE(grad_divisor->numel() == 1, op, ": grad_divisor must have one element");
    if (!params.empty() && params[0].is_cuda() && grad_divisor->device() == params[0].device()) {
      // Read by the kernels on the device: no host sync (and not range-checked here).
      out.grad_divisor_on_device = grad_divisor->to(at::kDouble).contiguous();
      device_divisor = out.grad_divisor_on_device.const_data_ptr<double>();
    } else {
      divisor = grad_divisor->item<double>();
      check_hyperparameter(op, "grad_divisor", divisor, divisor >= 1.0, ">= 1 (max(global norm / max_grad_norm, 1))");
    }
  }
  out.group =
      common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                           state_steps, lr, grad_scale, found_inf);
  if (out.group) {
    out.hp = {out.group->lr,   beta1,           beta2,          eps,        weight_decay,
              divisor,         bias_correction, grad_averaging, trust_clip, always_adapt,
              decoupled_decay, maximize,        device_divisor};
  }
  return out;
}

}  // namespace

void lamb_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                double weight_decay, bool bias_correction, bool grad_averaging, bool trust_clip, bool always_adapt,
                bool decoupled_decay, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& norm_sqs) {
  constexpr const char* op = "lamb_step_";
  const auto given = common::check_norm_sqs(op, params, norm_sqs, kLambNorms);
  auto args = prepare_lamb(op, params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
                           bias_correction, grad_averaging, trust_clip, always_adapt, decoupled_decay, maximize,
                           grad_divisor, grad_scale, found_inf);
  auto& group = args.group;
  if (!group) {
    return;
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, lamb_step, group->params, group->grads, group->state[0], group->state[1],
                               group->steps, args.hp, {stochastic_rounding, seed, group->amp.grad_scale}, given);
  group->finish();
}

at::Tensor lamb_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                         double beta2, double eps, double weight_decay, bool bias_correction, bool grad_averaging,
                         bool trust_clip, bool always_adapt, bool decoupled_decay, bool maximize,
                         const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "lamb_norm_sqs";
  // The norms are those of the coming step: advance copies of host counters.
  const auto steps = common::peek_steps(state_steps);
  auto out = common::empty_norm_sqs(params, kLambNorms);
  auto args = prepare_lamb(op, params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                           bias_correction, grad_averaging, trust_clip, always_adapt, decoupled_decay, maximize,
                           grad_divisor, grad_scale, found_inf);
  auto& group = args.group;
  if (!group) {
    return out;  // zeros: nothing to do, or a skipped (found_inf) step
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, lamb_norm_sqs, group->params, group->grads, group->state[0], group->state[1],
                               group->steps, args.hp, {false, 0, group->amp.grad_scale}, out);
  return out;
}

at::Tensor lamb_grad_divisor(at::TensorList grads, double max_grad_norm) {
  TORCH_CHECK_VALUE(max_grad_norm > 0.0, "lamb_grad_divisor: max_grad_norm must be > 0, got ", max_grad_norm);
  if (grads.empty()) {
    return at::ones({}, at::kDouble);
  }
  // Per-tensor norms in fp32 (fp64 for fp64 grads; an fp32->fp64 upcast inside
  // _foreach_norm costs a full copy), combined in fp64.
  std::vector<at::Tensor> norms;
  for (const auto& grad : grads) {
    const bool native = grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble;
    const auto norm = native ? at::linalg_vector_norm(grad, 2) : at::linalg_vector_norm(grad, 2, {}, false, at::kFloat);
    norms.push_back(norm.to(at::kDouble));
  }
  const auto global = at::linalg_vector_norm(at::stack(norms), 2);
  return at::clamp_min(global / max_grad_norm, 1.0);
}

}  // namespace torchopt_ext::functional
