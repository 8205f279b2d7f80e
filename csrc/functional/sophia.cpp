#include "torchopt_ext/functional/sophia.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "common/tensor_lists.h"
#include "kernels/cpu/sophia.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {

void sophia_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                  at::TensorList state_steps, const at::Tensor& lr, double beta1, double gamma, double eps,
                  double weight_decay, c10::string_view eps_mode, bool maximize, bool stochastic_rounding, int64_t seed,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "sophia_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "gamma", gamma, std::isfinite(gamma) && gamma >= 0.0, "a finite value >= 0");
  check_hyperparameter(op, "eps", eps, std::isfinite(eps) && eps > 0.0, "a finite value > 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(eps_mode == "max" || eps_mode == "add", op, ": eps_mode must be \"max\" or \"add\", got \"",
                    std::string(eps_mode), "\"");
  common::StateList hessian_list{"hessians", hessians};
  hessian_list.read_only = true;
  auto group = common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, hessian_list}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, sophia_step, group->params, group->grads, group->state[0], group->state[1],
                               group->steps, {group->lr, beta1, gamma, eps, weight_decay, eps_mode == "add", maximize},
                               {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

void sophia_update_hessian_(at::TensorList hessians, at::TensorList estimates, double beta2) {
  constexpr const char* op = "sophia_update_hessian_";
  common::check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  TORCH_CHECK_VALUE(hessians.size() == estimates.size(), op, ": hessians and estimates must have the same length, got ",
                    hessians.size(), " and ", estimates.size());
  std::vector<at::Tensor> cast(estimates.size());
  for (size_t i = 0; i < hessians.size(); ++i) {
    const auto& h = hessians[i];
    const auto& e = estimates[i];
    TORCH_CHECK_VALUE(h.defined() && e.defined() && h.layout() == at::kStrided && e.layout() == at::kStrided, op,
                      ": hessians[", i, "] and estimates[", i, "] must be defined dense tensors");
    TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble ||
                          h.scalar_type() == at::kBFloat16 || h.scalar_type() == at::kHalf,
                      op, ": hessians[", i, "] must be float32, float64, bfloat16 or float16, got ", h.scalar_type());
    TORCH_CHECK_VALUE(at::isFloatingType(e.scalar_type()), op, ": estimates[", i, "] must be floating, got ",
                      e.scalar_type());
    TORCH_CHECK_VALUE(e.sizes() == h.sizes(), op, ": estimates[", i, "] has shape ", e.sizes(), " but hessians[", i,
                      "] has shape ", h.sizes());
    TORCH_CHECK_VALUE(e.device() == h.device(), op, ": estimates[", i, "] is on ", e.device(), " but hessians[", i,
                      "] is on ", h.device());
    cast[i] = e.scalar_type() == h.scalar_type() ? e : e.to(h.scalar_type());
  }
  common::check_cpu_kernels_usable(op, hessians);
  if (hessians.empty()) {
    return;
  }
  common::DenseWorkspace workspace;
  const auto dense_hessians = workspace.dense(hessians, true);
  const auto dense_estimates = workspace.dense(cast, false);
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (hessians[0].is_cuda()) {
    kernels::cuda::sophia_update_hessian(dense_hessians, dense_estimates, beta2);
    workspace.finish();
    return;
  }
#endif
  kernels::cpu::sophia_update_hessian(dense_hessians, dense_estimates, beta2);
  workspace.finish();
}

}  // namespace torchopt_ext::functional
