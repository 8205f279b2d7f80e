// Per-tensor norm reduction for the two-stage element-wise algorithms on CUDA
// (LAMB's ||theta|| and ||r||, MARS's ||c||): the device counterpart of the
// CPU kernels' read-only first pass (kernels/cpu/elementwise_apply.h). Each
// Algo supplies kNumNorms and norm_terms (kernels/algos/<algo>.h); the sums of
// squares land in a float64 (group size, kNumNorms) device tensor that the
// update kernel reads through LaunchArgs::norm_sqs, or that a sharded caller
// all-reduces first.
//
// Deterministic: one block per 64K chunk reduces in double with a fixed tree
// and writes its own partial row; a second kernel adds each tensor's partial
// rows in chunk order. No atomics, no host sync (lr, steps, grad_scale and
// found_inf are read on the device), so it can be captured in a CUDA graph.
#pragma once

#include <ATen/ops/empty.h>

#include <algorithm>
#include <utility>

#include "kernels/cuda/multi_tensor_apply.cuh"

namespace torchopt_ext::kernels::cuda {

// Fewer tensors per launch than the update kernel: the extra slot table keeps
// the argument block under 4 KB for MARS's four state lists.
constexpr int kNormMaxTensors = 16;

template <typename Algo>
struct NormLaunchArgs {
  typename Algo::Hyper hyper;
  const void* lr;  // device lr or nullptr (then hyper.lr holds it)
  bool lr_is_double;
  float step_offset;  // added to device step counters (1: not yet advanced for this step)
  const float* grad_scale;
  const float* found_inf;
  double host_grad_scale;
  bool has_grad_scale;
  double* partials;  // (total chunks, kNumNorms)
  int32_t num_blocks;
  TensorMeta<Algo> tensors[kNormMaxTensors];
  int32_t first_slot[kNormMaxTensors];  // partial row of the tensor's chunk 0
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

template <typename Algo, typename P, typename St>
__global__ void __launch_bounds__(kBlockSize) norm_sq_kernel(const __grid_constant__ NormLaunchArgs<Algo> args) {
  constexpr int N = Algo::kNumState;
  constexpr int K = Algo::kNumNorms;
  constexpr int kILP = static_cast<int>(16 / sizeof(P));
  using S = at::opmath_type<P>;
  using C = typename Algo::template Coeffs<S>;
  const int t = args.block_tensor[blockIdx.x];
  const int64_t chunk = args.block_chunk[blockIdx.x];
  const TensorMeta<Algo>& meta = args.tensors[t];
  const int64_t begin = chunk * kChunk;
  const int64_t end = begin + kChunk < meta.numel ? begin + kChunk : meta.numel;
  double* out = args.partials + (static_cast<int64_t>(args.first_slot[t]) + chunk) * K;
  // A skipped (found_inf) step: zero sums, nothing read.
  const bool skip = args.found_inf != nullptr && *args.found_inf != 0.0f;

  alignas(C) __shared__ unsigned char coeff_storage[sizeof(C)];
  __shared__ double partial[K][kBlockSize];
  if (threadIdx.x == 0) {
    typename Algo::Hyper hp = args.hyper;
    if (args.lr != nullptr) {
      hp.lr = args.lr_is_double ? *static_cast<const double*>(args.lr)
                                : static_cast<double>(*static_cast<const float*>(args.lr));
    }
    typename Algo::TensorScalars ts = meta.scalars;
    ts.step = meta.step != nullptr ? static_cast<double>(*meta.step + args.step_offset) : meta.host_step;
    new (coeff_storage) C(Algo::template coeffs<S>(hp, ts));
  }
  __syncthreads();
  const C& c = *reinterpret_cast<const C*>(coeff_storage);
  const S grad_scale =
      args.grad_scale != nullptr ? static_cast<S>(*args.grad_scale) : static_cast<S>(args.host_grad_scale);
  const P* param = static_cast<const P*>(meta.param);
  const P* grad = static_cast<const P*>(meta.grad);
  const St* state[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    state[k] = static_cast<const St*>(meta.state[k]);
  }

  double acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    acc[k] = 0.0;
  }
  // Grads are unscaled in registers only: the update kernel writes them back.
  auto add = [&](S p, S g, std::array<S, N>& s) {
    if (args.has_grad_scale) {
      g = g / grad_scale;
    }
    const auto terms = Algo::norm_terms(c, p, g, s);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const double v = static_cast<double>(terms[k]);
      acc[k] += v * v;
    }
  };

