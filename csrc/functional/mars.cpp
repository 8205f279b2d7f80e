#include "torchopt_ext/functional/mars.h"

#include <c10/util/Exception.h>

#include "common/norm_sqs.h"
#include "common/tensor_lists.h"
#include "kernels/cpu/mars.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::functional {
namespace {

constexpr int64_t kMarsNorms = 1;  // ||c||^2

struct MarsArgs {
  std::optional<common::DenseGroup<4>> group;
  kernels::cpu::MARSHyperparams hp;
};

// Checks shared by mars_step_ and mars_norm_sqs; prepares the group (which
// advances `state_steps`).
MarsArgs prepare_mars(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                      at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                      double weight_decay, double gamma, c10::string_view mars_type, bool amsgrad, bool maximize,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
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
  MarsArgs out;
  out.group = common::prepare_elementwise_group<4>(op, params, grads,
                                                   {{{"exp_avgs", exp_avgs},
                                                     {"exp_avg_sqs", exp_avg_sqs, !lion},
                                                     {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad},
                                                     {"last_grads", last_grads}}},
                                                   state_steps, lr, grad_scale, found_inf);
  if (out.group) {
    out.hp = {out.group->lr, beta1, beta2, eps, weight_decay, gamma, lion, amsgrad, maximize};
  }
  return out;
}

}  // namespace

void mars_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList last_grads, at::TensorList state_steps,
                const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay, double gamma,
                c10::string_view mars_type, bool amsgrad, bool maximize, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& norm_sqs) {
  constexpr const char* op = "mars_step_";
  const auto given = common::check_norm_sqs(op, params, norm_sqs, kMarsNorms);
  auto args = prepare_mars(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, state_steps, lr,
                           beta1, beta2, eps, weight_decay, gamma, mars_type, amsgrad, maximize, grad_scale, found_inf);
  auto& group = args.group;
  if (!group) {
    return;
  }
  const auto& s = group->state;
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, mars_step, group->params, group->grads, s[0], s[1], s[2], s[3], group->steps,
                               args.hp, {stochastic_rounding, seed, group->amp.grad_scale}, given);
  group->finish();
}

at::Tensor mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList last_grads,
                         at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2, double eps,
                         double weight_decay, double gamma, c10::string_view mars_type, bool amsgrad, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "mars_norm_sqs";
  const auto steps = common::peek_steps(state_steps);
  auto out = common::empty_norm_sqs(params, kMarsNorms);
  auto args = prepare_mars(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, steps, lr, beta1,
                           beta2, eps, weight_decay, gamma, mars_type, amsgrad, maximize, grad_scale, found_inf);
  auto& group = args.group;
  if (!group) {
    return out;  // zeros: nothing to do, or a skipped (found_inf) step
  }
  const auto& s = group->state;
  TORCHOPT_EXT_RUN_ELEMENTWISE(*group, mars_norm_sqs, group->params, group->grads, s[0], s[1], s[2], s[3], group->steps,
                               args.hp, {false, 0, group->amp.grad_scale}, out);
  return out;
}

}  // namespace torchopt_ext::functional
