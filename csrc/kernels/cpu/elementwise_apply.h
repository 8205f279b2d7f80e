// The fused loop every element-wise optimizer shares. An algorithm supplies
// only its math:
//
//   struct MyAlgo {
//     static constexpr int kNumState = ...;        // state tensors per param
//     struct Hyper { ... };                        // group hyperparameters
//     struct TensorScalars { ... };                // per-tensor values (step, ...)
//     template <typename S> struct Coeffs { ... };  // constants in the math type
//     template <typename S> static Coeffs<S> coeffs(const Hyper&, const TensorScalars&);
//     template <typename V, typename S>
//     static void update(const Coeffs<S>&, V& param, V grad, std::array<V, kNumState>& state);
//   };
//
// and this header runs `update` over every element of every tensor of a param
// group: chunks spread over threads, reduced-precision storage widened in
// L1-sized blocks, Vectorized lanes then a scalar tail, GradScaler unscaling
// and optional stochastic rounding of bf16 params.
//
// An algorithm that needs per-tensor L2 norms first (MARS's clipped gradient
// correction, LAMB's trust ratio) also defines
//
//     static constexpr int kNumNorms = K;
//     template <typename V, typename S>
//     static std::array<V, K> norm_terms(const Coeffs<S>&, V param, V grad, const std::array<V, kNumState>& state);
//
// and `std::array<double, K> norms` in TensorScalars: a read-only first pass
// sums each term squared over the tensor (runs of lanes, then double, in a
// fixed chunk order, so the result does not depend on the thread count), stores the norms there and
// recomputes the coefficients before `update` runs. It may also define
//
//     static void after_norms(const Hyper&, TensorScalars&);
//
// run once per tensor, on the calling thread, between the two passes: per-tensor
// values derived from the norms (Magma's score and mask multiplier) are
// computed there once instead of in every chunk's `coeffs`.
//
// An algorithm that only reads some state (Sophia's Hessian estimate) sets
// bit k of `static constexpr unsigned kReadOnlyState` for state k: it is
// loaded but never stored back.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cpu/elementwise_options.h"
#include "kernels/cpu/multi_tensor_apply.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cpu/vec_math.h"

namespace torchopt_ext::kernels::cpu {

template <typename Algo, typename = void>
struct NumNorms : std::integral_constant<int, 0> {};
template <typename Algo>
struct NumNorms<Algo, std::void_t<decltype(Algo::kNumNorms)>> : std::integral_constant<int, Algo::kNumNorms> {};

template <typename Algo, typename = void>
struct HasAfterNorms : std::false_type {};
template <typename Algo>
struct HasAfterNorms<Algo, std::void_t<decltype(Algo::after_norms(std::declval<const typename Algo::Hyper&>(),
                                                                  std::declval<typename Algo::TensorScalars&>()))>>
    : std::true_type {};

template <typename Algo, typename = void>
struct ReadOnlyState : std::integral_constant<unsigned, 0u> {};
template <typename Algo>
struct ReadOnlyState<Algo, std::void_t<decltype(Algo::kReadOnlyState)>>
    : std::integral_constant<unsigned, Algo::kReadOnlyState> {};

template <typename Algo>
constexpr bool stores_state(int k) {
  return ((ReadOnlyState<Algo>::value >> k) & 1u) == 0u;
}

template <typename Algo>
struct ElementwiseTask {
  void* param;
  void* grad;
  std::array<void*, Algo::kNumState> state;  // nullptr: this state is not used
  typename Algo::TensorScalars scalars;
  uint64_t rounding_stream;
};

// Two math-type vectors' worth of elements straight from storage of type T:
// fp32/fp64 load as they are, bf16/fp16 widen one Vectorized<T> into two
// Vectorized<float> (no staging buffer: the loop stays memory-bound).
template <typename T>
struct LaneIO {
  using S = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<S>;
  static constexpr int64_t kWidth = 2 * Vec::size();
  static constexpr bool kReduced = !std::is_same_v<T, S>;

  static void load(const T* src, Vec& low, Vec& high) {
    if constexpr (kReduced) {
      std::tie(low, high) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src));
    } else {
      low = Vec::loadu(src);
      high = Vec::loadu(src + Vec::size());
    }
  }

  static void store(T* dst, const Vec& low, const Vec& high) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(low, high).store(dst);
    } else {
      low.store(dst);
      high.store(dst + Vec::size());
    }
  }
};

