// CUDA Adafactor (issue 7): the CPU kernel's passes (kernels/cpu/adafactor.cpp)
// as device kernels, with the per-tensor and per-element math of
// kernels/algos/adafactor.h. Every reduction is deterministic (fixed
// partitions, fixed-order tree sums, no atomics), so a step gives the same
// bits every run:
//   stage 1  sums_kernel     one block per row (factored) or 2048-element unit:
//                            ||theta||^2 and the row sums of g^2, AMP unscaling
//            col_kernel      one thread per column over 128-row slabs: column
//                            sums of g^2 (partials per slab, in double)
//            collect_kernel  per tensor: counts, sums, row EMA, column sums
//   stage 2  factors_kernel  per tensor: column EMA, alpha, row / column factors
//            update_sq_kernel per unit: sum U^2 (unfactored: the new variance)
//            collect_update_kernel
//   stage 3  factors_kernel  per tensor: factors again and the clip
//            apply_kernel    the update
// The stats buffers have the CPU layout, so adafactor_stage_ on CUDA tensors
// lets a sharded caller all-reduce them between stages (NCCL on device).
// lr, step counters, grad_scale and found_inf may live on the device (read
// there: no host sync). One launch sequence per tensor.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/algos/adafactor.h"
#include "kernels/cuda/adafactor.h"
#include "kernels/cuda/multi_tensor_apply.cuh"
#include "torchopt_ext/functional/adafactor.h"

namespace torchopt_ext::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kFlatUnit = 2048;  // elements per block of an unfactored tensor
constexpr int64_t kSlabRows = 128;   // rows per column-sum partial
constexpr int64_t kFlushRows = 32;   // rows summed in the math type before adding into double

// Per-call scalars shared by every kernel.
struct CallArgs {
  const float* found_inf;  // device pointers or nullptr
  const float* grad_scale;
  double host_grad_scale;
  bool has_grad_scale;
  const void* lr;  // device lr or nullptr (then host_lr)
  bool lr_is_double;
  double host_lr;
  double beta2_decay;
  double eps2;
  double d;
  double weight_decay;
  double beta1;
  bool has_beta1;
  bool relative_step;
  bool scale_parameter;
  bool warmup_init;
  bool maximize;
  bool stochastic_rounding;
  int64_t seed;
};

// One tensor's pointers, sizes and scratch (the S-typed factor copies are
// void* so the struct does not depend on the math type).
struct TensorArgs {
  void* param;
  void* grad;
  void* row_var;
  void* col_var;
  void* variance;
  void* exp_avg;
  double* stats;         // CPU layout (kernels/cpu/adafactor.h)
  double* unit_theta;    // per unit: sum of theta^2
  double* unit_update;   // per unit: sum of U^2
  double* row_sums;      // factored: per row, sum of g^2
  double* col_partials;  // factored: [batch][slab][col] sums of g^2
  void* rows;            // factored, math type: row factors (B * R)
  void* cols;            //   column factors (B * C)
  void* means;           //   clamped row_var means (B)
  int* fast;             //   per matrix: the split rsqrt form applies
  double* scalars;       // [eps1, alpha, update_scale]
  int64_t numel;
  int64_t batches;
  int64_t rows_n;
  int64_t cols_n;
  int64_t units;
  int64_t slabs;
  bool factored;
  double eps1;
  const float* step;  // device counter (already incremented) or nullptr
  double host_step;
  int64_t index;  // position in the op's param list (rounding stream)
};

__device__ __forceinline__ bool skipped(const CallArgs& a) { return a.found_inf != nullptr && *a.found_inf != 0.0f; }

__device__ __forceinline__ double step_of(const TensorArgs& t) {
  return t.step != nullptr ? static_cast<double>(*t.step) : t.host_step;
}

__device__ __forceinline__ double lr_of(const CallArgs& a) {
  if (a.lr == nullptr) {
    return a.host_lr;
  }
  return a.lr_is_double ? *static_cast<const double*>(a.lr) : static_cast<double>(*static_cast<const float*>(a.lr));
}

