// Magma on Adam/AdamW (rollfast.md §5): the per-element and per-tensor math
// shared by the CPU kernel (kernels/cpu/adam.cpp) and the CUDA kernels
// (kernels/cuda/adam_magma.cu), so both compute the same norms, scores and
// keep/drop draws.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <cstdint>

#include "kernels/algos/adam.h"
#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/stochastic_rounding.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

// The Bernoulli(p) draw of tensor `tensor_index` at step `step`: a
// counter-based hash of (seed, tensor, step) (common::magma_keep).
C10_HOST_DEVICE inline bool magma_keep_draw(int64_t seed, int64_t tensor_index, double step, double p) {
  constexpr uint64_t kMagmaSalt = 0x4D41474D415F5A00ULL;  // "MAGMA_Z": independent of the rounding stream
  const uint64_t bits = cpu::mix64(cpu::mix64(static_cast<uint64_t>(seed) ^ kMagmaSalt) ^
                                   cpu::mix64(static_cast<uint64_t>(tensor_index) << 32) ^ static_cast<uint64_t>(step));
  const double uniform = static_cast<double>(bits >> 11) * 0x1.0p-53;  // [0, 1)
  return uniform < p;
}

// The new fp32 score from |g|, |m| and |g - m| of one tensor:
// <g, m> = (|g|^2 + |m|^2 - |g - m|^2) / 2, cos = <g, m> / max(|g| |m|, 1e-12)
// (NaN -> 0, clipped to [-1, 1]), s <- 0.9 s + 0.1 sigmoid(cos / tau), the
// EMA evaluated in double and rounded once (no dependence on FMA contraction).
C10_HOST_DEVICE inline float magma_score_from_norms(double g_norm, double m_norm, double diff_norm, float score,
                                                    double tau) {
  const double dot = 0.5 * (g_norm * g_norm + m_norm * m_norm - diff_norm * diff_norm);
  const double denom = g_norm * m_norm;
  double cosine = dot / (denom < 1e-12 ? 1e-12 : denom);  // std::max(denom, 1e-12)
  if (is_nan(cosine)) {
    cosine = 0.0;  // nan_to_num; +-inf clip to +-1 below
  }
  cosine = cosine < -1.0 ? -1.0 : (1.0 < cosine ? 1.0 : cosine);  // std::clamp(cosine, -1, 1)
  const double smoothed = 1.0 / (1.0 + ::exp(-cosine / tau));
  return static_cast<float>(0.9 * static_cast<double>(score) + 0.1 * smoothed);
}

// Adam/AdamW whose whole update, decoupled decay included, is scaled by a
// per-tensor multiplier (z * s); the moments update as usual.
struct AdamMaskedAlgo {
  static constexpr int kNumState = AdamAlgo::kNumState;
  // |g|, |m|, |g - m| per tensor: the dot product rides a sum-of-squares pass.
  static constexpr int kNumNorms = 3;
  using Hyper = AdamHyperparams;
  struct TensorScalars {
    double step;
    double multiplier;  // keep * new score
  };
  template <typename S>
  using Coeffs = AdamAlgo::Coeffs<S>;

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    auto c = AdamAlgo::coeffs<S>(hp, {t.step});
    // The decoupled decay is part of the masked update (rollfast folds the
    // decay into the update before masking), so it is scaled too.
    const double bias_correction1 = 1.0 - std::pow(hp.beta1, t.step);
    c.decay_factor = static_cast<S>(1.0 - hp.lr * hp.weight_decay * t.multiplier);
    c.neg_step_size = static_cast<S>(-(hp.lr / bias_correction1) * t.multiplier);
    return c;
  }

  // Read-only pass: g (negated with maximize) and the moment this step will
  // store, from a copy of the state.
  template <typename V, typename S>
  C10_HOST_DEVICE static std::array<V, kNumNorms> norm_terms(const Coeffs<S>& c, V param, V grad,
                                                             const std::array<V, kNumState>& state) {
    std::array<V, kNumState> next = state;
    const V g = c.maximize ? vneg(grad) : grad;
    AdamAlgo::update(c, param, grad, next);
    return {g, next[0], g - next[0]};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    AdamAlgo::update(c, param, grad, state);
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