template <typename Algo, typename P, typename St>
void elementwise_chunk(const ElementwiseTask<Algo>& task, const typename Algo::Hyper& hp,
                       const ElementwiseOptions& options, int64_t begin, int64_t end) {
  constexpr int N = Algo::kNumState;
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  using ParamIO = LaneIO<P>;
  using StateIO = LaneIO<St>;
  static_assert(ParamIO::kWidth == StateIO::kWidth, "param and state storage must share the math type");
  constexpr int64_t kWidth = ParamIO::kWidth;
  const auto c = Algo::template coeffs<S>(hp, task.scalars);
  const S grad_scale = static_cast<S>(options.grad_scale.value_or(1.0));
  P* param = static_cast<P*>(task.param);
  P* grad = static_cast<P*>(task.grad);
  std::array<St*, N> state{};
  for (int k = 0; k < N; ++k) {
    state[k] = static_cast<St*>(task.state[k]);
  }

  // Vector body: kWidth elements per iteration, two math-type vectors each.
  int64_t i = begin;
  for (; i + kWidth <= end; i += kWidth) {
    Vec p[2], g[2];
    std::array<Vec, N> s[2];
    ParamIO::load(param + i, p[0], p[1]);
    ParamIO::load(grad + i, g[0], g[1]);
    if (options.grad_scale) {
      g[0] = g[0] / Vec(grad_scale);
      g[1] = g[1] / Vec(grad_scale);
      ParamIO::store(grad + i, g[0], g[1]);  // GradScaler: write the unscaled grads back
    }
    for (int k = 0; k < N; ++k) {
      if (state[k]) {
        StateIO::load(state[k] + i, s[0][k], s[1][k]);
      } else {
        s[0][k] = s[1][k] = Vec(S(0));
      }
    }
    Algo::update(c, p[0], g[0], s[0]);
    Algo::update(c, p[1], g[1], s[1]);
    if (options.stochastic_rounding && ParamIO::kReduced) {
      alignas(64) S values[kWidth];
      p[0].store(values);
      p[1].store(values + Vec::size());
      store_stochastic(param + i, values, kWidth, task.rounding_stream, i);
    } else {
      ParamIO::store(param + i, p[0], p[1]);
    }
    for (int k = 0; k < N; ++k) {
      if (state[k] && stores_state<Algo>(k)) {
        StateIO::store(state[k] + i, s[0][k], s[1][k]);
      }
    }
  }
  // Scalar tail.
  for (; i < end; ++i) {
    S p = static_cast<S>(param[i]);
    S g = static_cast<S>(grad[i]);
    if (options.grad_scale) {
      g = g / grad_scale;
      grad[i] = static_cast<P>(g);
    }
    std::array<S, N> s;
    for (int k = 0; k < N; ++k) {
      s[k] = state[k] ? static_cast<S>(state[k][i]) : S(0);
    }
    Algo::update(c, p, g, s);
    if (options.stochastic_rounding && ParamIO::kReduced) {
      store_stochastic(param + i, &p, 1, task.rounding_stream, i);
    } else {
      param[i] = static_cast<P>(p);
    }
    for (int k = 0; k < N; ++k) {
      if (state[k] && stores_state<Algo>(k)) {
        state[k][i] = static_cast<St>(s[k]);
      }
    }
  }
}

