// Chunked multi-tensor apply for the element-wise optimizers on CUDA. The
// per-element math is the Algo of kernels/algos/<algo>.h, the same code the
// CPU kernels run; this file only walks the tensors.
//
// Layout (as torch's fused Adam): tensors are cut into kChunk-element chunks,
// one thread block per chunk; tensor addresses, sizes and per-tensor scalars
// plus the block -> (tensor, chunk) table travel by value in the kernel's
// arguments (under the classic 4 KB limit), relaunching when a table is full.
// Indices are 64-bit. Chunks of tensors whose every pointer is 16-byte aligned
// use packed loads of kILP elements; the rest (unaligned storage offsets) and
// the last partial pack of a tensor use element loads.
//
// lr, the step counters, grad_scale and found_inf are read on the device when
// they are CUDA tensors: no host sync, and a step can be captured in a CUDA
// graph. Math runs in at::opmath_type<P> (fp32 for bf16/fp16 storage).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <new>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/tensor_lists.h"
#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/elementwise_options.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cuda/launch.cuh"

namespace torchopt_ext::kernels::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunk = 65536;
constexpr int kMaxTensors = 24;  // per launch: keeps the argument block under 4 KB for 3 state lists
constexpr int kMaxBlocks = 256;

template <typename Algo>
constexpr bool stores_state(int k) {
  if constexpr (requires { Algo::kReadOnlyState; }) {
    return ((Algo::kReadOnlyState >> k) & 1u) == 0u;
  }
  return true;
}

// Algorithms whose per-tensor scalars are the step count alone (or nothing)
// can take the step from a device counter; others need host-computed scalars.
// Two-stage algorithms (LAMB, MARS) hold the step plus per-tensor norms, which
// the kernel reads from LaunchArgs::norm_sqs (see norm_reduce.cuh).
template <typename Algo>
constexpr bool kScalarsFromStepAndNorms = [] {
  using T = typename Algo::TensorScalars;
  if constexpr (requires(T t) {
                  t.step;
                  t.norms;
                }) {
    return sizeof(T) == sizeof(double) * (1 + std::tuple_size_v<decltype(T::norms)>);
  }
  return false;
}();

template <typename Algo>
constexpr bool kScalarsFromStep =
    std::is_empty_v<typename Algo::TensorScalars> ||
    (sizeof(typename Algo::TensorScalars) == sizeof(double) && requires(typename Algo::TensorScalars t) { t.step; }) ||
    kScalarsFromStepAndNorms<Algo>;

template <typename Algo>
struct TensorMeta {
  void* param;
  void* grad;
  void* state[Algo::kNumState > 0 ? Algo::kNumState : 1];  // nullptr: state unused
  int64_t numel;
  const float* step;  // device step counter (already incremented), or nullptr
  double host_step;   // the step when the counter lives on the host
  typename Algo::TensorScalars scalars;
  // This tensor's scalars in device memory (written by an algorithm's
  // pre-kernel from device counters), or nullptr: then `scalars` holds them.
  const void* device_scalars;
  int32_t index;  // position in the param group (seeds stochastic rounding)
  bool aligned;   // every pointer 16-byte aligned: packed loads
};

template <typename Algo>
struct LaunchArgs {
  typename Algo::Hyper hyper;
  const void* lr;  // device lr or nullptr (then hyper.lr holds it)
  bool lr_is_double;
  const float* grad_scale;  // device pointers or nullptr
  const float* found_inf;
  double host_grad_scale;  // used when grad_scale is nullptr and has_grad_scale
  bool has_grad_scale;
  bool stochastic_rounding;
  int64_t seed;
  const double* norm_sqs;  // two-stage algorithms: (group size, kNumNorms) squared norms on the device
  int32_t num_blocks;
  TensorMeta<Algo> tensors[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// kILP elements loaded as one (or, past 16 bytes, two) vector accesses; the
// alignment never exceeds the 16 bytes checked on the host.
template <typename T, int kILP>
struct alignas(sizeof(T) * kILP > 16 ? 16 : sizeof(T) * kILP) Pack {
  T v[kILP];
};

// The param's storage value: stochastic rounding for bf16 when asked (the
// bits of element i come from the tensor's stream, as on the CPU).
template <typename Algo, typename P, typename S>
__device__ __forceinline__ P store_param(const LaunchArgs<Algo>& args, S value, uint64_t stream, int64_t i) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (args.stochastic_rounding) {
      const auto random = static_cast<uint32_t>(cpu::mix64(stream ^ static_cast<uint64_t>(i)));
      return cpu::round_bf16_stochastic(value, random);
    }
  }
  return static_cast<P>(value);
}

