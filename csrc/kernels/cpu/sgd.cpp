// Fused CPU SGD with momentum, dampening and Nesterov (classic.md §2), in
// torch.optim's single-tensor operation order.
#include "kernels/cpu/sgd.h"

#include "kernels/algos/sgd.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const std::vector<double>& steps, const SGDHyperparams& hp, const ElementwiseOptions& options) {
  std::vector<SGDAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<SGDAlgo>("sgd_step_", params, grads, {momentum_buffers}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
