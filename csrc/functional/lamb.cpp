#include "torchopt_ext/functional/lamb.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/tensor_lists.h"
#include "kernels/cpu/lamb.h"

namespace torchopt_ext::functional {

void lamb_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                double weight_decay, bool bias_correction, bool grad_averaging, bool trust_clip, bool always_adapt,
                bool decoupled_decay, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "lamb_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  double divisor = 1.0;
  if (grad_divisor.has_value() && grad_divisor->defined()) {
    TORCH_CHECK_VALUE(grad_divisor->numel() == 1, op, ": grad_divisor must have one element");
    divisor = grad_divisor->item<double>();
    check_hyperparameter(op, "grad_divisor", divisor, divisor >= 1.0, ">= 1 (max(global norm / max_grad_norm, 1))");
  }
  auto group =
      common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                           state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  kernels::cpu::lamb_step(group->params, group->grads, group->state[0], group->state[1], group->steps,
                          {group->lr, beta1, beta2, eps, weight_decay, divisor, bias_correction, grad_averaging,
                           trust_clip, always_adapt, decoupled_decay, maximize},
                          {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
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
