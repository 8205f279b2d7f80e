#include "torchopt_ext/functional/adafactor.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "common/tensor_lists.h"
#include "kernels/cpu/adafactor.h"
#include "kernels/cuda/adafactor.h"

namespace torchopt_ext::functional {
namespace {

bool is_state_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// One factored/unfactored state tensor: expected shape, device, a dtype that
// can hold the param's state.
void check_state(const char* op, const char* name, size_t index, const at::Tensor& state, const at::Tensor& param,
                 at::IntArrayRef shape, size_t param_index) {
  TORCH_CHECK_VALUE(state.defined() && state.layout() == at::kStrided, op, ": ", name, "[", index,
                    "] must be a defined dense tensor");
  TORCH_CHECK_VALUE(state.sizes() == shape, op, ": ", name, "[", index, "] has shape ", state.sizes(), " but params[",
                    param_index, "] (shape ", param.sizes(), ") needs ", shape);
  TORCH_CHECK_VALUE(state.device() == param.device(), op, ": ", name, "[", index, "] is on ", state.device(),
                    " but params[", param_index, "] is on ", param.device());
  const bool param_fp64 = param.scalar_type() == at::kDouble;
  TORCH_CHECK_VALUE(is_state_float(state.scalar_type()) && (state.scalar_type() == at::kDouble) == param_fp64, op, ": ",
                    name, "[", index, "] has dtype ", state.scalar_type(), ", which cannot hold state for a ",
                    param.scalar_type(),
                    " param (fp64 params need fp64 state; fp32/bf16/fp16 params take any of fp32/bf16/fp16 state)");
}

// Hyperparameters and the factored / unfactored state lists, checked before
// anything (step counters included) is touched.
void check_adafactor_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                          at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                          double beta2_decay, std::optional<double> eps1, double eps2, double d, double weight_decay,
                          std::optional<double> beta1, bool relative_step, bool warmup_init) {
  using common::check_hyperparameter;
  check_hyperparameter(op, "beta2_decay", beta2_decay, beta2_decay <= 0.0, "<= 0");
  if (eps1) {
    check_hyperparameter(op, "eps[0] (eps1)", *eps1, *eps1 >= 0.0, ">= 0 or None");
  }
  check_hyperparameter(op, "eps[1] (eps2)", eps2, eps2 >= 0.0, ">= 0");
  check_hyperparameter(op, "d", d, d >= 1.0, ">= 1");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  if (beta1) {
    check_hyperparameter(op, "beta1", *beta1, *beta1 >= 0.0 && *beta1 < 1.0, "in [0, 1) or None");
  }
  TORCH_CHECK_VALUE(!warmup_init || relative_step, op, ": warmup_init=True requires relative_step=True");

  common::check_params_and_grads(op, params, grads);
  size_t factored = 0;
  size_t flat = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    if (p.dim() >= 2) {
      TORCH_CHECK_VALUE(factored < row_vars.size() && factored < col_vars.size(), op,
                        ": row_vars and col_vars need one tensor per param with dim >= 2 (params[", i, "] has none)");
      std::vector<int64_t> row_shape = p.sizes().vec();
      row_shape.back() = 1;
      std::vector<int64_t> col_shape = p.sizes().vec();
      col_shape[col_shape.size() - 2] = 1;
      check_state(op, "row_vars", factored, row_vars[factored], p, row_shape, i);
      check_state(op, "col_vars", factored, col_vars[factored], p, col_shape, i);
      TORCH_CHECK_VALUE(row_vars[factored].scalar_type() == col_vars[factored].scalar_type(), op, ": row_vars[",
                        factored, "] and col_vars[", factored, "] must share one dtype");
      if (beta1 && i < exp_avgs.size()) {
        TORCH_CHECK_VALUE(exp_avgs[i].scalar_type() == row_vars[factored].scalar_type(), op, ": exp_avgs[", i,
                          "] must have the dtype of row_vars[", factored, "]; the state of one param shares one dtype");
      }
      ++factored;
    } else {
      TORCH_CHECK_VALUE(flat < variances.size(), op, ": variances needs one tensor per param with dim < 2 (params[", i,
                        "] has none)");
      check_state(op, "variances", flat, variances[flat], p, p.sizes(), i);
      if (beta1 && i < exp_avgs.size()) {
        TORCH_CHECK_VALUE(exp_avgs[i].scalar_type() == variances[flat].scalar_type(), op, ": exp_avgs[", i,
                          "] must have the dtype of variances[", flat, "]; the state of one param shares one dtype");
      }
      ++flat;
    }
  }
  TORCH_CHECK_VALUE(factored == row_vars.size() && factored == col_vars.size(), op, ": row_vars and col_vars have ",
                    row_vars.size(), " and ", col_vars.size(), " tensors but ", factored,
                    " params have dim >= 2 (only those are factored)");
  TORCH_CHECK_VALUE(flat == variances.size(), op, ": variances has ", variances.size(), " tensors but ", flat,
                    " params have dim < 2 (only those keep a full variance)");
}

}  // namespace