template <typename Algo, typename P, typename St>
__global__ void __launch_bounds__(kBlockSize) elementwise_kernel(const __grid_constant__ LaunchArgs<Algo> args) {
  constexpr int N = Algo::kNumState;
  constexpr int kILP = static_cast<int>(16 / sizeof(P));  // 16-byte param loads: 2 (fp64) to 8 (bf16/fp16)
  using S = at::opmath_type<P>;
  using C = typename Algo::template Coeffs<S>;
  // GradScaler found an inf/NaN: the whole step is skipped, nothing is written.
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) {
    return;
  }
  const int t = args.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * kChunk;
  const TensorMeta<Algo>& meta = args.tensors[t];
  const int64_t end = begin + kChunk < meta.numel ? begin + kChunk : meta.numel;

  // Coefficients once per block, in double as on the host, then shared.
  alignas(C) __shared__ unsigned char coeff_storage[sizeof(C)];
  __shared__ uint64_t stream_shared;
  if (threadIdx.x == 0) {
    typename Algo::Hyper hp = args.hyper;
    if constexpr (requires { hp.lr; }) {
      if (args.lr != nullptr) {
        hp.lr = args.lr_is_double ? *static_cast<const double*>(args.lr)
                                  : static_cast<double>(*static_cast<const float*>(args.lr));
      }
    }
    typename Algo::TensorScalars ts = meta.device_scalars != nullptr
                                          ? *static_cast<const typename Algo::TensorScalars*>(meta.device_scalars)
                                          : meta.scalars;
    const double step = meta.step != nullptr ? static_cast<double>(*meta.step) : meta.host_step;
    if constexpr (requires { ts.step; }) {
      if (meta.step != nullptr) {
        ts.step = step;
      }
    }
    if constexpr (kScalarsFromStepAndNorms<Algo>) {
      constexpr int K = std::tuple_size_v<decltype(ts.norms)>;
      for (int k = 0; k < K; ++k) {
        ts.norms[k] = ::sqrt(args.norm_sqs[static_cast<int64_t>(meta.index) * K + k]);
      }
    }
    new (coeff_storage) C(Algo::template coeffs<S>(hp, ts));
    stream_shared = args.stochastic_rounding ? cpu::rounding_stream(args.seed, meta.index, step) : 0;
  }
  __syncthreads();
  const C& c = *reinterpret_cast<const C*>(coeff_storage);
  const uint64_t stream = stream_shared;
  const S grad_scale =
      args.grad_scale != nullptr ? static_cast<S>(*args.grad_scale) : static_cast<S>(args.host_grad_scale);

  P* param = static_cast<P*>(meta.param);
  P* grad = static_cast<P*>(meta.grad);
  St* state[N > 0 ? N : 1];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    state[k] = static_cast<St*>(meta.state[k]);
  }

  auto one = [&](int64_t i, S& p, S& g, std::array<S, N>& s) {
    if (args.has_grad_scale) {
      g = g / grad_scale;
    }
    Algo::update(c, p, g, s);
  };

  int64_t packed_end = begin;
  if (meta.aligned) {
    packed_end = begin + (end - begin) / kILP * kILP;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kILP; i < packed_end;
         i += static_cast<int64_t>(blockDim.x) * kILP) {
      const auto pp = *reinterpret_cast<const Pack<P, kILP>*>(param + i);
      const auto gp = *reinterpret_cast<const Pack<P, kILP>*>(grad + i);
      Pack<St, kILP> sp[N > 0 ? N : 1];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (state[k] != nullptr) {
          sp[k] = *reinterpret_cast<const Pack<St, kILP>*>(state[k] + i);
        }
      }
      Pack<P, kILP> po, go;
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        S p = static_cast<S>(pp.v[j]);
        S g = static_cast<S>(gp.v[j]);
        std::array<S, N> s;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          s[k] = state[k] != nullptr ? static_cast<S>(sp[k].v[j]) : S(0);
        }
        one(i + j, p, g, s);
        go.v[j] = static_cast<P>(g);
        po.v[j] = store_param<Algo, P>(args, p, stream, i + j);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          sp[k].v[j] = static_cast<St>(s[k]);
        }
      }
      *reinterpret_cast<Pack<P, kILP>*>(param + i) = po;
      if (args.has_grad_scale) {
        *reinterpret_cast<Pack<P, kILP>*>(grad + i) = go;  // GradScaler: unscaled grads written back
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (state[k] != nullptr && stores_state<Algo>(k)) {
          *reinterpret_cast<Pack<St, kILP>*>(state[k] + i) = sp[k];
        }
      }
    }
  }
  for (int64_t i = packed_end + threadIdx.x; i < end; i += blockDim.x) {
    S p = static_cast<S>(param[i]);
    S g = static_cast<S>(grad[i]);
    std::array<S, N> s;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      s[k] = state[k] != nullptr ? static_cast<S>(state[k][i]) : S(0);
    }
    one(i, p, g, s);
    if (args.has_grad_scale) {
      grad[i] = static_cast<P>(g);
    }
    param[i] = store_param<Algo, P>(args, p, stream, i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (state[k] != nullptr && stores_state<Algo>(k)) {
        state[k][i] = static_cast<St>(s[k]);
      }
    }
  }
}

