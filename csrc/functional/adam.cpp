#include "torchopt_ext/functional/adam.h"

#include <c10/util/Exception.h>

#include <cmath>

#include "common/tensor_lists.h"
#include "kernels/cpu/adam.h"

namespace torchopt_ext::functional {

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "adam_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  const double lr_value = common::read_lr(op, lr);
  common::check_params_and_grads(op, params, grads);
  common::check_state_list(op, "exp_avgs", params, exp_avgs);
  common::check_state_list(op, "exp_avg_sqs", params, exp_avg_sqs);
  if (amsgrad) {
    common::check_state_list(op, "max_exp_avg_sqs", params, max_exp_avg_sqs);
  } else {
    TORCH_CHECK_VALUE(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty when amsgrad=False");
  }
  common::check_steps(op, params, state_steps);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type() &&
                          (!amsgrad || max_exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type()),
                      op, ": the state tensors of params[", i, "] must share one dtype");
  }
  common::check_cpu_kernels_usable(op, params);
  const auto amp = common::read_amp(op, grad_scale, found_inf);
  if (amp.skip_step || params.empty()) {
    return;
  }
  const auto steps = common::increment_steps(state_steps);
  common::DenseWorkspace workspace;
  const auto dense_params = workspace.dense(params, true);
  const auto dense_grads = workspace.dense(grads, amp.grad_scale.has_value());
  const auto dense_exp_avgs = workspace.dense(exp_avgs, true);
  const auto dense_exp_avg_sqs = workspace.dense(exp_avg_sqs, true);
  const auto dense_max = workspace.dense(max_exp_avg_sqs, true);
  kernels::cpu::adam_step(dense_params, dense_grads, dense_exp_avgs, dense_exp_avg_sqs, dense_max, steps,
                          {lr_value, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                           stochastic_rounding, seed, amp.grad_scale});
  workspace.finish();
}

}  // namespace torchopt_ext::functional
