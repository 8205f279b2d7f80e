// CUDA LAMB and MARS: the shared per-element math of kernels/algos/ in two
// stages (a per-tensor norm reduction into a device buffer, then the update
// reading it; norm_reduce.cuh), registered under the CUDA dispatch key for
// the same ops as the CPU kernels.
#include <torch/library.h>

#include "kernels/algos/lamb.h"
#include "kernels/algos/mars.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/multi_tensor_apply.cuh"
#include "kernels/cuda/norm_reduce.cuh"
#include "torchopt_ext/functional/lamb.h"
#include "torchopt_ext/functional/mars.h"

namespace torchopt_ext::kernels::cuda {

void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const std::vector<double>& steps, const cpu::LAMBHyperparams& hp, const ElementwiseOptions& options,
               const at::Tensor& norm_sqs, const DeviceArgs& device) {
  two_stage_step<LAMBAlgo>("lamb_step_", params, grads, {exp_avgs, exp_avg_sqs}, steps, hp, options, norm_sqs, device);
}

void lamb_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const std::vector<double>& steps, const cpu::LAMBHyperparams& hp, const ElementwiseOptions& options,
                   const at::Tensor& out, const DeviceArgs& device) {
  // The counters are not advanced by this op: read them + 1.
  norm_sqs_into<LAMBAlgo>("lamb_norm_sqs", params, grads, {exp_avgs, exp_avg_sqs}, step_scalars<LAMBAlgo>(steps), steps,
                          hp, options, device, 1.0f, out);
}

void mars_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
               const cpu::MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& norm_sqs,
               const DeviceArgs& device) {
  two_stage_step<MARSAlgo>("mars_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads}, steps, hp,
                           options, norm_sqs, device);
}

void mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
                   const cpu::MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& out,
                   const DeviceArgs& device) {
  norm_sqs_into<MARSAlgo>("mars_norm_sqs", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads},
                          step_scalars<MARSAlgo>(steps), steps, hp, options, device, 1.0f, out);
}

}  // namespace torchopt_ext::kernels::cuda

// The functional layer validates and then picks the CUDA kernels for CUDA params.
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("lamb_step_", &torchopt_ext::functional::lamb_step_);
  m.impl("lamb_norm_sqs", &torchopt_ext::functional::lamb_norm_sqs);
  m.impl("mars_step_", &torchopt_ext::functional::mars_step_);
  m.impl("mars_norm_sqs", &torchopt_ext::functional::mars_norm_sqs);
}
