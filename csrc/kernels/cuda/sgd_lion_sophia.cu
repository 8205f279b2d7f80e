// CUDA SGD, Lion and Sophia (step and Hessian EMA): the shared per-element math of kernels/algos/
// run by the multi-tensor launcher, registered under the CUDA dispatch key for
// the same ops as the CPU kernels.
#include <torch/library.h>

#include "kernels/algos/lion.h"
#include "kernels/algos/sgd.h"
#include "kernels/algos/sophia.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/multi_tensor_apply.cuh"
#include "torchopt_ext/functional/lion.h"
#include "torchopt_ext/functional/sgd.h"
#include "torchopt_ext/functional/sophia.h"

namespace torchopt_ext::kernels::cuda {

void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const std::vector<double>& steps, const cpu::SGDHyperparams& hp, const ElementwiseOptions& options,
              const DeviceArgs& device) {
  elementwise_step<SGDAlgo>("sgd_step_", params, grads, {momentum_buffers}, step_scalars<SGDAlgo>(steps), steps, hp,
                            options, device);
}

void lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const std::vector<double>& steps,
               const cpu::LionHyperparams& hp, const ElementwiseOptions& options, const DeviceArgs& device) {
  elementwise_step<LionAlgo>("lion_step_", params, grads, {exp_avgs}, step_scalars<LionAlgo>(steps), steps, hp, options,
                             device);
}

void sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                 const std::vector<double>& steps, const cpu::SophiaHyperparams& hp, const ElementwiseOptions& options,
                 const DeviceArgs& device) {
  elementwise_step<SophiaAlgo>("sophia_step_", params, grads, {exp_avgs, hessians}, step_scalars<SophiaAlgo>(steps),
                               steps, hp, options, device);
}

void sophia_update_hessian(at::TensorList hessians, at::TensorList estimates, double beta2) {
  const std::vector<double> steps(hessians.size(), 0.0);  // only seeds stochastic rounding, which is off
  elementwise_step<HessianEmaAlgo>("sophia_update_hessian_", hessians, estimates, {},
                                   step_scalars<HessianEmaAlgo>(steps), steps, {beta2}, {}, DeviceArgs{});
}

}  // namespace torchopt_ext::kernels::cuda

// The functional layer validates and then picks the CUDA kernel for CUDA params.
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("sgd_step_", &torchopt_ext::functional::sgd_step_);
  m.impl("lion_step_", &torchopt_ext::functional::lion_step_);
  m.impl("sophia_step_", &torchopt_ext::functional::sophia_step_);
  m.impl("sophia_update_hessian_", &torchopt_ext::functional::sophia_update_hessian_);
}