// Fixed-order tree sum over the block (kThreads threads): every run adds the
// same values in the same order.
__device__ double block_sum(double value, double* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      shared[threadIdx.x] += shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// Sum of values[0, n) in a fixed order (strided per thread, then the tree).
__device__ double ordered_sum(const double* values, int64_t n, double* shared) {
  double local = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    local += values[i];
  }
  return block_sum(local, shared);
}

__device__ __forceinline__ void unit_range(const TensorArgs& t, int64_t unit, int64_t& begin, int64_t& end) {
  if (t.factored) {
    begin = unit * t.cols_n;
    end = begin + t.cols_n;
  } else {
    begin = unit * kFlatUnit;
    end = begin + kFlatUnit < t.numel ? begin + kFlatUnit : t.numel;
  }
}

// Stage 1, per unit: ||theta||^2 and (factored) the row's sum of g^2; the
// grads are unscaled and written back here, once.
template <typename P>
__global__ void __launch_bounds__(kThreads) sums_kernel(const CallArgs a, const TensorArgs t) {
  using S = at::opmath_type<P>;
  __shared__ double shared[kThreads];
  if (skipped(a)) {
    return;
  }
  const int64_t unit = blockIdx.x;
  int64_t begin, end;
  unit_range(t, unit, begin, end);
  const P* param = static_cast<const P*>(t.param);
  P* grad = static_cast<P*>(t.grad);
  const S scale = a.grad_scale != nullptr ? static_cast<S>(*a.grad_scale) : static_cast<S>(a.host_grad_scale);
  S theta_sq = S(0);
  S grad_sq = S(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const S p = static_cast<S>(param[i]);
    S g = static_cast<S>(grad[i]);
    if (a.has_grad_scale) {
      g = g / scale;
      grad[i] = static_cast<P>(g);
    }
    theta_sq += p * p;
    grad_sq += g * g;
  }
  const double theta_total = block_sum(static_cast<double>(theta_sq), shared);
  const double grad_total = block_sum(static_cast<double>(grad_sq), shared);
  if (threadIdx.x == 0) {
    t.unit_theta[unit] = theta_total;
    if (t.factored) {
      t.row_sums[unit] = grad_total;
    }
  }
}

// Stage 1, factored: column sums of g^2 over one slab of rows of one matrix;
// adjacent threads read adjacent columns (coalesced). Runs after sums_kernel
// on the stream, so it reads the unscaled grads.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    col_kernel(const CallArgs a, const TensorArgs t, int64_t slab_base, int64_t batch_base) {
  using S = at::opmath_type<P>;
  if (skipped(a)) {
    return;
  }
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t slab = slab_base + blockIdx.y;
  const int64_t b = batch_base + blockIdx.z;
  if (c >= t.cols_n) {
    return;
  }
  const P* grad = static_cast<const P*>(t.grad);
  const int64_t r_begin = slab * kSlabRows;
  const int64_t r_end = r_begin + kSlabRows < t.rows_n ? r_begin + kSlabRows : t.rows_n;
  double total = 0.0;
  S run = S(0);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const S g = static_cast<S>(grad[(b * t.rows_n + r) * t.cols_n + c]);
    run += g * g;
    if ((r - r_begin + 1) % kFlushRows == 0) {
      total += static_cast<double>(run);
      run = S(0);
    }
  }
  total += static_cast<double>(run);
  t.col_partials[(b * t.slabs + slab) * t.cols_n + c] = total;
}

