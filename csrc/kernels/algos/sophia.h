// Sophia per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/sophia.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::SophiaHyperparams;

struct SophiaAlgo {
  static constexpr int kNumState = 2;            // exp_avg, hessian
  static constexpr unsigned kReadOnlyState = 2;  // the hessian (state 1) is only read
  using Hyper = SophiaHyperparams;
  struct TensorScalars {};

  template <typename S>
  struct Coeffs {
    S decay_factor;  // 1 - lr * weight_decay
    S beta1;
    S one_minus_beta1;
    S gamma;
    S eps;
    S neg_lr;
    bool eps_add;
    bool maximize;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars&) {
    return {static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(hp.beta1),
            static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.gamma),
            static_cast<S>(hp.eps),
            static_cast<S>(-hp.lr),
            hp.eps_add,
            hp.maximize};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& exp_avg = state[0];
    const V& hessian = state[1];
    if (c.maximize) {
      grad = vneg(grad);
    }
    param = param * V(c.decay_factor);
    exp_avg = exp_avg * V(c.beta1) + V(c.one_minus_beta1) * grad;
    const V scaled = V(c.gamma) * hessian;
    const V denom = c.eps_add ? scaled + V(c.eps) : vmaximum(scaled, V(c.eps));
    // clip(m / denom, -1, 1); NaN stays NaN as in torch.clamp.
    const V ratio = vminimum(vmaximum(exp_avg / denom, V(S(-1))), V(S(1)));
    param = param + V(c.neg_lr) * ratio;
  }
};

struct HessianEmaAlgo {
  static constexpr int kNumState = 0;
  struct Hyper {
    double beta2;
  };
  struct TensorScalars {};

  template <typename S>
  struct Coeffs {
    S beta2;
    S one_minus_beta2;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars&) {
    return {static_cast<S>(hp.beta2), static_cast<S>(1.0 - hp.beta2)};
  }

  // Runs with the Hessian in the param slot and the estimate in the grad slot.
  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& hessian, V estimate, std::array<V, kNumState>&) {
    hessian = hessian * V(c.beta2) + V(c.one_minus_beta2) * estimate;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
