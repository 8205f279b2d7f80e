// CUDA Schedule-Free AdamW / SGD and the (param, z) passes of the train/eval
// switch and the generic wrapper: the shared math of kernels/algos/schedulefree.h
// run by the multi-tensor launcher, registered under the CUDA dispatch key for
// the same ops as the CPU kernels.
//
// The per-tensor scalars (warmed-up lr, c_{k+1}, bias correction) depend on
// each tensor's step, weight_sum and lr_max. With CUDA step counters these
// live on the device and one small pre-kernel advances them and writes the
// scalars to a device buffer that the update kernel reads: no host sync, so a
// step can be captured in a CUDA graph. With host counters the functional
// computes the scalars on the host, as for CPU params.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/algos/schedulefree.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/multi_tensor_apply.cuh"
#include "torchopt_ext/functional/schedulefree.h"

namespace torchopt_ext::kernels::cuda {
namespace {

static_assert(sizeof(ScheduleFreeScalars) == 3 * sizeof(double), "written as a plain array by the pre-kernel");
static_assert(sizeof(LaunchArgs<ScheduleFreeAdamWAlgo>) <= 4096, "kernel arguments over the classic 4 KB limit");

// One thread per tensor: advance weight_sum / lr_max and write the tensor's
// scalars. Counters are read before the launcher's increment kernel runs, so
// the step is the stored value + 1 (the increment adds 1.0f the same way).
struct WeightBatch {
  static constexpr int kMax = 64;
  const float* steps[kMax];
  double* weight_sums[kMax];
  double* lr_maxes[kMax];
  int count;
  int first;  // group index of entry 0 (offset into the output)
};

__global__ void schedulefree_weights_kernel(const __grid_constant__ WeightBatch batch, ScheduleFreeWeighting weighting,
                                            const void* device_lr, bool lr_is_double, double host_lr,
                                            const float* found_inf, ScheduleFreeScalars* out) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;  // skipped step: counters and weights untouched, as on the host
  }
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch.count) {
    return;
  }
  double lr = host_lr;
  if (device_lr != nullptr) {
    lr = lr_is_double ? *static_cast<const double*>(device_lr)
                      : static_cast<double>(*static_cast<const float*>(device_lr));
  }
  const double step = static_cast<double>(*batch.steps[i] + 1.0f);
  double weight_sum = *batch.weight_sums[i];
  double lr_max = *batch.lr_maxes[i];
  out[batch.first + i] = schedulefree_advance(weighting, step, lr, weight_sum, lr_max);
  *batch.weight_sums[i] = weight_sum;
  *batch.lr_maxes[i] = lr_max;
}

template <typename Algo>
void schedulefree_step(const char* op, at::TensorList params, at::TensorList grads,
                       const std::array<at::TensorList, Algo::kNumState>& state, at::TensorList weight_sums,
                       at::TensorList lr_maxes, const std::vector<ScheduleFreeScalars>& scalars,
                       const std::vector<double>& steps, const typename Algo::Hyper& hp,
                       const ScheduleFreeWeighting& weighting, double lr, const ElementwiseOptions& options,
                       const DeviceArgs& device) {
  if (device.steps.empty()) {
    elementwise_step<Algo>(op, params, grads, state, scalars, steps, hp, options, device);
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  const auto n = static_cast<int64_t>(params.size());
  at::Tensor out = at::empty({n * 3}, params[0].options().dtype(at::kDouble));
  auto* out_ptr = reinterpret_cast<ScheduleFreeScalars*>(out.data_ptr<double>());
  const float* found_inf = device.found_inf.defined() ? device.found_inf.data_ptr<float>() : nullptr;
  for (int64_t start = 0; start < n; start += WeightBatch::kMax) {
    WeightBatch batch{};
    batch.count = static_cast<int>(std::min<int64_t>(WeightBatch::kMax, n - start));
    batch.first = static_cast<int>(start);
    for (int i = 0; i < batch.count; ++i) {
      batch.steps[i] = device.steps[start + i].data_ptr<float>();
      batch.weight_sums[i] = weight_sums[start + i].data_ptr<double>();
      batch.lr_maxes[i] = lr_maxes[start + i].data_ptr<double>();
    }
    launch_kernel(schedulefree_weights_kernel, 1, WeightBatch::kMax, stream, batch, weighting,
                  device.lr.defined() ? device.lr.const_data_ptr() : nullptr,
                  device.lr.defined() && device.lr.scalar_type() == at::kDouble, lr, found_inf, out_ptr);
  }
  elementwise_step<Algo>(op, params, grads, state, scalars, steps, hp, options, device, out_ptr);
}

// A (param, z) pass as a launcher Algo: z is the one state tensor, the param
// list doubles as the (read-only, unscaled) grad list, as the Hessian EMA
// does with its estimates. Costs one redundant read of the param; these
// passes run once per mode switch or wrapper step.
template <typename Op>
struct PairAlgo {
  static constexpr int kNumState = 1;
  static constexpr unsigned kReadOnlyState = Op::kWritesZ ? 0u : 1u;
  using Hyper = Op;
  struct TensorScalars {};
  template <typename S>
  using Coeffs = typename Op::template Coeffs<S>;

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& op, const TensorScalars&) {
    return op.template coeffs<S>();
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V /*grad*/, std::array<V, kNumState>& state) {
    Op::apply(c, param, state[0]);
  }
};