// Stage 1, per tensor (one block): the stats entries and the new row EMA.
template <typename P, typename St>
__global__ void __launch_bounds__(kThreads) collect_kernel(const CallArgs a, const TensorArgs t) {
  using S = at::opmath_type<P>;
  __shared__ double shared[kThreads];
  if (skipped(a)) {
    return;
  }
  const double theta_sq = ordered_sum(t.unit_theta, t.units, shared);
  double* stats = t.stats;
  if (threadIdx.x == 0) {
    stats[cpu::kAdafactorStatNumel] = static_cast<double>(t.numel);
    stats[cpu::kAdafactorStatThetaSq] = theta_sq;
    stats[cpu::kAdafactorStatUpdateSq] = 0.0;
    if (t.factored) {
      stats[cpu::kAdafactorStatRows] = static_cast<double>(t.rows_n);
    }
  }
  if (!t.factored) {
    return;
  }
  const S weight = static_cast<S>(::pow(step_of(t), a.beta2_decay));
  St* row_var = static_cast<St*>(t.row_var);
  const int64_t R = t.rows_n;
  const int64_t C = t.cols_n;
  double* row_var_sums = stats + cpu::kAdafactorStatRowVarSums;
  double* col_sums = row_var_sums + t.batches;
  for (int64_t b = 0; b < t.batches; ++b) {
    double local = 0.0;
    for (int64_t r = threadIdx.x; r < R; r += kThreads) {
      const int64_t k = b * R + r;
      const S mean = static_cast<S>(t.row_sums[k] / static_cast<double>(C));
      row_var[k] = static_cast<St>(vlerp(static_cast<S>(row_var[k]), mean, weight));
      local += static_cast<double>(static_cast<S>(row_var[k]));
    }
    const double total = block_sum(local, shared);
    if (threadIdx.x == 0) {
      row_var_sums[b] = total;
    }
  }
  for (int64_t k = threadIdx.x; k < t.batches * C; k += kThreads) {
    const int64_t b = k / C;
    const int64_t c = k - b * C;
    double sum = 0.0;
    for (int64_t slab = 0; slab < t.slabs; ++slab) {
      sum += t.col_partials[(b * t.slabs + slab) * C + c];
    }
    col_sums[k] = sum;
  }
}

