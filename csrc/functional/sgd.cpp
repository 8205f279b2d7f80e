#include "torchopt_ext/functional/sgd.h"

#include <c10/util/Exception.h>

#include "common/tensor_lists.h"
#include "kernels/cpu/sgd.h"

namespace torchopt_ext::functional {

void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList state_steps,
               const at::Tensor& lr, double momentum, double dampening, double weight_decay, bool nesterov,
               bool maximize, bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "sgd_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "momentum", momentum, momentum >= 0.0, ">= 0");
  check_hyperparameter(op, "dampening", dampening, dampening >= 0.0 && dampening <= 1.0, "in [0, 1]");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0), op,
                    ": nesterov requires momentum > 0 and dampening = 0, got momentum=", momentum,
                    ", dampening=", dampening);
  const double lr_value = common::read_lr(op, lr);
  common::check_params_and_grads(op, params, grads);
  if (momentum != 0.0) {
    common::check_state_list(op, "momentum_buffers", params, momentum_buffers);
  } else {
    TORCH_CHECK_VALUE(momentum_buffers.empty(), op, ": momentum_buffers must be empty when momentum=0");
  }
  common::check_steps(op, params, state_steps);
  common::check_cpu_kernels_usable(op, params);
  const auto amp = common::read_amp(op, grad_scale, found_inf);
  if (amp.skip_step || params.empty()) {
    return;
  }
  const auto steps = common::increment_steps(state_steps);
  common::DenseWorkspace workspace;
  const auto dense_params = workspace.dense(params, true);
  const auto dense_grads = workspace.dense(grads, amp.grad_scale.has_value());
  const auto dense_buffers = workspace.dense(momentum_buffers, true);
  kernels::cpu::sgd_step(
      dense_params, dense_grads, dense_buffers, steps,
      {lr_value, momentum, dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, amp.grad_scale});
  workspace.finish();
}

}  // namespace torchopt_ext::functional
