// Fused CPU RAdam (Liu et al. 2020; classic.md §5), in torch.optim.RAdam's
// single-tensor operation order: un-adapted momentum SGD until the variance
// rectification term is defined (rho_t > 5), rectified Adam after.
#include "kernels/cpu/radam.h"

#include <cmath>

#include "kernels/algos/radam.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void radam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const std::vector<double>& steps, const RAdamHyperparams& hp, const ElementwiseOptions& options) {
  std::vector<RAdamAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<RAdamAlgo>("radam_step_", params, grads, {exp_avgs, exp_avg_sqs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
