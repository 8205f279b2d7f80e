#include "torchopt_ext/functional/lion.h"

#include "common/tensor_lists.h"
#include "kernels/cpu/lion.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {

void lion_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList state_steps,
                const at::Tensor& lr, double beta1, double beta2, double weight_decay, bool maximize,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "lion_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 <= 1.0, "in [0, 1]");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 <= 1.0, "in [0, 1]");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"exp_avgs", exp_avgs}}}, state_steps, lr,
                                                    grad_scale, found_inf);
  if (!group) {
    return;
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, lion_step, group->params, group->grads, group->state[0], group->steps,
                               {group->lr, beta1, beta2, weight_decay, maximize},
                               {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

}  // namespace torchopt_ext::functional
