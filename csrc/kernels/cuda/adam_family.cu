// CUDA Adam/AdamW, NAdam(W), RAdam and QHAdam: the shared per-element math of
// kernels/algos/ run by the multi-tensor launcher, registered under the CUDA
// dispatch key for the same ops as the CPU kernels.
//
// NAdam's per-tensor scalars depend on the mu-product. With CUDA step
// counters the mu-products live on the device too and a one-thread-per-tensor
// pre-kernel advances them (kernels::nadam_advance, the host's function) and
// writes the scalars for the update kernel: no host sync, capturable. With
// host counters the host computes them as for CPU params.
#include <ATen/ATen.h>
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
namespace {

static_assert(sizeof(cpu::NAdamScalars) == 3 * sizeof(double), "written as a plain array by the pre-kernel");

struct MuProductBatch {
  static constexpr int kMax = 64;
  const float* steps[kMax];
  void* mu_products[kMax];
  bool mu_is_double[kMax];
  int count;
  int first;  // group index of entry 0 (offset into the output)
};

// Counters are read before the launcher's increment kernel runs: the step is
// the stored value + 1 (the increment adds 1.0f the same way).
__global__ void nadam_scalars_kernel(const __grid_constant__ MuProductBatch batch, cpu::NAdamHyperparams hp,
                                     const void* device_lr, bool lr_is_double, const float* found_inf,
                                     cpu::NAdamScalars* out) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;  // skipped step: counters and mu-products untouched, as on the host
  }
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch.count) {
    return;
  }
  double lr = hp.lr;
  if (device_lr != nullptr) {
    lr = lr_is_double ? *static_cast<const double*>(device_lr)
                      : static_cast<double>(*static_cast<const float*>(device_lr));
  }
  const double step = static_cast<double>(*batch.steps[i] + 1.0f);
  out[batch.first + i] = batch.mu_is_double[i]
                             ? nadam_advance(hp, lr, step, *static_cast<double*>(batch.mu_products[i]))
                             : nadam_advance(hp, lr, step, *static_cast<float*>(batch.mu_products[i]));
}

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const cpu::AdamHyperparams& hp,
               const ElementwiseOptions& options, const DeviceArgs& device) {
  elementwise_step<AdamAlgo>("adam_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                             step_scalars<AdamAlgo>(steps), steps, hp, options, device);
}

void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList mu_products, const std::vector<double>& steps, const cpu::NAdamHyperparams& hp,
                const ElementwiseOptions& options, const DeviceArgs& device) {
  if (device.steps.empty()) {
    require_host_scalars("nadam_step_", device);  // before the mu-products advance
    elementwise_step<NAdamAlgo>("nadam_step_", params, grads, {exp_avgs, exp_avg_sqs},
                                cpu::nadam_scalars(mu_products, steps, hp), steps, hp, options, device);
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  const auto n = static_cast<int64_t>(params.size());
  at::Tensor out = at::empty({n * 3}, params[0].options().dtype(at::kDouble));
  auto* out_ptr = reinterpret_cast<cpu::NAdamScalars*>(out.data_ptr<double>());
  const float* found_inf = device.found_inf.defined() ? device.found_inf.data_ptr<float>() : nullptr;
  for (int64_t start = 0; start < n; start += MuProductBatch::kMax) {
    MuProductBatch batch{};
    batch.count = static_cast<int>(std::min<int64_t>(MuProductBatch::kMax, n - start));
    batch.first = static_cast<int>(start);
    for (int i = 0; i < batch.count; ++i) {
      batch.steps[i] = device.steps[start + i].data_ptr<float>();
      batch.mu_products[i] = mu_products[start + i].data_ptr();
      batch.mu_is_double[i] = mu_products[start + i].scalar_type() == at::kDouble;
    }
    launch_kernel(nadam_scalars_kernel, 1, MuProductBatch::kMax, stream, batch, hp,
                  device.lr.defined() ? device.lr.const_data_ptr() : nullptr,
                  device.lr.defined() && device.lr.scalar_type() == at::kDouble, found_inf, out_ptr);
  }
  const std::vector<cpu::NAdamScalars> unused(params.size());  // the update reads out_ptr instead
  elementwise_step<NAdamAlgo>("nadam_step_", params, grads, {exp_avgs, exp_avg_sqs}, unused, steps, hp, options, device,
                              out_ptr);
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