void adafactor_step_(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                     at::TensorList variances, at::TensorList exp_avgs, at::TensorList state_steps,
                     const at::Tensor& lr, double beta2_decay, std::optional<double> eps1, double eps2, double d,
                     double weight_decay, std::optional<double> beta1, bool relative_step, bool scale_parameter,
                     bool warmup_init, bool maximize, bool stochastic_rounding, int64_t seed,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "adafactor_step_";
  check_adafactor_args(op, params, grads, row_vars, col_vars, variances, exp_avgs, beta2_decay, eps1, eps2, d,
                       weight_decay, beta1, relative_step, warmup_init);
  auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"exp_avgs", exp_avgs, beta1.has_value()}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  common::DenseWorkspace factors;
  const auto rows = factors.dense(row_vars, true);
  const auto cols = factors.dense(col_vars, true);
  const auto vars = factors.dense(variances, true);
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (group->on_cuda) {
    kernels::cuda::adafactor_run(0, group->params, group->grads, rows, cols, vars, group->state[0], group->steps, {},
                                 {group->lr, beta2_decay, eps1, eps2, d, weight_decay, beta1, relative_step,
                                  scale_parameter, warmup_init, maximize},
                                 {stochastic_rounding, seed, group->amp.grad_scale}, group->device, true);
    factors.finish();
    group->finish();
    return;
  }
#endif
  kernels::cpu::adafactor_step(group->params, group->grads, rows, cols, vars, group->state[0], group->steps,
                               {group->lr, beta2_decay, eps1, eps2, d, weight_decay, beta1, relative_step,
                                scale_parameter, warmup_init, maximize},
                               {stochastic_rounding, seed, group->amp.grad_scale});
  factors.finish();
  group->finish();
}

void adafactor_stage_(int64_t stage, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                      at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                      at::TensorList state_steps, const at::Tensor& lr, at::TensorList stats, double beta2_decay,
                      std::optional<double> eps1, double eps2, double d, double weight_decay,
                      std::optional<double> beta1, bool relative_step, bool scale_parameter, bool warmup_init,
                      bool maximize, bool stochastic_rounding, int64_t seed,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "adafactor_stage_";
  TORCH_CHECK_VALUE(stage >= 1 && stage <= 3, op, ": stage must be 1 (sums), 2 (update RMS) or 3 (apply), got ", stage);
  check_adafactor_args(op, params, grads, row_vars, col_vars, variances, exp_avgs, beta2_decay, eps1, eps2, d,
                       weight_decay, beta1, relative_step, warmup_init);
  TORCH_CHECK_VALUE(stats.size() == params.size(), op, ": stats must have one tensor per param (", params.size(),
                    "), got ", stats.size());
  for (size_t i = 0; i < stats.size(); ++i) {
    const auto& s = stats[i];
    const int64_t size = kernels::cpu::adafactor_stats_size(params[i]);
    TORCH_CHECK_VALUE(s.defined() && s.device() == params[i].device() && s.scalar_type() == at::kDouble &&
                          s.dim() == 1 && s.numel() == size && s.is_contiguous(),
                      op, ": stats[", i, "] must be a contiguous float64 tensor of shape (", size, ",) on ",
                      params[i].device(), " for params[", i, "] of shape ", params[i].sizes());
  }
  const kernels::cpu::AdafactorHyperparams hp{
      0.0, beta2_decay, eps1, eps2, d, weight_decay, beta1, relative_step, scale_parameter, warmup_init, maximize};
  if (stage == 1) {
    // Step counters, AMP skip and grad unscaling happen here, once per step.
    auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"exp_avgs", exp_avgs, beta1.has_value()}}},
                                                      state_steps, lr, grad_scale, found_inf);
    if (!group) {
      return;
    }
    common::DenseWorkspace factors;
    const auto rows = factors.dense(row_vars, true);
    auto staged_hp = hp;
    staged_hp.lr = group->lr;