// Stages 2 and 3, per tensor (one block): with `col_ema` the new column EMA
// (stage 2); then alpha and the factors; with `clip` the update scale
// (stage 3). Tensors whose whole numel (the reduced count) is 0 are skipped.
template <typename P, typename St>
__global__ void __launch_bounds__(kThreads)
    factors_kernel(const CallArgs a, const TensorArgs t, bool col_ema, bool clip) {
  using S = at::opmath_type<P>;
  __shared__ S means_shared[1];
  if (skipped(a) || !(t.stats[cpu::kAdafactorStatNumel] > 0.0)) {
    return;
  }
  const double* stats = t.stats;
  const double step = step_of(t);
  const int64_t R = t.rows_n;
  const int64_t C = t.cols_n;
  if (t.factored && col_ema) {
    const S weight = static_cast<S>(::pow(step, a.beta2_decay));
    const double all_rows = stats[cpu::kAdafactorStatRows];
    const double* col_sums = stats + cpu::kAdafactorStatRowVarSums + t.batches;
    St* col_var = static_cast<St*>(t.col_var);
    for (int64_t k = threadIdx.x; k < t.batches * C; k += kThreads) {
      const S mean = static_cast<S>(col_sums[k] / all_rows);
      col_var[k] = static_cast<St>(vlerp(static_cast<S>(col_var[k]), mean, weight));
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double theta_norm = static_cast<double>(static_cast<S>(::sqrt(stats[cpu::kAdafactorStatThetaSq])));
    const AdafactorStepSize size{lr_of(a), a.eps2, a.relative_step, a.warmup_init, a.scale_parameter};
    const double alpha = AdafactorMath::alpha(size, step, theta_norm, stats[cpu::kAdafactorStatNumel]);
    t.scalars[0] = t.eps1;
    t.scalars[1] = alpha;
    if (clip) {
      const double norm = static_cast<double>(static_cast<S>(::sqrt(stats[cpu::kAdafactorStatUpdateSq])));
      t.scalars[2] = AdafactorMath::update_scale(alpha, norm, stats[cpu::kAdafactorStatNumel], a.d);
    }
  }
  if (!t.factored) {
    return;
  }
  const St* row_var = static_cast<const St*>(t.row_var);
  const St* col_var = static_cast<const St*>(t.col_var);
  S* rows = static_cast<S*>(t.rows);
  S* cols = static_cast<S*>(t.cols);
  S* means = static_cast<S*>(t.means);
  const double all_rows = stats[cpu::kAdafactorStatRows];
  for (int64_t b = 0; b < t.batches; ++b) {
    if (threadIdx.x == 0) {
      // torch: row_var.mean(dim=-2).clamp_(min=eps1), NaN kept.
      const S m = vmaximum(static_cast<S>(stats[cpu::kAdafactorStatRowVarSums + b] / all_rows), static_cast<S>(t.eps1));
      means[b] = m;
      t.fast[b] = ::isfinite(m) && m > S(0);
      means_shared[0] = m;
    }
    __syncthreads();
    const S m = means_shared[0];
    const bool fast = ::isfinite(m) && m > S(0);
    for (int64_t r = threadIdx.x; r < R; r += kThreads) {
      const S v = static_cast<S>(row_var[b * R + r]);
      rows[b * R + r] = fast ? AdafactorMath::rsqrt(v / m) : v;
    }
    for (int64_t c = threadIdx.x; c < C; c += kThreads) {
      const S v = static_cast<S>(col_var[b * C + c]);
      cols[b * C + c] = fast ? AdafactorMath::rsqrt(v) : v;
    }
    __syncthreads();
  }
}

// k = U / g at element i (the same forms as the CPU kernel): the split
// factored scale, the exact factored form, or the unfactored inverse root of
// the stored variance.
template <typename S, typename St>
__device__ __forceinline__ S scale_at(const TensorArgs& t, int64_t i, S eps1_sq) {
  if (!t.factored) {
    return AdafactorMath::inverse_root(static_cast<S>(static_cast<const St*>(t.variance)[i]), eps1_sq);
  }
  const int64_t row = i / t.cols_n;
  const int64_t c = i - row * t.cols_n;
  const int64_t b = row / t.rows_n;
  const S r = static_cast<const S*>(t.rows)[row];
  const S col = static_cast<const S*>(t.cols)[b * t.cols_n + c];
  if (t.fast[b]) {
    return AdafactorMath::factored_scale(r, col, AdafactorMath::rsqrt(eps1_sq));
  }
  return AdafactorMath::factored_scale_exact(r, col, static_cast<const S*>(t.means)[b], eps1_sq);
}

// Stage 2, per unit: sum of U^2; unfactored, first the new variance (the
// update uses the stored, rounded value, as on the CPU).
template <typename P, typename St>
__global__ void __launch_bounds__(kThreads) update_sq_kernel(const CallArgs a, const TensorArgs t) {
  using S = at::opmath_type<P>;
  __shared__ double shared[kThreads];
  if (skipped(a) || !(t.stats[cpu::kAdafactorStatNumel] > 0.0)) {
    return;
  }
  const int64_t unit = blockIdx.x;
  int64_t begin, end;
  unit_range(t, unit, begin, end);
  const P* grad = static_cast<const P*>(t.grad);
  const S eps1_sq = static_cast<S>(t.eps1 * t.eps1);
  const S weight = static_cast<S>(::pow(step_of(t), a.beta2_decay));
  S update_sq = S(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const S g = static_cast<S>(grad[i]);
    if (!t.factored) {
      St* variance = static_cast<St*>(t.variance);
      variance[i] = static_cast<St>(vlerp(static_cast<S>(variance[i]), g * g, weight));
    }
    const S u = scale_at<S, St>(t, i, eps1_sq) * g;
    update_sq += u * u;
  }
  const double total = block_sum(static_cast<double>(update_sq), shared);
  if (threadIdx.x == 0) {
    t.unit_update[unit] = total;
  }
}

__global__ void __launch_bounds__(kThreads) collect_update_kernel(const CallArgs a, const TensorArgs t) {
  __shared__ double shared[kThreads];
  if (skipped(a)) {
    return;
  }
  const double total = ordered_sum(t.unit_update, t.units, shared);
  if (threadIdx.x == 0) {
    t.stats[cpu::kAdafactorStatUpdateSq] = total;
  }
}

// Stage 3: theta (and exp_avg) updated element by element (grid-stride).
template <typename P, typename St>
__global__ void __launch_bounds__(kThreads) apply_kernel(const CallArgs a, const TensorArgs t) {
  using S = at::opmath_type<P>;
  __shared__ AdafactorApplyCoeffs<S> coeffs_shared;
  __shared__ uint64_t stream_shared;
  if (skipped(a) || !(t.stats[cpu::kAdafactorStatNumel] > 0.0)) {
    return;
  }
  if (threadIdx.x == 0) {
    const double lr = lr_of(a);
    coeffs_shared = {static_cast<S>(1.0 - lr * a.weight_decay),
                     static_cast<S>(a.beta1),
                     static_cast<S>(1.0 - a.beta1),
                     static_cast<S>(t.scalars[2]),
                     a.weight_decay != 0.0,
                     a.maximize};
    stream_shared = a.stochastic_rounding ? cpu::rounding_stream(a.seed, t.index, step_of(t)) : 0;
  }
  __syncthreads();
  const AdafactorApplyCoeffs<S> coeffs = coeffs_shared;
  const uint64_t stream = stream_shared;
  const S eps1_sq = static_cast<S>(t.eps1 * t.eps1);
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  St* exp_avg = static_cast<St*>(t.exp_avg);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < t.numel; i += stride) {
    const S g = static_cast<S>(grad[i]);
    const S u = scale_at<S, St>(t, i, eps1_sq) * g;
    S p = static_cast<S>(param[i]);
    S m = exp_avg != nullptr ? static_cast<S>(exp_avg[i]) : S(0);
    AdafactorMath::apply(coeffs, p, u, exp_avg != nullptr ? &m : nullptr);
    if (exp_avg != nullptr) {
      exp_avg[i] = static_cast<St>(m);
    }
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (a.stochastic_rounding) {
        const auto random = static_cast<uint32_t>(cpu::mix64(stream ^ static_cast<uint64_t>(i)));
        param[i] = cpu::round_bf16_stochastic(p, random);
        continue;
      }
    }
    param[i] = static_cast<P>(p);
  }
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)); }

