// Fused CPU LAMB, in timm's Lamb operation order (classic.md §7); the math is
// LAMBAlgo in kernels/algos/lamb.h.
#include "kernels/cpu/lamb.h"

#include <algorithm>

#include "kernels/algos/lamb.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

std::vector<LAMBAlgo::TensorScalars> lamb_scalars(const std::vector<double>& steps) {
  std::vector<LAMBAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i] = {steps[i], {0.0, 0.0}};
  }
  return scalars;
}

}  // namespace

void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const std::vector<double>& steps, const LAMBHyperparams& hp, const ElementwiseOptions& options,
               const at::Tensor& norm_sqs) {
  elementwise_step<LAMBAlgo>("lamb_step_", params, grads, {exp_avgs, exp_avg_sqs}, lamb_scalars(steps), steps, hp,
                             options, norm_sqs.defined() ? norm_sqs.const_data_ptr<double>() : nullptr);
}

void lamb_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const std::vector<double>& steps, const LAMBHyperparams& hp, const ElementwiseOptions& options,
                   const at::Tensor& out) {
  const auto sums = elementwise_norm_sqs<LAMBAlgo>("lamb_norm_sqs", params, grads, {exp_avgs, exp_avg_sqs},
                                                   lamb_scalars(steps), steps, hp, options);
  std::copy(sums.begin(), sums.end(), out.data_ptr<double>());
}

}  // namespace torchopt_ext::kernels::cpu
