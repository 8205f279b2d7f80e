// Fused CPU MARS (approximate mode): variance-reduced, norm-clipped gradient
// feeding an AdamW (mars-adamw) or Lion (mars-lion) update (classic.md §13);
// the math is MARSAlgo in kernels/algos/mars.h.
#include "kernels/cpu/mars.h"

#include <algorithm>

#include "kernels/algos/mars.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

std::vector<MARSAlgo::TensorScalars> mars_scalars(const std::vector<double>& steps) {
  std::vector<MARSAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i] = {steps[i], {0.0}};
  }
  return scalars;
}

}  // namespace

void mars_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
               const MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& norm_sqs) {
  elementwise_step<MARSAlgo>("mars_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads},
                             mars_scalars(steps), steps, hp, options,
                             norm_sqs.defined() ? norm_sqs.const_data_ptr<double>() : nullptr);
}

void mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
                   const MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& out) {
  const auto sums = elementwise_norm_sqs<MARSAlgo>("mars_norm_sqs", params, grads,
                                                   {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads},
                                                   mars_scalars(steps), steps, hp, options);
  std::copy(sums.begin(), sums.end(), out.data_ptr<double>());
}

}  // namespace torchopt_ext::kernels::cpu