  int64_t packed_end = begin;
  if (!skip && meta.aligned) {
    packed_end = begin + (end - begin) / kILP * kILP;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kILP; i < packed_end;
         i += static_cast<int64_t>(blockDim.x) * kILP) {
      const auto pp = *reinterpret_cast<const Pack<P, kILP>*>(param + i);
      const auto gp = *reinterpret_cast<const Pack<P, kILP>*>(grad + i);
      Pack<St, kILP> sp[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (state[k] != nullptr) {
          sp[k] = *reinterpret_cast<const Pack<St, kILP>*>(state[k] + i);
        }
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        std::array<S, N> s;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          s[k] = state[k] != nullptr ? static_cast<S>(sp[k].v[j]) : S(0);
        }
        add(static_cast<S>(pp.v[j]), static_cast<S>(gp.v[j]), s);
      }
    }
  }
  if (!skip) {
    for (int64_t i = packed_end + threadIdx.x; i < end; i += blockDim.x) {
      std::array<S, N> s;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        s[k] = state[k] != nullptr ? static_cast<S>(state[k][i]) : S(0);
      }
      add(static_cast<S>(param[i]), static_cast<S>(grad[i]), s);
    }
  }
  block_tree_sum<K>(acc, partial, out);
}

// Each tensor's partial rows added in chunk order into its output row.
struct NormFinalizeBatch {
  static constexpr int kMax = 128;
  int32_t first_slot[kMax];
  int32_t num_chunks[kMax];
  int32_t row[kMax];
  int32_t count;
  int32_t num_norms;
};

static __global__ void norm_finalize_kernel(const __grid_constant__ NormFinalizeBatch batch, const double* partials,
                                            double* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch.count) {
    return;
  }
  const int K = batch.num_norms;
  for (int k = 0; k < K; ++k) {
    double sum = 0.0;
    for (int c = 0; c < batch.num_chunks[i]; ++c) {
      sum += partials[(static_cast<int64_t>(batch.first_slot[i]) + c) * K + k];
    }
    out[static_cast<int64_t>(batch.row[i]) * K + k] = sum;
  }
}

template <typename Algo, typename P, typename St>
void launch_norm_typed(const std::vector<size_t>& indices, at::TensorList params, at::TensorList grads,
                       const std::array<at::TensorList, Algo::kNumState>& state,
                       const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                       const std::vector<int32_t>& first_slot, NormLaunchArgs<Algo>& args,
                       const common::DeviceArgs& dev, cudaStream_t stream) {
  launch_chunked(
      indices, params, kNormMaxTensors, args,
      [&](int slot, size_t i) {
        fill_tensor_meta<Algo>(args.tensors[slot], i, params, grads, state, scalars, steps, dev);
        args.first_slot[slot] = first_slot[i];
      },
      [&](int slot) {
        args.tensors[0] = args.tensors[slot];
        args.first_slot[0] = args.first_slot[slot];
      },
      [&](int num_blocks) {
        args.num_blocks = num_blocks;
        launch_kernel(norm_sq_kernel<Algo, P, St>, num_blocks, kBlockSize, stream, args);
      });
}

