#include "torchopt_ext/functional/mars.h"

#include <c10/util/Exception.h>

#include "common/tensor_lists.h"
#include "kernels/cpu/mars.h"

namespace torchopt_ext::functional {

void mars_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList last_grads, at::TensorList state_steps,
                const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay, double gamma,
                c10::string_view mars_type, bool amsgrad, bool maximize, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "mars_step_";
  using common::check_hyperparameter;
  const bool lion = mars_type == "mars-lion";
  TORCH_CHECK_VALUE(lion || mars_type == "mars-adamw", op, ": mars_type must be 'mars-adamw' or 'mars-lion', got '",
                    mars_type, "' (mars-shampoo needs the Newton-Schulz core, not built yet)");
  TORCH_CHECK_VALUE(!(lion && amsgrad), op, ": amsgrad applies to mars-adamw only");
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "gamma", gamma, gamma >= 0.0, ">= 0");
  auto group = common::prepare_elementwise_group<4>(op, params, grads,
                                                    {{{"exp_avgs", exp_avgs},
                                                      {"exp_avg_sqs", exp_avg_sqs, !lion},
                                                      {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad},
                                                      {"last_grads", last_grads}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  const auto& s = group->state;
  kernels::cpu::mars_step(group->params, group->grads, s[0], s[1], s[2], s[3], group->steps,
                          {group->lr, beta1, beta2, eps, weight_decay, gamma, lion, amsgrad, maximize},
                          {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

}  // namespace torchopt_ext::functional
