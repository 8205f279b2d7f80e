// Element-wise helpers that read the same for at::vec::Vectorized<T> (CPU
// lanes) and for plain float/double, on the host and in CUDA device code, so
// each optimizer writes its per-element math once (kernels/algos/<algo>.h)
// and the CPU vector body, the CPU scalar tail and the CUDA kernels all run it.
//
// The Vectorized branches are only instantiated by the CPU kernels; they name
// at::vec functions unqualified (found by argument-dependent lookup), so this
// header does not need ATen's CPU vector headers and nvcc never parses them.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

// The algorithm structs and these helpers are compiled by the host compiler
// (with the CPU kernels' ISA flags) and by nvcc: separate inline namespaces keep
// the two builds of the same inline function from being merged by the linker
// (nor with the CPU tests' build of the CUDA sources, tests/cpp/cuda_emulation).
#if defined(__CUDACC__)
#define TORCHOPT_EXT_ALGO_ABI cuda_abi
#elif defined(TORCHOPT_EXT_CUDA_EMULATION)
#define TORCHOPT_EXT_ALGO_ABI emulation_abi
#else
#define TORCHOPT_EXT_ALGO_ABI host_abi
#endif

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

template <typename V>
C10_HOST_DEVICE inline V vsqrt(const V& x) {
  if constexpr (std::is_floating_point_v<V>) {
#if defined(__CUDA_ARCH__)
    return ::sqrt(x);
#else
    return std::sqrt(x);
#endif
  } else {
    return x.sqrt();
  }
}

template <typename V>
C10_HOST_DEVICE inline V vneg(const V& x) {
  if constexpr (std::is_floating_point_v<V>) {
    return -x;
  } else {
    return x.neg();
  }
}

template <typename S>
C10_HOST_DEVICE inline bool is_nan(S x) {
#if defined(__CUDA_ARCH__)
  return ::isnan(x);
#else
  return std::isnan(x);
#endif
}

// torch.sign on real values: -1, 0 or 1, and 0 for NaN.
template <typename V>
C10_HOST_DEVICE inline V vsign(const V& x) {
  if constexpr (std::is_floating_point_v<V>) {
    return x > V(0) ? V(1) : (x < V(0) ? V(-1) : V(0));
  } else {
    const V zero(0);
    const V one(1);
    return (one & (x > zero)) - (one & (x < zero));
  }
}

// NaN-propagating maximum (torch.maximum semantics).
template <typename V>
C10_HOST_DEVICE inline V vmaximum(const V& a, const V& b) {
  if constexpr (std::is_floating_point_v<V>) {
    if (is_nan(a) || is_nan(b)) {
      return a + b;
    }
    return a > b ? a : b;
  } else {
    return maximum(a, b);  // at::vec::maximum, by ADL
  }
}

// NaN-propagating minimum (torch.minimum semantics).
template <typename V>
C10_HOST_DEVICE inline V vminimum(const V& a, const V& b) {
  if constexpr (std::is_floating_point_v<V>) {
    if (is_nan(a) || is_nan(b)) {
      return a + b;
    }
    return a < b ? a : b;
  } else {
    return minimum(a, b);  // at::vec::minimum, by ADL
  }
}

// torch.lerp's formula: the branch on the weight is taken once per call site
// (the weight is a hyperparameter), not per element.
template <typename V, typename S>
C10_HOST_DEVICE inline V vlerp(const V& start, const V& end, S weight) {
  const S magnitude = weight < S(0) ? -weight : weight;  // std::abs, usable in device code
  if (magnitude < S(0.5)) {
    return start + V(weight) * (end - start);
  }
  return end - (end - start) * V(S(1) - weight);
}

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
