// CUDA Adam/AdamW, NAdam(W), RAdam and QHAdam: the shared per-element math of
// kernels/algos/ run by the multi-tensor launcher, registered under the CUDA
// dispatch key for the same ops as the CPU kernels.
#include <torch/library.h>

#include "kernels/algos/adam.h"
#include "kernels/algos/nadam.h"
#include "kernels/algos/qhadam.h"
#include "kernels/algos/radam.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/multi_tensor_apply.cuh"
#include "torchopt_ext/functional/adam.h"
#include "torchopt_ext/functional/nadam.h"
#include "torchopt_ext/functional/qhadam.h"
#include "torchopt_ext/functional/radam.h"

namespace torchopt_ext::kernels::cuda {
void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const cpu::AdamHyperparams& hp,
               const ElementwiseOptions& options, const DeviceArgs& device) {
  elementwise_step<AdamAlgo>("adam_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                             step_scalars<AdamAlgo>(steps), steps, hp, options, device);
}

void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList mu_products, const std::vector<double>& steps, const cpu::NAdamHyperparams& hp,
                const ElementwiseOptions& options, const DeviceArgs& device) {
  require_host_scalars("nadam_step_", device);  // before the mu-products advance
  elementwise_step<NAdamAlgo>("nadam_step_", params, grads, {exp_avgs, exp_avg_sqs},
                              cpu::nadam_scalars(mu_products, steps, hp), steps, hp, options, device);
}

void radam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const std::vector<double>& steps, const cpu::RAdamHyperparams& hp, const ElementwiseOptions& options,
                const DeviceArgs& device) {
  elementwise_step<RAdamAlgo>("radam_step_", params, grads, {exp_avgs, exp_avg_sqs}, step_scalars<RAdamAlgo>(steps),
                              steps, hp, options, device);
}

void qhadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const std::vector<double>& steps, const cpu::QHAdamHyperparams& hp, const ElementwiseOptions& options,
                 const DeviceArgs& device) {
  elementwise_step<QHAdamAlgo>("qhadam_step_", params, grads, {exp_avgs, exp_avg_sqs}, step_scalars<QHAdamAlgo>(steps),
                               steps, hp, options, device);
}

}  // namespace torchopt_ext::kernels::cuda

// The functional layer validates and then picks the CUDA kernel for CUDA params.
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("adam_step_", &torchopt_ext::functional::adam_step_);
  m.impl("nadam_step_", &torchopt_ext::functional::nadam_step_);
  m.impl("radam_step_", &torchopt_ext::functional::radam_step_);
  m.impl("qhadam_step_", &torchopt_ext::functional::qhadam_step_);
}
