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
// An algorithm that needs a per-tensor norm first (MARS's clipped gradient
// correction) also defines
//
//     static constexpr bool kNeedsNorm = true;
//     template <typename S> static S norm_term(const Coeffs<S>&, S grad, const std::array<S, kNumState>& state);
//
// and a `norm` member in TensorScalars: a first pass sums norm_term^2 over the
// tensor (in double, in a fixed chunk order, so the result does not depend on
// the thread count) and stores the L2 norm there before `update` runs.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "kernels/cpu/elementwise_options.h"
#include "kernels/cpu/multi_tensor_apply.h"
#include "kernels/cpu/opmath_block.h"
#include "kernels/cpu/vec_math.h"

namespace torchopt_ext::kernels::cpu {

template <typename Algo, typename = void>
struct NeedsNorm : std::false_type {};
template <typename Algo>
struct NeedsNorm<Algo, std::void_t<decltype(Algo::kNeedsNorm)>> : std::bool_constant<Algo::kNeedsNorm> {};

template <typename Algo>
struct ElementwiseTask {
  void* param;
  void* grad;
  std::array<void*, Algo::kNumState> state;  // nullptr: this state is not used
  typename Algo::TensorScalars scalars;
  uint64_t rounding_stream;
};

template <typename Algo, typename P, typename St>
void elementwise_chunk(const ElementwiseTask<Algo>& task, const typename Algo::Hyper& hp,
                       const ElementwiseOptions& options, int64_t begin, int64_t end) {
  constexpr int N = Algo::kNumState;
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  const auto c = Algo::template coeffs<S>(hp, task.scalars);
  const S grad_scale = static_cast<S>(options.grad_scale.value_or(1.0));

  alignas(64) S param_buf[kBlockNumel];
  alignas(64) S grad_buf[kBlockNumel];
  alignas(64) S state_buf[N > 0 ? N : 1][kBlockNumel];
  for (int64_t b = begin; b < end; b += kBlockNumel) {
    const int64_t n = std::min(kBlockNumel, end - b);
    OpmathBlock<P> param(static_cast<P*>(task.param) + b, param_buf, n);
    OpmathBlock<P> grad(static_cast<P*>(task.grad) + b, grad_buf, n);
    std::array<std::optional<OpmathBlock<St>>, N> state;
    std::array<S*, N> s{};
    for (int k = 0; k < N; ++k) {
      if (task.state[k] != nullptr) {
        state[k].emplace(static_cast<St*>(task.state[k]) + b, state_buf[k], n);
        s[k] = state[k]->data();
      }
    }
    if (options.grad_scale) {
      unscale_grad_block(grad, grad_scale, n);
    }
    S* p = param.data();
    const S* g = grad.data();
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec pv = Vec::loadu(p + i);
      std::array<Vec, N> sv;
      for (int k = 0; k < N; ++k) {
        sv[k] = s[k] ? Vec::loadu(s[k] + i) : Vec(S(0));
      }
      Algo::update(c, pv, Vec::loadu(g + i), sv);
      pv.store(p + i);
      for (int k = 0; k < N; ++k) {
        if (s[k]) {
          sv[k].store(s[k] + i);
        }
      }
    }
    for (; i < n; ++i) {
      std::array<S, N> sv;
      for (int k = 0; k < N; ++k) {
        sv[k] = s[k] ? s[k][i] : S(0);
      }
      Algo::update(c, p[i], g[i], sv);
      for (int k = 0; k < N; ++k) {
        if (s[k]) {
          s[k][i] = sv[k];
        }
      }
    }
    if (options.stochastic_rounding) {
      param.store_stochastic(task.rounding_stream, b);
    } else {
      param.store();
    }
    for (auto& block : state) {
      if (block) {
        block->store();
      }
    }
  }
}