// Device step counters: += 1 unless found_inf says the step is skipped.
struct StepBatch {
  static constexpr int kMax = 128;
  float* steps[kMax];
  int count;
};

static __global__ void increment_steps_kernel(const __grid_constant__ StepBatch batch, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;
  }
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < batch.count) {
    *batch.steps[i] += 1.0f;
  }
}

inline void increment_device_steps(at::TensorList steps, const float* found_inf, cudaStream_t stream) {
  for (size_t start = 0; start < steps.size(); start += StepBatch::kMax) {
    StepBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(StepBatch::kMax, steps.size() - start));
    for (int i = 0; i < batch.count; ++i) {
      batch.steps[i] = steps[start + i].data_ptr<float>();
    }
    launch_kernel(increment_steps_kernel, 1, StepBatch::kMax, stream, batch, found_inf);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sums each thread's K values over the block with a fixed-shape tree (the
// same sums on every run: deterministic) through `scratch`, and thread 0
// writes the K totals to out[0..K). Every thread of the block must call it.
template <int K>
__device__ void block_tree_sum(const double (&acc)[K], double (&scratch)[K][kBlockSize], double* out) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    scratch[k][threadIdx.x] = acc[k];
  }
  __syncthreads();
  for (int width = kBlockSize / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        scratch[k][threadIdx.x] += scratch[k][threadIdx.x + width];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      out[k] = scratch[k][0];
    }
  }
}

// Packs the chunks of params[indices] (empty tensors skipped) into launches
// of at most `max_tensors` tensors and kMaxBlocks blocks; block b runs chunk
// args.block_chunk[b] of the tensor in slot args.block_tensor[b].
// fill(slot, i) writes tensor i's metadata into `slot`; carry(slot) moves the
// tensor in flight to slot 0 when a launch ends inside it; launch(num_blocks)
// runs one kernel over the table.
template <typename Args, typename Fill, typename Carry, typename Launch>
void launch_chunked(const std::vector<size_t>& indices, at::TensorList params, int max_tensors, Args& args, Fill fill,
                    Carry carry, Launch launch) {
  int num_tensors = 0;
  int num_blocks = 0;
  auto flush = [&] {
    if (num_blocks > 0) {
      launch(num_blocks);
    }
    num_blocks = 0;
  };
  for (size_t i : indices) {
    const int64_t numel = params[i].numel();
    if (numel == 0) {
      continue;
    }
    if (num_tensors == max_tensors) {
      flush();
      num_tensors = 0;
    }
    fill(num_tensors, i);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      args.block_tensor[num_blocks] = static_cast<int16_t>(num_tensors);
      args.block_chunk[num_blocks] = static_cast<int32_t>(chunk);
      if (++num_blocks == kMaxBlocks) {
        flush();
        if (chunk + 1 < chunks) {
          carry(num_tensors);
          num_tensors = 0;
        } else {
          num_tensors = -1;
        }
      }
    }
    ++num_tensors;
  }
  flush();
}

