// Fused CPU Sophia (Liu et al. 2023; classic.md §12): decoupled decay, first
// moment EMA, then a step of m / denom clipped to [-1, 1]. The Hessian EMA is
// refreshed by a separate pass every k iterations, so the step only reads it.
#include "kernels/cpu/sophia.h"

#include "kernels/algos/sophia.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                 const std::vector<double>& steps, const SophiaHyperparams& hp, const ElementwiseOptions& options) {
  const std::vector<SophiaAlgo::TensorScalars> scalars(steps.size());
  elementwise_step<SophiaAlgo>("sophia_step_", params, grads, {exp_avgs, hessians}, scalars, steps, hp, options);
}

void sophia_update_hessian(at::TensorList hessians, at::TensorList estimates, double beta2) {
  const std::vector<HessianEmaAlgo::TensorScalars> scalars(hessians.size());
  const std::vector<double> steps(hessians.size(), 0.0);  // only seeds stochastic rounding, which is off
  elementwise_step<HessianEmaAlgo>("sophia_update_hessian_", hessians, estimates, {}, scalars, steps, {beta2}, {});
}

}  // namespace torchopt_ext::kernels::cpu
