// Fused CPU QHAdam / QHAdamW (Ma & Yarats 2019; classic.md §6), in qhoptim's
// operation order. The moments hold already bias-corrected averages: the
// EMA weight at step t is 1 - 1/w_t with w_t = sum_{k<t} beta^k.
#include "kernels/cpu/qhadam.h"

#include <cmath>

#include "kernels/algos/qhadam.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void qhadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const std::vector<double>& steps, const QHAdamHyperparams& hp, const ElementwiseOptions& options) {
  std::vector<QHAdamAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<QHAdamAlgo>("qhadam_step_", params, grads, {exp_avgs, exp_avg_sqs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