template <typename Op>
void pair_step(const char* op, at::TensorList params, at::TensorList zs, const Op& hp) {
  const std::vector<double> steps(params.size(), 0.0);  // only seeds stochastic rounding, which is off
  elementwise_step<PairAlgo<Op>>(op, params, params, {zs}, step_scalars<PairAlgo<Op>>(steps), steps, hp, {},
                                 DeviceArgs{});
}

}  // namespace

void schedulefree_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList exp_avg_sqs,
                             at::TensorList weight_sums, at::TensorList lr_maxes,
                             const std::vector<ScheduleFreeScalars>& scalars, const std::vector<double>& steps,
                             const cpu::ScheduleFreeAdamWHyperparams& hp, const cpu::ScheduleFreeWeighting& weighting,
                             double lr, const ElementwiseOptions& options, const DeviceArgs& device) {
  schedulefree_step<ScheduleFreeAdamWAlgo>("schedulefree_adamw_step_", params, grads, {zs, exp_avg_sqs}, weight_sums,
                                           lr_maxes, scalars, steps, hp, weighting, lr, options, device);
}

void schedulefree_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList weight_sums,
                           at::TensorList lr_maxes, const std::vector<ScheduleFreeScalars>& scalars,
                           const std::vector<double>& steps, const cpu::ScheduleFreeSGDHyperparams& hp,
                           const cpu::ScheduleFreeWeighting& weighting, double lr, const ElementwiseOptions& options,
                           const DeviceArgs& device) {
  schedulefree_step<ScheduleFreeSGDAlgo>("schedulefree_sgd_step_", params, grads, {zs}, weight_sums, lr_maxes, scalars,
                                         steps, hp, weighting, lr, options, device);
}

void schedulefree_lerp_to_z(at::TensorList params, at::TensorList zs, double weight) {
  pair_step("schedulefree_set_mode_", params, zs, ScheduleFreeLerpToZ{weight});
}

void schedulefree_wrapper_pre(at::TensorList params, at::TensorList zs, double beta, double decay) {
  pair_step("schedulefree_wrapper_pre_", params, zs, ScheduleFreeWrapperPre{beta, decay});
}

void schedulefree_wrapper_post(at::TensorList params, at::TensorList zs, double c, double beta) {
  pair_step("schedulefree_wrapper_post_", params, zs, ScheduleFreeWrapperPost{c, beta});
}

}  // namespace torchopt_ext::kernels::cuda

// The functional layer validates and then picks the CUDA kernel for CUDA
// params. The wrapper ops read their group scalars (sf_state, a CPU tensor)
// on the host; Polyak's rho is computed with ATen reductions and read on the
// host (one sync per step, as documented for SF+ Polyak).
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("schedulefree_adamw_step_", &torchopt_ext::functional::schedulefree_adamw_step_);
  m.impl("schedulefree_sgd_step_", &torchopt_ext::functional::schedulefree_sgd_step_);
  m.impl("schedulefree_set_mode_", &torchopt_ext::functional::schedulefree_set_mode_);
  m.impl("schedulefree_wrapper_pre_", &torchopt_ext::functional::schedulefree_wrapper_pre_);
  m.impl("schedulefree_wrapper_post_", &torchopt_ext::functional::schedulefree_wrapper_post_);
  m.impl("schedulefree_polyak_", &torchopt_ext::functional::schedulefree_polyak_);
}