// First pass of a norm-needing Algo: per-norm sums of squared terms over
// [begin, end). Reads only (grads are unscaled in registers, not written back).
// Lanes accumulate in the math type over short runs that are then added in
// double, in a fixed order: vector speed, and the same sums on every run.
template <typename Algo, typename P, typename St>
std::array<double, NumNorms<Algo>::value> norm_sq_chunk(const ElementwiseTask<Algo>& task,
                                                        const typename Algo::Hyper& hp,
                                                        const ElementwiseOptions& options, int64_t begin, int64_t end) {
  constexpr int N = Algo::kNumState;
  constexpr int K = NumNorms<Algo>::value;
  constexpr int64_t kRun = 1024;  // elements per math-type partial sum
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  using ParamIO = LaneIO<P>;
  using StateIO = LaneIO<St>;
  constexpr int64_t kWidth = ParamIO::kWidth;
  const auto c = Algo::template coeffs<S>(hp, task.scalars);
  const S grad_scale = static_cast<S>(options.grad_scale.value_or(1.0));
  const P* param = static_cast<const P*>(task.param);
  const P* grad = static_cast<const P*>(task.grad);
  std::array<const St*, N> state{};
  for (int k = 0; k < N; ++k) {
    state[k] = static_cast<const St*>(task.state[k]);
  }
  std::array<double, K> totals{};
  int64_t i = begin;
  while (i + kWidth <= end) {
    std::array<Vec, K> acc;
    acc.fill(Vec(S(0)));
    const int64_t run_end = std::min(end, i + kRun);
    for (; i + kWidth <= run_end; i += kWidth) {
      Vec p[2], g[2];
      std::array<Vec, N> s[2];
      ParamIO::load(param + i, p[0], p[1]);
      ParamIO::load(grad + i, g[0], g[1]);
      if (options.grad_scale) {
        g[0] = g[0] / Vec(grad_scale);
        g[1] = g[1] / Vec(grad_scale);
      }
      for (int k = 0; k < N; ++k) {
        if (state[k]) {
          StateIO::load(state[k] + i, s[0][k], s[1][k]);
        } else {
          s[0][k] = s[1][k] = Vec(S(0));
        }
      }
      for (int half = 0; half < 2; ++half) {
        const auto terms = Algo::norm_terms(c, p[half], g[half], s[half]);
        for (int k = 0; k < K; ++k) {
          acc[k] = acc[k] + terms[k] * terms[k];
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      alignas(64) S lanes[Vec::size()];
      acc[k].store(lanes);
      for (int64_t l = 0; l < Vec::size(); ++l) {
        totals[k] += static_cast<double>(lanes[l]);
      }
    }
  }
  for (; i < end; ++i) {
    S g = static_cast<S>(grad[i]);
    if (options.grad_scale) {
      g = g / grad_scale;
    }
    std::array<S, N> s{};
    for (int k = 0; k < N; ++k) {
      if (state[k]) {
        s[k] = static_cast<S>(state[k][i]);
      }
    }
    const auto terms = Algo::norm_terms(c, static_cast<S>(param[i]), g, s);
    for (int k = 0; k < K; ++k) {
      totals[k] += static_cast<double>(terms[k]) * static_cast<double>(terms[k]);
    }
  }
  return totals;
}

// The per-tensor state of one call: tasks (pointers, scalars, rounding
// stream), element counts and state dtypes.
template <typename Algo>
struct ElementwiseTasks {
  std::vector<ElementwiseTask<Algo>> tasks;
  std::vector<int64_t> numels;
  std::vector<at::ScalarType> state_types;
};

template <typename Algo>
ElementwiseTasks<Algo> make_tasks(at::TensorList params, at::TensorList grads,
                                  const std::array<at::TensorList, Algo::kNumState>& state,
                                  const std::vector<typename Algo::TensorScalars>& scalars,
                                  const std::vector<double>& steps, const ElementwiseOptions& options) {
  const auto n = params.size();
  ElementwiseTasks<Algo> out;
  out.tasks.resize(n);
  out.numels.resize(n);
  out.state_types.resize(n);
  for (size_t i = 0; i < n; ++i) {
    auto& task = out.tasks[i];
    task.param = params[i].data_ptr();
    task.grad = grads[i].data_ptr();
    at::ScalarType state_type = params[i].scalar_type();
    for (int k = 0; k < Algo::kNumState; ++k) {
      task.state[k] = state[k].empty() ? nullptr : state[k][i].data_ptr();
      if (!state[k].empty()) {
        state_type = state[k][i].scalar_type();
      }
    }
    out.state_types[i] = state_type;
    task.scalars = scalars[i];
    task.rounding_stream = rounding_stream(options.seed, static_cast<int64_t>(i), steps[i]);
    out.numels[i] = params[i].numel();
  }
  return out;
}

// The read-only first pass of a norm-needing Algo: each tensor's sums of
// squared norm terms (not yet square-rooted), row-major n x K.
template <typename Algo>
std::vector<double> norm_sq_pass(const char* op, at::TensorList params, const ElementwiseTasks<Algo>& work,
                                 const typename Algo::Hyper& hp, const ElementwiseOptions& options) {
  constexpr int K = NumNorms<Algo>::value;
  using NormFn = std::array<double, K> (*)(const ElementwiseTask<Algo>&, const typename Algo::Hyper&,
                                           const ElementwiseOptions&, int64_t, int64_t);
  const auto n = params.size();
  std::vector<NormFn> norm_fns(n);
  for (size_t i = 0; i < n; ++i) {
    norm_fns[i] = select_kernel(op, params[i].scalar_type(), work.state_types[i],
                                [](auto p, auto s) { return &norm_sq_chunk<Algo, decltype(p), decltype(s)>; });
  }
  const auto chunks = split_into_chunks(work.numels);
  std::vector<std::array<double, K>> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const auto& chunk = chunks[c];
      partial[c] = norm_fns[chunk.tensor](work.tasks[chunk.tensor], hp, options, chunk.begin, chunk.end);
    }
  });
  // Chunks are summed in their fixed order: the same sums for any thread count.
  std::vector<double> sums(n * K, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int k = 0; k < K; ++k) {
      sums[chunks[c].tensor * K + k] += partial[c][k];
    }
  }
  return sums;
}