template <typename P, typename St>
void launch_stage(int stage, const CallArgs& a, const TensorArgs& t, cudaStream_t stream) {
  const bool has_units = t.units > 0;
  if (stage == 1) {
    if (has_units) {
      launch_kernel(sums_kernel<P>, static_cast<unsigned>(t.units), kThreads, stream, a, t);
      if (t.factored && t.slabs > 0 && t.cols_n > 0) {
        // gridDim.y / z stop at 65535: very tall matrices or deep stacks take several launches.
        constexpr int64_t kMaxGridYZ = 65535;
        for (int64_t batch = 0; batch < t.batches; batch += kMaxGridYZ) {
          for (int64_t slab = 0; slab < t.slabs; slab += kMaxGridYZ) {
            const dim3 grid(static_cast<unsigned>((t.cols_n + kThreads - 1) / kThreads),
                            static_cast<unsigned>(std::min(kMaxGridYZ, t.slabs - slab)),
                            static_cast<unsigned>(std::min(kMaxGridYZ, t.batches - batch)));
            launch_kernel(col_kernel<P>, grid, kThreads, stream, a, t, slab, batch);
          }
        }
      }
    }
    launch_kernel(collect_kernel<P, St>, 1, kThreads, stream, a, t);
  } else if (stage == 2) {
    launch_kernel(factors_kernel<P, St>, 1, kThreads, stream, a, t, true, false);
    if (has_units) {
      launch_kernel(update_sq_kernel<P, St>, static_cast<unsigned>(t.units), kThreads, stream, a, t);
    }
    launch_kernel(collect_update_kernel, 1, kThreads, stream, a, t);
  } else {
    launch_kernel(factors_kernel<P, St>, 1, kThreads, stream, a, t, false, true);
    if (t.numel > 0) {
      launch_kernel(apply_kernel<P, St>, blocks_for(t.numel), kThreads, stream, a, t);
    }
  }
}

