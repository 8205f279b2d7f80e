// CUDA Adam/AdamW with Magma masking (adam_magma_step_): the shared math of
// kernels/algos/adam_magma.h in three launches, all on the current stream and
// without a host sync:
//   1. a read-only pass sums |g|^2, |m|^2 and |g - m|^2 per 64K chunk (m: the
//      moment this step will store), in double, one partial per chunk;
//   2. one thread per tensor adds its chunks' partials in chunk order (the
//      result does not depend on scheduling), updates the fp32 score, draws
//      keep/drop with the CPU's counter hash (seed, tensor index, step) and
//      writes (step, keep * score) for the tensor;
//   3. the multi-tensor launcher applies AdamMaskedAlgo reading those scalars.
// Step counters, lr, grad_scale and found_inf may live on the device; the
// passes before the launcher's step increment read a device step as stored + 1.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/algos/adam_magma.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/multi_tensor_apply.cuh"
#include "torchopt_ext/functional/adam.h"

namespace torchopt_ext::kernels::cuda {
namespace {

using MaskedScalars = AdamMaskedAlgo::TensorScalars;
static_assert(sizeof(MaskedScalars) == 2 * sizeof(double), "written as a plain array by the score kernel");
static_assert(sizeof(LaunchArgs<AdamMaskedAlgo>) <= 4096, "kernel arguments over the classic 4 KB limit");

constexpr int kNorms = AdamMaskedAlgo::kNumNorms;

struct NormMeta {
  const void* param;
  const void* grad;
  const void* state[AdamMaskedAlgo::kNumState];  // nullptr: unused (max_exp_avg_sq without amsgrad)
  int64_t numel;
  const float* step;  // device counter (not yet incremented) or nullptr
  double host_step;
  int64_t first_partial;  // slot of chunk 0 in the partials buffer
};

struct NormArgs {
  AdamHyperparams hyper;
  const float* grad_scale;
  const float* found_inf;
  double host_grad_scale;
  bool has_grad_scale;
  NormMeta tensors[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(NormArgs) <= 4096, "kernel arguments over the classic 4 KB limit");

template <typename P, typename St>
__global__ void __launch_bounds__(kBlockSize)
    magma_norms_kernel(const __grid_constant__ NormArgs args, double* __restrict__ partials) {
  using S = at::opmath_type<P>;
  using C = AdamMaskedAlgo::Coeffs<S>;
  constexpr int N = AdamMaskedAlgo::kNumState;
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) {
    return;
  }
  const NormMeta& meta = args.tensors[args.block_tensor[blockIdx.x]];
  const int64_t chunk = args.block_chunk[blockIdx.x];
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < meta.numel ? begin + kChunk : meta.numel;

  alignas(C) __shared__ unsigned char coeff_storage[sizeof(C)];
  if (threadIdx.x == 0) {
    const double step = meta.step != nullptr ? static_cast<double>(*meta.step + 1.0f) : meta.host_step;
    // The multiplier only scales the param update, which this pass discards.
    new (coeff_storage) C(AdamMaskedAlgo::coeffs<S>(args.hyper, {step, 1.0}));
  }
  __syncthreads();
  const C& c = *reinterpret_cast<const C*>(coeff_storage);
  const S grad_scale =
      args.grad_scale != nullptr ? static_cast<S>(*args.grad_scale) : static_cast<S>(args.host_grad_scale);
  const P* param = static_cast<const P*>(meta.param);
  const P* grad = static_cast<const P*>(meta.grad);

  double acc[kNorms] = {0.0, 0.0, 0.0};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    S g = static_cast<S>(grad[i]);
    if (args.has_grad_scale) {
      g = g / grad_scale;  // unscaled in registers only; the apply pass writes grads back
    }
    std::array<S, N> s;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      s[k] = meta.state[k] != nullptr ? static_cast<S>(static_cast<const St*>(meta.state[k])[i]) : S(0);
    }
    const auto terms = AdamMaskedAlgo::norm_terms(c, static_cast<S>(param[i]), g, s);
#pragma unroll
    for (int k = 0; k < kNorms; ++k) {
      acc[k] += static_cast<double>(terms[k]) * static_cast<double>(terms[k]);
    }
  }
  __shared__ double reduce[kNorms][kBlockSize];
  block_tree_sum<kNorms>(acc, reduce, partials + (meta.first_partial + chunk) * kNorms);
}

struct ScoreBatch {
  static constexpr int kMax = 48;
  const float* steps[kMax];  // device counters (not yet incremented) or nullptr
  float* scores[kMax];
  double host_steps[kMax];
  int64_t first_partial[kMax];
  int64_t chunks[kMax];
  int count;
  int first;  // group index of entry 0
};
static_assert(sizeof(ScoreBatch) <= 4096, "kernel arguments over the classic 4 KB limit");