#if defined(TORCHOPT_EXT_WITH_CUDA)
    if (group->on_cuda) {
      kernels::cuda::adafactor_run(1, group->params, group->grads, rows, factors.dense(col_vars, false),
                                   factors.dense(variances, false), group->state[0], group->steps, stats, staged_hp,
                                   {stochastic_rounding, seed, group->amp.grad_scale}, group->device, true);
      factors.finish();
      group->finish();
      return;
    }
#endif
    kernels::cpu::adafactor_stage(kernels::cpu::AdafactorStage::kSums, group->params, group->grads, rows,
                                  factors.dense(col_vars, false), factors.dense(variances, false), group->state[0],
                                  group->steps, stats, staged_hp, {stochastic_rounding, seed, group->amp.grad_scale});
    factors.finish();
    group->finish();
    return;
  }
  // Stages 2 and 3: the counters already hold this step; the grads are unscaled.
  if (beta1) {
    common::check_state_list(op, "exp_avgs", params, exp_avgs);
  } else {
    TORCH_CHECK_VALUE(exp_avgs.empty(), op, ": exp_avgs must be empty with these options");
  }
  TORCH_CHECK_VALUE(state_steps.size() == params.size(), op, ": state_steps must have one tensor per param (",
                    params.size(), "), got ", state_steps.size());
  if (params.empty()) {
    return;
  }
  auto staged_hp = hp;
  common::DeviceArgs device;
  std::vector<double> steps(state_steps.size(), std::nan(""));
  // CUDA: lr, counters and found_inf on the device are read there (no sync).
  const bool on_cuda = params[0].is_cuda();
  const bool device_lr = on_cuda && lr.defined() && lr.is_cuda();
  const bool device_steps = on_cuda && state_steps[0].is_cuda();
  const bool device_found_inf = on_cuda && found_inf.has_value() && found_inf->defined() && found_inf->is_cuda();
  if (device_lr) {
    TORCH_CHECK_VALUE(lr.numel() == 1 && (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble), op,
                      ": a CUDA lr must be a one-element float32 or float64 tensor");
    device.lr = lr.contiguous();
    staged_hp.lr = std::nan("");
  } else {
    staged_hp.lr = common::read_lr(op, lr);
  }
  if (device_steps) {
    for (size_t i = 0; i < state_steps.size(); ++i) {
      const auto& s = state_steps[i];
      TORCH_CHECK_VALUE(
          s.defined() && s.numel() == 1 && s.device() == params[0].device() && s.scalar_type() == at::kFloat, op,
          ": state_steps[", i, "] must be a one-element float32 tensor on ", params[0].device());
    }
    device.steps.assign(state_steps.begin(), state_steps.end());
  } else {
    common::check_scalar_list(op, "state_steps", params, state_steps);
    for (size_t i = 0; i < steps.size(); ++i) {
      steps[i] = state_steps[i].item<double>();
    }
  }
  if (device_found_inf) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat, op,
                      ": found_inf on CUDA must be a one-element float32 tensor");
    device.found_inf = *found_inf;
  } else if (common::read_amp(op, std::nullopt, found_inf).skip_step) {
    return;
  }
  if (!on_cuda) {
    common::check_cpu_kernels_usable(op, params);
  }
  common::DenseWorkspace dense;
  const auto dense_params = dense.dense(params, stage == 3);
  const auto dense_grads = dense.dense(grads, false);
  const auto rows = dense.dense(row_vars, false);
  const auto cols = dense.dense(col_vars, stage == 2);
  const auto vars = dense.dense(variances, stage == 2);
  const auto avgs = dense.dense(exp_avgs, stage == 3);
  const kernels::cpu::ElementwiseOptions options{stochastic_rounding, seed, std::nullopt};
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (on_cuda) {
    kernels::cuda::adafactor_run(static_cast<int>(stage), dense_params, dense_grads, rows, cols, vars, avgs, steps,
                                 stats, staged_hp, options, device, false);
    dense.finish();
    return;
  }
#endif
  kernels::cpu::adafactor_stage(
      stage == 2 ? kernels::cpu::AdafactorStage::kUpdateRms : kernels::cpu::AdafactorStage::kApply, dense_params,
      dense_grads, rows, cols, vars, avgs, steps, stats, staged_hp, options);
  dense.finish();
}

}  // namespace torchopt_ext::functional
