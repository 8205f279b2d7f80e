#include "torchopt_ext/functional/nadam.h"

#include <c10/util/Exception.h>

#include "common/tensor_lists.h"
#include "kernels/cpu/nadam.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {

void nadam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList mu_products, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                 double beta2, double eps, double weight_decay, double momentum_decay, bool decoupled_weight_decay,
                 bool maximize, bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "nadam_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "momentum_decay", momentum_decay, momentum_decay >= 0.0, ">= 0");
  // mu_products live with the step counters: on the host (advanced there, so
  // a CUDA group then needs a host lr too), or, for CUDA params with CUDA
  // counters, on the params' device (advanced by a CUDA pre-kernel, no sync).
  // Checked before any counter moves.
  const bool on_cuda = !params.empty() && params[0].is_cuda();
  const bool device_counters = on_cuda && !state_steps.empty() && state_steps[0].is_cuda();
  if (!device_counters) {
    common::check_scalar_list(op, "mu_products", params, mu_products);
    TORCH_CHECK_VALUE(!on_cuda || !lr.defined() || !lr.is_cuda(), op,
                      ": with CPU state_steps the per-tensor scalars are computed on the host, so lr must be a CPU "
                      "tensor (or a float); keep state_steps and mu_products on the params' device to use a CUDA lr");
  } else {
    common::check_scalar_list_on_param_devices(op, "mu_products", params, mu_products,
                                               " (with CUDA state_steps the mu-products live on the params' device)");
  }
  auto group =
      common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                           state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(
      *group, nadam_step, group->params, group->grads, group->state[0], group->state[1], mu_products, group->steps,
      {group->lr, beta1, beta2, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize},
      {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

}  // namespace torchopt_ext::functional
