#include "torchopt_ext/functional/qhadam.h"

#include "common/tensor_lists.h"
#include "kernels/cpu/qhadam.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {

void qhadam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double nu1, double nu2,
                  double eps, double weight_decay, bool decoupled_weight_decay, bool maximize, bool stochastic_rounding,
                  int64_t seed, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "qhadam_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "nu1", nu1, nu1 >= 0.0 && nu1 <= 1.0, "in [0, 1]");
  check_hyperparameter(op, "nu2", nu2, nu2 >= 0.0 && nu2 <= 1.0, "in [0, 1]");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  auto group =
      common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                           state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, qhadam_step, group->params, group->grads, group->state[0], group->state[1],
                               group->steps,
                               {group->lr, beta1, beta2, nu1, nu2, eps, weight_decay, decoupled_weight_decay, maximize},
                               {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

}  // namespace torchopt_ext::functional