// Writes each tensor's sums of squared norm terms into `out` (float64
// (params.size(), kNumNorms), contiguous, on the params' device). Device step
// counters are read + step_offset; host `steps` are used as they are.
template <typename Algo>
void norm_sqs_into(const char* op, at::TensorList params, at::TensorList grads,
                   const std::array<at::TensorList, Algo::kNumState>& state,
                   const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                   const typename Algo::Hyper& hp, const cpu::ElementwiseOptions& options,
                   const common::DeviceArgs& dev, float step_offset, const at::Tensor& out) {
  constexpr int K = Algo::kNumNorms;
  if (params.empty()) {
    return;
  }
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kDouble && out.numel() == int64_t(params.size()) * K, op,
              ": internal: bad norm buffer");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  std::vector<int32_t> first_slot(params.size());
  std::vector<int32_t> num_chunks(params.size());
  int64_t slots = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    first_slot[i] = static_cast<int32_t>(slots);
    num_chunks[i] = static_cast<int32_t>((params[i].numel() + kChunk - 1) / kChunk);
    slots += num_chunks[i];
  }
  // One row per chunk; at least one so the pointer is valid when all are empty.
  const auto partials = at::empty({std::max<int64_t>(slots, 1), K}, out.options());

  NormLaunchArgs<Algo> args{};
  args.hyper = hp;
  args.lr = dev.lr.defined() ? dev.lr.data_ptr() : nullptr;
  args.lr_is_double = dev.lr.defined() && dev.lr.scalar_type() == at::kDouble;
  args.step_offset = step_offset;
  args.grad_scale = dev.grad_scale.defined() ? dev.grad_scale.data_ptr<float>() : nullptr;
  args.found_inf = dev.found_inf.defined() ? dev.found_inf.data_ptr<float>() : nullptr;
  args.has_grad_scale = args.grad_scale != nullptr || options.grad_scale.has_value();
  args.host_grad_scale = options.grad_scale.value_or(1.0);
  args.partials = partials.data_ptr<double>();

  for_each_dtype_group(
      op, group_by_dtypes(params, state), [&]<typename P, typename St>(const std::vector<size_t>& indices) {
        launch_norm_typed<Algo, P, St>(indices, params, grads, state, scalars, steps, first_slot, args, dev, stream);
      });
  for (size_t start = 0; start < params.size(); start += NormFinalizeBatch::kMax) {
    NormFinalizeBatch batch{};
    batch.count = static_cast<int32_t>(std::min<size_t>(NormFinalizeBatch::kMax, params.size() - start));
    batch.num_norms = K;
    for (int j = 0; j < batch.count; ++j) {
      batch.first_slot[j] = first_slot[start + j];
      batch.num_chunks[j] = num_chunks[start + j];
      batch.row[j] = static_cast<int32_t>(start + j);
    }
    launch_kernel(norm_finalize_kernel, 1, NormFinalizeBatch::kMax, stream, batch, partials.data_ptr<double>(),
                  out.data_ptr<double>());
  }
}

// A two-stage Algo's whole step on CUDA: the norms (unless given, e.g.
// all-reduced over shards), then the update reading them on the device.
template <typename Algo>
void two_stage_step(const char* op, at::TensorList params, at::TensorList grads,
                    const std::array<at::TensorList, Algo::kNumState>& state, const std::vector<double>& steps,
                    const typename Algo::Hyper& hp, const cpu::ElementwiseOptions& options, const at::Tensor& norm_sqs,
                    const common::DeviceArgs& dev) {
  if (params.empty()) {
    return;
  }
  const auto scalars = step_scalars<Algo>(steps);
  at::Tensor sums = norm_sqs;
  if (!sums.defined()) {
    sums = at::empty({static_cast<int64_t>(params.size()), Algo::kNumNorms}, params[0].options().dtype(at::kDouble));
    // Device counters advance inside elementwise_step, after this pass.
    norm_sqs_into<Algo>(op, params, grads, state, scalars, steps, hp, options, dev, 1.0f, sums);
  }
  elementwise_step<Algo>(op, params, grads, state, scalars, steps, hp, options, dev, nullptr, sums.data_ptr<double>());
}

}  // namespace torchopt_ext::kernels::cuda