// Indices of params grouped by (param dtype, state dtype); a param's state
// dtype is that of its last non-empty state list (its own dtype without state).
using DtypeGroups = std::vector<std::pair<std::pair<at::ScalarType, at::ScalarType>, std::vector<size_t>>>;
template <size_t N>
DtypeGroups group_by_dtypes(at::TensorList params, const std::array<at::TensorList, N>& state) {
  DtypeGroups groups;
  for (size_t i = 0; i < params.size(); ++i) {
    at::ScalarType state_type = params[i].scalar_type();
    for (const auto& list : state) {
      if (!list.empty()) {
        state_type = list[i].scalar_type();
      }
    }
    const auto key = std::make_pair(params[i].scalar_type(), state_type);
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (it == groups.end()) {
      groups.push_back({key, {i}});
    } else {
      it->second.push_back(i);
    }
  }
  return groups;
}

// Calls launch.template operator()<P, St>(indices) for each group with the
// C++ types of its dtypes; pairs whose math types differ have no kernel.
template <typename Launch>
void for_each_dtype_group(const char* op, const DtypeGroups& groups, Launch&& launch) {
  for (const auto& [types, indices] : groups) {
    bool launched = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, types.first, "torchopt_ext_cuda_kernel", [&] {
      using P = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, types.second, "torchopt_ext_cuda_kernel", [&] {
        if constexpr (std::is_same_v<at::opmath_type<P>, at::opmath_type<scalar_t>>) {
          launch.template operator()<P, scalar_t>(indices);
          launched = true;
        }
      });
    });
    TORCH_CHECK(launched, op, ": no CUDA kernel for ", types.first, " params with ", types.second, " state");
  }
}

// The metadata both the update and the norm passes read for tensor i.
template <typename Algo>
void fill_tensor_meta(TensorMeta<Algo>& meta, size_t i, at::TensorList params, at::TensorList grads,
                      const std::array<at::TensorList, Algo::kNumState>& state,
                      const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                      const common::DeviceArgs& dev) {
  meta.param = params[i].data_ptr();
  meta.grad = grads[i].data_ptr();
  meta.aligned = aligned16(meta.param) && aligned16(meta.grad);
  for (int k = 0; k < Algo::kNumState; ++k) {
    meta.state[k] = state[k].empty() ? nullptr : state[k][i].data_ptr();
    meta.aligned = meta.aligned && (meta.state[k] == nullptr || aligned16(meta.state[k]));
  }
  meta.numel = params[i].numel();
  meta.step = dev.steps.empty() ? nullptr : dev.steps[i].data_ptr<float>();
  meta.host_step = steps[i];
  meta.scalars = scalars[i];
  meta.device_scalars = nullptr;
  meta.index = static_cast<int32_t>(i);
}

template <typename Algo, typename P, typename St>
void launch_typed(const std::vector<size_t>& indices, at::TensorList params, at::TensorList grads,
                  const std::array<at::TensorList, Algo::kNumState>& state,
                  const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                  LaunchArgs<Algo>& args, const common::DeviceArgs& dev, const void* device_scalars,
                  cudaStream_t stream) {
  launch_chunked(
      indices, params, kMaxTensors, args,
      [&](int slot, size_t i) {
        auto& meta = args.tensors[slot];
        fill_tensor_meta<Algo>(meta, i, params, grads, state, scalars, steps, dev);
        if (device_scalars != nullptr) {
          meta.device_scalars = static_cast<const char*>(device_scalars) + i * sizeof(typename Algo::TensorScalars);
        }
      },
      [&](int slot) { args.tensors[0] = args.tensors[slot]; },
      [&](int num_blocks) {
        args.num_blocks = num_blocks;
        launch_kernel(elementwise_kernel<Algo, P, St>, num_blocks, kBlockSize, stream, args);
      });
}

