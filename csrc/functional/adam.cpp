#include "torchopt_ext/functional/adam.h"

#include "common/tensor_lists.h"
#include "kernels/cpu/adam.h"
#include "kernels/cuda/elementwise.h"
#include "torchopt_ext/common/magma.h"

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
  auto group = common::prepare_elementwise_group<3>(
      op, params, grads,
      {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}}},
      state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  const auto& s = group->state;
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, adam_step, group->params, group->grads, s[0], s[1], s[2], group->steps,
                               {group->lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize},
                               {stochastic_rounding, seed, group->amp.grad_scale});
  group->finish();
}

void adam_magma_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList magma_scores, at::TensorList state_steps,
                      const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                      bool decoupled_weight_decay, bool amsgrad, bool maximize, double magma_p, double magma_tau,
                      bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "adam_magma_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  const common::MagmaOptions magma{magma_p, magma_tau, seed};
  common::check_magma_options(op, magma);
  // The scores are read and written by the kernel: on the host for CPU
  // params, on the params' device for CUDA ones.
  const bool on_cuda = !params.empty() && params[0].is_cuda();
  if (on_cuda) {
    common::check_scalar_list_on_param_devices(op, "magma_scores", params, magma_scores,
                                               " (CUDA params keep their Magma scores on their device)");
  } else {
    common::check_scalar_list(op, "magma_scores", params, magma_scores);
  }
  for (size_t i = 0; i < magma_scores.size(); ++i) {
    TORCH_CHECK_VALUE(magma_scores[i].scalar_type() == at::kFloat, op, ": magma_scores[", i, "] must be float32, got ",
                      magma_scores[i].scalar_type());
  }
  auto group = common::prepare_elementwise_group<3>(
      op, params, grads,
      {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}}},
      state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;  // found_inf: scores untouched too
  }
  const auto& s = group->state;
  const kernels::cpu::AdamMagmaHyperparams hp{
      {group->lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize}, magma_tau};
  const kernels::cpu::ElementwiseOptions options{stochastic_rounding, seed, group->amp.grad_scale};
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (group->on_cuda) {
    // The draws need the step, which may live on the device: drawn there.
    kernels::cuda::adam_magma_step(group->params, group->grads, s[0], s[1], s[2], magma_scores, group->steps, hp,
                                   magma_p, options, group->device);
    group->finish();
    return;
  }
#endif
  std::vector<bool> keep(group->steps.size());
  for (size_t i = 0; i < keep.size(); ++i) {
    keep[i] = common::magma_keep(magma, static_cast<int64_t>(i), group->steps[i]);
  }
  kernels::cpu::adam_magma_step(group->params, group->grads, s[0], s[1], s[2], magma_scores, keep, group->steps, hp,
                                options);
  group->finish();
}

}  // namespace torchopt_ext::functional