__global__ void magma_scores_kernel(const __grid_constant__ ScoreBatch batch, const double* __restrict__ partials,
                                    const float* found_inf, double tau, double p, int64_t seed,
                                    MaskedScalars* __restrict__ out) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;  // skipped step: scores untouched
  }
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch.count) {
    return;
  }
  double sums[kNorms] = {0.0, 0.0, 0.0};
  for (int64_t chunk = 0; chunk < batch.chunks[i]; ++chunk) {
    for (int k = 0; k < kNorms; ++k) {
      sums[k] += partials[(batch.first_partial[i] + chunk) * kNorms + k];
    }
  }
  const double step = batch.steps[i] != nullptr ? static_cast<double>(*batch.steps[i] + 1.0f) : batch.host_steps[i];
  const float score = magma_score_from_norms(::sqrt(sums[0]), ::sqrt(sums[1]), ::sqrt(sums[2]), *batch.scores[i], tau);
  *batch.scores[i] = score;
  const int index = batch.first + i;
  const bool keep = magma_keep_draw(seed, index, step, p);
  out[index] = {step, keep ? static_cast<double>(score) : 0.0};
}

template <typename P, typename St>
void launch_norms(const std::vector<size_t>& indices, at::TensorList params, at::TensorList grads,
                  const std::array<at::TensorList, AdamMaskedAlgo::kNumState>& state,
                  const std::vector<int64_t>& first_partial, const std::vector<double>& steps, NormArgs& args,
                  const DeviceArgs& dev, double* partials, cudaStream_t stream) {
  launch_chunked(
      indices, params, kMaxTensors, args,
      [&](int slot, size_t i) {
        auto& meta = args.tensors[slot];
        meta.param = params[i].const_data_ptr();
        meta.grad = grads[i].const_data_ptr();
        for (int k = 0; k < AdamMaskedAlgo::kNumState; ++k) {
          meta.state[k] = state[k].empty() ? nullptr : state[k][i].const_data_ptr();
        }
        meta.numel = params[i].numel();
        meta.step = dev.steps.empty() ? nullptr : dev.steps[i].const_data_ptr<float>();
        meta.host_step = steps[i];
        meta.first_partial = first_partial[i];
      },
      [&](int slot) { args.tensors[0] = args.tensors[slot]; },
      [&](int num_blocks) {
        launch_kernel(magma_norms_kernel<P, St>, num_blocks, kBlockSize, stream, args, partials);
      });
}

}  // namespace

void adam_magma_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList scores, const std::vector<double>& steps,
                     const cpu::AdamMagmaHyperparams& hp, double magma_p, const ElementwiseOptions& options,
                     const DeviceArgs& device) {
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  const std::array<at::TensorList, AdamMaskedAlgo::kNumState> state{exp_avgs, exp_avg_sqs, max_exp_avg_sqs};
  const auto n = params.size();
  std::vector<int64_t> first_partial(n);
  std::vector<int64_t> chunks(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    first_partial[i] = total;
    chunks[i] = (params[i].numel() + kChunk - 1) / kChunk;
    total += chunks[i];
  }
  const auto device_options = params[0].options().dtype(at::kDouble);
  const at::Tensor partials = at::empty({std::max<int64_t>(total, 1) * kNorms}, device_options);
  const at::Tensor out = at::empty({static_cast<int64_t>(n) * 2}, device_options);
  const float* found_inf = device.found_inf.defined() ? device.found_inf.const_data_ptr<float>() : nullptr;

  // 1. Norm partials, one launch sequence per (param dtype, state dtype) pair.
  NormArgs args{};
  args.hyper = hp.adam;
  args.grad_scale = device.grad_scale.defined() ? device.grad_scale.const_data_ptr<float>() : nullptr;
  args.found_inf = found_inf;
  args.has_grad_scale = args.grad_scale != nullptr || options.grad_scale.has_value();
  args.host_grad_scale = options.grad_scale.value_or(1.0);
  for_each_dtype_group("adam_magma_step_", group_by_dtypes(params, state),
                       [&]<typename P, typename St>(const std::vector<size_t>& indices) {
                         launch_norms<P, St>(indices, params, grads, state, first_partial, steps, args, device,
                                             partials.data_ptr<double>(), stream);
                       });

  // 2. Scores, draws and multipliers.
  auto* out_ptr = reinterpret_cast<MaskedScalars*>(out.data_ptr<double>());
  for (size_t start = 0; start < n; start += ScoreBatch::kMax) {
    ScoreBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(ScoreBatch::kMax, n - start));
    batch.first = static_cast<int>(start);
    for (int j = 0; j < batch.count; ++j) {
      const size_t i = start + j;
      batch.steps[j] = device.steps.empty() ? nullptr : device.steps[i].const_data_ptr<float>();
      batch.scores[j] = scores[i].data_ptr<float>();
      batch.host_steps[j] = steps[i];
      batch.first_partial[j] = first_partial[i];
      batch.chunks[j] = chunks[i];
    }
    launch_kernel(magma_scores_kernel, 1, ScoreBatch::kMax, stream, batch, partials.const_data_ptr<double>(), found_inf,
                  hp.tau, magma_p, options.seed, out_ptr);
  }

  // 3. The masked update (the launcher increments device counters first).
  std::vector<MaskedScalars> host_scalars(n);
  for (size_t i = 0; i < n; ++i) {
    host_scalars[i] = {steps[i], 1.0};  // unused: the device scalars above are read instead
  }
  elementwise_step<AdamMaskedAlgo>("adam_magma_step_", params, grads, state, host_scalars, steps, hp.adam, options,
                                   device, out_ptr);
}

}  // namespace torchopt_ext::kernels::cuda

TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) { m.impl("adam_magma_step_", &torchopt_ext::functional::adam_magma_step_); }