// Scratch for one tensor, carved from one device buffer (16-byte aligned pieces).
struct Carver {
  int64_t offset = 0;
  int64_t take(int64_t bytes) {
    const int64_t at = offset;
    offset += (bytes + 15) / 16 * 16;
    return at;
  }
};

}  // namespace

void adafactor_run(int stage, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                   at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                   const std::vector<double>& steps, at::TensorList stats, const cpu::AdafactorHyperparams& hp,
                   const cpu::ElementwiseOptions& options, const common::DeviceArgs& device,
                   bool increment_device_steps_now) {
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  CallArgs a{};
  a.found_inf = device.found_inf.defined() ? device.found_inf.data_ptr<float>() : nullptr;
  a.grad_scale = device.grad_scale.defined() ? device.grad_scale.data_ptr<float>() : nullptr;
  a.host_grad_scale = options.grad_scale.value_or(1.0);
  a.has_grad_scale = a.grad_scale != nullptr || options.grad_scale.has_value();
  a.lr = device.lr.defined() ? device.lr.data_ptr() : nullptr;
  a.lr_is_double = device.lr.defined() && device.lr.scalar_type() == at::kDouble;
  a.host_lr = hp.lr;
  a.beta2_decay = hp.beta2_decay;
  a.eps2 = hp.eps2;
  a.d = hp.d;
  a.weight_decay = hp.weight_decay;
  a.beta1 = hp.beta1.value_or(0.0);
  a.has_beta1 = hp.beta1.has_value();
  a.relative_step = hp.relative_step;
  a.scale_parameter = hp.scale_parameter;
  a.warmup_init = hp.warmup_init;
  a.maximize = hp.maximize;
  a.stochastic_rounding = options.stochastic_rounding;
  a.seed = options.seed;
  if (increment_device_steps_now && !device.steps.empty()) {
    increment_device_steps(device.steps, a.found_inf, stream);
  }

  const size_t n = params.size();
  std::vector<TensorArgs> tensors(n);
  std::vector<at::ScalarType> state_types(n);
  std::vector<int64_t> offsets(n * 11, 0);
  Carver carve;
  size_t factored_index = 0;
  size_t flat_index = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    auto& t = tensors[i];
    const int64_t math_size = p.scalar_type() == at::kDouble ? 8 : 4;
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.numel = p.numel();
    t.factored = p.dim() >= 2;
    t.index = static_cast<int64_t>(i);
    t.step = device.steps.empty() ? nullptr : device.steps[i].data_ptr<float>();
    t.host_step = steps[i];
    switch (p.scalar_type()) {
      case at::kDouble:
        t.eps1 = hp.eps1.value_or(std::numeric_limits<double>::epsilon());
        break;
      case at::kFloat:
        t.eps1 = hp.eps1.value_or(static_cast<double>(std::numeric_limits<float>::epsilon()));
        break;
      case at::kBFloat16:
        t.eps1 = hp.eps1.value_or(static_cast<double>(std::numeric_limits<c10::BFloat16>::epsilon()));
        break;
      default:
        t.eps1 = hp.eps1.value_or(static_cast<double>(std::numeric_limits<c10::Half>::epsilon()));
        break;
    }
    if (t.factored) {
      t.rows_n = p.size(-2);
      t.cols_n = p.size(-1);
      t.batches = 1;
      for (int64_t dim = 0; dim + 2 < p.dim(); ++dim) {
        t.batches *= p.size(dim);
      }
      t.units = t.batches * t.rows_n;
      t.slabs = (t.rows_n + kSlabRows - 1) / kSlabRows;
      t.row_var = row_vars[factored_index].data_ptr();
      t.col_var = col_vars[factored_index].data_ptr();
      state_types[i] = row_vars[factored_index].scalar_type();
      ++factored_index;
    } else {
      t.batches = 1;
      t.units = (t.numel + kFlatUnit - 1) / kFlatUnit;
      t.variance = variances[flat_index].data_ptr();
      state_types[i] = variances[flat_index].scalar_type();
      ++flat_index;
    }
    t.exp_avg = exp_avgs.empty() ? nullptr : exp_avgs[i].data_ptr();
    int64_t* off = offsets.data() + i * 11;
    off[0] = stats.empty() ? carve.take(cpu::adafactor_stats_size(p) * 8) : -1;
    off[1] = carve.take(t.units * 8);
    off[2] = carve.take(t.units * 8);
    off[3] = carve.take(t.factored ? t.units * 8 : 0);
    off[4] = carve.take(t.factored ? t.batches * t.slabs * t.cols_n * 8 : 0);
    off[5] = carve.take(t.factored ? t.batches * t.rows_n * math_size : 0);
    off[6] = carve.take(t.factored ? t.batches * t.cols_n * math_size : 0);
    off[7] = carve.take(t.factored ? t.batches * math_size : 0);
    off[8] = carve.take(t.factored ? t.batches * 4 : 0);
    off[9] = carve.take(3 * 8);
  }
  // One scratch allocation per call (the caching allocator makes it cheap);
  // stages 2 and 3 recompute what they need from the state and the stats.
  const auto scratch = at::empty({std::max<int64_t>(carve.offset, 16)}, params[0].options().dtype(at::kByte));
  auto* base = static_cast<char*>(scratch.data_ptr());
  auto piece = [&](int64_t off) { return off < 0 ? nullptr : static_cast<void*>(base + off); };
  for (size_t i = 0; i < n; ++i) {
    auto& t = tensors[i];
    const int64_t* off = offsets.data() + i * 11;
    t.stats = stats.empty() ? static_cast<double*>(piece(off[0])) : stats[i].data_ptr<double>();
    t.unit_theta = static_cast<double*>(piece(off[1]));
    t.unit_update = static_cast<double*>(piece(off[2]));
    t.row_sums = static_cast<double*>(piece(off[3]));
    t.col_partials = static_cast<double*>(piece(off[4]));
    t.rows = piece(off[5]);
    t.cols = piece(off[6]);
    t.means = piece(off[7]);
    t.fast = static_cast<int*>(piece(off[8]));
    t.scalars = static_cast<double*>(piece(off[9]));
  }

  const std::vector<int> stages = stage == 0 ? std::vector<int>{1, 2, 3} : std::vector<int>{stage};
  for (const int s : stages) {
    for (size_t i = 0; i < n; ++i) {
      const at::ScalarType st = state_types[i];
      bool launched = false;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "adafactor_cuda", [&] {
        using P = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "adafactor_cuda", [&] {
          if constexpr (std::is_same_v<at::opmath_type<P>, at::opmath_type<scalar_t>>) {
            launch_stage<P, scalar_t>(s, a, tensors[i], stream);
            launched = true;
          }
        });
      });
      TORCH_CHECK(launched, "adafactor_step_: no CUDA kernel for ", params[i].scalar_type(), " params with ", st,
                  " state");
    }
  }
}

}  // namespace torchopt_ext::kernels::cuda

// The functional layer validates and then picks the CUDA kernels for CUDA params.
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("adafactor_step_", &torchopt_ext::functional::adafactor_step_);
  m.impl("adafactor_stage_", &torchopt_ext::functional::adafactor_stage_);
}
