// Fused CPU Lion (Chen et al. 2023; classic.md §9), in lion-pytorch's order:
// decay, signed interpolated update, then the momentum EMA.
#include "kernels/cpu/lion.h"

#include "kernels/algos/lion.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const std::vector<double>& steps,
               const LionHyperparams& hp, const ElementwiseOptions& options) {
  const std::vector<LionAlgo::TensorScalars> scalars(steps.size());
  elementwise_step<LionAlgo>("lion_step_", params, grads, {exp_avgs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