// First pass of a norm-needing Algo: sum of norm_term^2 over [begin, end).
// Reads only (grads are unscaled here in registers, not written back).
template <typename Algo, typename P, typename St>
double norm_sq_chunk(const ElementwiseTask<Algo>& task, const typename Algo::Hyper& hp,
                     const ElementwiseOptions& options, int64_t begin, int64_t end) {
  constexpr int N = Algo::kNumState;
  using S = at::opmath_type<P>;
  const auto c = Algo::template coeffs<S>(hp, task.scalars);
  const S grad_scale = static_cast<S>(options.grad_scale.value_or(1.0));
  double total = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    S grad = static_cast<S>(static_cast<const P*>(task.grad)[i]);
    if (options.grad_scale) {
      grad = grad / grad_scale;
    }
    std::array<S, N> state{};
    for (int k = 0; k < N; ++k) {
      if (task.state[k] != nullptr) {
        state[k] = static_cast<S>(static_cast<const St*>(task.state[k])[i]);
      }
    }
    const double term = static_cast<double>(Algo::template norm_term<S>(c, grad, state));
    total += term * term;
  }
  return total;
}

// Runs Algo over one param group. Tensors are contiguous; `state[k]` is
// either empty (state k unused) or has one tensor per param, all state of a
// param sharing one dtype; scalars[i] are tensor i's per-step values.
template <typename Algo>
void elementwise_step(const char* op, at::TensorList params, at::TensorList grads,
                      const std::array<at::TensorList, Algo::kNumState>& state,
                      const std::vector<typename Algo::TensorScalars>& scalars, const std::vector<double>& steps,
                      const typename Algo::Hyper& hp, const ElementwiseOptions& options) {
  using ChunkFn =
      void (*)(const ElementwiseTask<Algo>&, const typename Algo::Hyper&, const ElementwiseOptions&, int64_t, int64_t);
  const auto n = params.size();
  std::vector<ElementwiseTask<Algo>> tasks(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  std::vector<at::ScalarType> state_types(n);
  for (size_t i = 0; i < n; ++i) {
    auto& task = tasks[i];
    task.param = params[i].data_ptr();
    task.grad = grads[i].data_ptr();
    at::ScalarType state_type = params[i].scalar_type();
    for (int k = 0; k < Algo::kNumState; ++k) {
      task.state[k] = state[k].empty() ? nullptr : state[k][i].data_ptr();
      if (!state[k].empty()) {
        state_type = state[k][i].scalar_type();
      }
    }
    state_types[i] = state_type;
    task.scalars = scalars[i];
    task.rounding_stream = rounding_stream(options.seed, static_cast<int64_t>(i), steps[i]);
    fns[i] = select_kernel(op, params[i].scalar_type(), state_type,
                           [](auto p, auto s) { return &elementwise_chunk<Algo, decltype(p), decltype(s)>; });
    numels[i] = params[i].numel();
  }
  if constexpr (NeedsNorm<Algo>::value) {
    using NormFn = double (*)(const ElementwiseTask<Algo>&, const typename Algo::Hyper&, const ElementwiseOptions&,
                              int64_t, int64_t);
    std::vector<NormFn> norm_fns(n);
    for (size_t i = 0; i < n; ++i) {
      norm_fns[i] = select_kernel(op, params[i].scalar_type(), state_types[i],
                                  [](auto p, auto s) { return &norm_sq_chunk<Algo, decltype(p), decltype(s)>; });
    }
    const auto chunks = split_into_chunks(numels);
    std::vector<double> partial(chunks.size(), 0.0);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const auto& chunk = chunks[c];
        partial[c] = norm_fns[chunk.tensor](tasks[chunk.tensor], hp, options, chunk.begin, chunk.end);
      }
    });
    std::vector<double> sums(n, 0.0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      sums[chunks[c].tensor] += partial[c];
    }
    for (size_t i = 0; i < n; ++i) {
      tasks[i].scalars.norm = std::sqrt(sums[i]);
    }
  }
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t end) { fns[t](tasks[t], hp, options, begin, end); });
}

}  // namespace torchopt_ext::kernels::cpu