// Runs Algo over one param group. Tensors are contiguous; `state[k]` is
// either empty (state k unused) or has one tensor per param, all state of a
// param sharing one dtype; scalars[i] are tensor i's per-step values.
// For a norm-needing Algo, `norm_sqs` (n x K, row-major) may hold the squared
// norms already (computed by elementwise_norm_sqs and reduced across the
// shards of each tensor by the caller); then the first pass is skipped.
template <typename Algo>
void elementwise_step(const char* op, at::TensorList params, at::TensorList grads,
                      const std::array<at::TensorList, Algo::kNumState>& state,
                      const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                      const typename Algo::Hyper& hp, const ElementwiseOptions& options,
                      const double* norm_sqs = nullptr) {
  using ChunkFn =
      void (*)(const ElementwiseTask<Algo>&, const typename Algo::Hyper&, const ElementwiseOptions&, int64_t, int64_t);
  const auto n = params.size();
  auto work = make_tasks<Algo>(params, grads, state, scalars, steps, options);
  std::vector<ChunkFn> fns(n);
  for (size_t i = 0; i < n; ++i) {
    fns[i] = select_kernel(op, params[i].scalar_type(), work.state_types[i],
                           [](auto p, auto s) { return &elementwise_chunk<Algo, decltype(p), decltype(s)>; });
  }
  if constexpr (NumNorms<Algo>::value > 0) {
    constexpr int K = NumNorms<Algo>::value;
    std::vector<double> computed;
    if (norm_sqs == nullptr) {
      computed = norm_sq_pass<Algo>(op, params, work, hp, options);
      norm_sqs = computed.data();
    }
    for (size_t i = 0; i < n; ++i) {
      for (int k = 0; k < K; ++k) {
        work.tasks[i].scalars.norms[k] = std::sqrt(norm_sqs[i * K + k]);
      }
      if constexpr (HasAfterNorms<Algo>::value) {
        Algo::after_norms(hp, work.tasks[i].scalars);
      }
    }
  }
  const auto& tasks = work.tasks;
  for_each_chunk(work.numels,
                 [&](int64_t t, int64_t begin, int64_t end) { fns[t](tasks[t], hp, options, begin, end); });
}

// The first pass alone: each tensor's sums of squared norm terms (n x K,
// row-major), with `steps` the values the step will run at. Nothing is
// written. A sharded caller sums these over the shards of each tensor and
// passes them to elementwise_step.
template <typename Algo>
std::vector<double> elementwise_norm_sqs(const char* op, at::TensorList params, at::TensorList grads,
                                         const std::array<at::TensorList, Algo::kNumState>& state,
                                         const std::vector<typename Algo::TensorScalars>& scalars,
                                         const std::vector<double>& steps, const typename Algo::Hyper& hp,
                                         const ElementwiseOptions& options) {
  static_assert(NumNorms<Algo>::value > 0, "elementwise_norm_sqs needs an Algo with kNumNorms");
  const auto work = make_tasks<Algo>(params, grads, state, scalars, steps, options);
  return norm_sq_pass<Algo>(op, params, work, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
