#include "torchopt_ext/functional/sgd.h"

#include <c10/util/Exception.h>

#include "common/tensor_lists.h"
#include "kernels/cpu/sgd.h"
#include "kernels/cuda/elementwise.h"

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
  auto group = common::prepare_elementwise_group<1>(op, params, grads,
                                                    {{{"momentum_buffers", momentum_buffers, momentum != 0.0}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, sgd_step, group->params, group->grads, group->state[0], group->steps,
                               {group->lr, momentum, dampening, weight_decay, nesterov, maximize},
                               {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

}  // namespace torchopt_ext::functional
