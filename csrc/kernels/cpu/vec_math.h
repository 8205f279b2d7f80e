// Elementwise helpers that read the same for at::vec::Vectorized<T> and for
// plain scalars, so each optimizer writes its per-element math once and runs
// it on full vectors and on the scalar tail of a block.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>

namespace torchopt_ext::kernels::cpu {

template <typename V>
inline V vsqrt(const V& x) {
  if constexpr (std::is_floating_point_v<V>) {
    return std::sqrt(x);
  } else {
    return x.sqrt();
  }
}

template <typename V>
inline V vneg(const V& x) {
  if constexpr (std::is_floating_point_v<V>) {
    return -x;
  } else {
    return x.neg();
  }
}

// torch.sign on real values: -1, 0 or 1, and 0 for NaN.
template <typename V>
inline V vsign(const V& x) {
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
inline V vmaximum(const V& a, const V& b) {
  if constexpr (std::is_floating_point_v<V>) {
    if (std::isnan(a) || std::isnan(b)) {
      return a + b;
    }
    return a > b ? a : b;
  } else {
    return at::vec::maximum(a, b);
  }
}

// torch.lerp's formula: the branch on the weight is taken once per call site
// (the weight is a hyperparameter), not per element.
template <typename V, typename S>
inline V vlerp(const V& start, const V& end, S weight) {
  if (std::abs(weight) < S(0.5)) {
    return start + V(weight) * (end - start);
  }
  return end - (end - start) * V(S(1) - weight);
}

}  // namespace torchopt_ext::kernels::cpu