// Algorithms whose per-tensor scalars are computed on the host (NAdam's
// mu-product) need the host lr and step values: say so before anything runs.
inline void require_host_scalars(const char* op, const common::DeviceArgs& dev) {
  TORCH_CHECK_VALUE(dev.steps.empty() && !dev.lr.defined(), op,
                    ": on CUDA this optimizer needs its lr and state_steps as CPU tensors (its per-tensor scalars are "
                    "computed on the host)");
}

// The CPU entry points' per-tensor scalars for algorithms whose scalars are
// the step or nothing.
template <typename Algo>
std::vector<typename Algo::TensorScalars> step_scalars(const std::vector<double>& steps) {
  std::vector<typename Algo::TensorScalars> scalars(steps.size());
  if constexpr (requires(typename Algo::TensorScalars t) { t.step; }) {
    for (size_t i = 0; i < steps.size(); ++i) {
      scalars[i].step = steps[i];
    }
  }
  return scalars;
}

// Runs Algo over one param group of CUDA tensors (contiguous, one device).
// `steps` are the host step values (unused when dev.steps holds device
// counters); `scalars` the host per-tensor scalars, or, when
// `device_scalars` is given, a device array of one Algo::TensorScalars per
// param (in list order) that a pre-kernel on the same stream wrote;
// `norm_sqs` the two-stage algorithms' per-tensor squared norms on the device.
template <typename Algo>
void elementwise_step(const char* op, at::TensorList params, at::TensorList grads,
                      const std::array<at::TensorList, Algo::kNumState>& state,
                      const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                      const typename Algo::Hyper& hp, const cpu::ElementwiseOptions& options,
                      const common::DeviceArgs& dev, const void* device_scalars = nullptr,
                      const double* norm_sqs = nullptr) {
  if constexpr (kScalarsFromStepAndNorms<Algo>) {
    TORCH_CHECK(norm_sqs != nullptr, op, ": the per-tensor norms must be computed first (norm_reduce.cuh)");
  }
  if (params.empty()) {
    return;
  }
  if constexpr (!kScalarsFromStep<Algo>) {
    if (device_scalars == nullptr) {
      require_host_scalars(op, dev);
    }
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  const float* found_inf = dev.found_inf.defined() ? dev.found_inf.data_ptr<float>() : nullptr;
  if (!dev.steps.empty()) {
    increment_device_steps(dev.steps, found_inf, stream);
  }
  LaunchArgs<Algo> args{};
  args.hyper = hp;
  args.lr = dev.lr.defined() ? dev.lr.data_ptr() : nullptr;
  args.lr_is_double = dev.lr.defined() && dev.lr.scalar_type() == at::kDouble;
  args.grad_scale = dev.grad_scale.defined() ? dev.grad_scale.data_ptr<float>() : nullptr;
  args.found_inf = found_inf;
  args.has_grad_scale = args.grad_scale != nullptr || options.grad_scale.has_value();
  args.host_grad_scale = options.grad_scale.value_or(1.0);
  args.stochastic_rounding = options.stochastic_rounding;
  args.seed = options.seed;
  args.norm_sqs = norm_sqs;

  // One launch sequence per (param dtype, state dtype) pair present.
  for_each_dtype_group(
      op, group_by_dtypes(params, state), [&]<typename P, typename St>(const std::vector<size_t>& indices) {
        launch_typed<Algo, P, St>(indices, params, grads, state, scalars, steps, args, dev, device_scalars, stream);
      });
}

}  // namespace torchopt_ext::kernels::cuda
