// Lion per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/lion.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::LionHyperparams;

struct LionAlgo {
  static constexpr int kNumState = 1;  // exp_avg
  using Hyper = LionHyperparams;
  struct TensorScalars {};

  template <typename S>
  struct Coeffs {
    S decay_factor;  // 1 - lr * weight_decay
    S beta1;
    S one_minus_beta1;
    S beta2;
    S one_minus_beta2;
    S neg_lr;
    bool maximize;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars&) {
    return {static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(hp.beta1),
            static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(-hp.lr),
            hp.maximize};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& exp_avg = state[0];
    if (c.maximize) {
      grad = vneg(grad);
    }
    param = param * V(c.decay_factor);
    const V direction = vsign(exp_avg * V(c.beta1) + V(c.one_minus_beta1) * grad);
    param = param + V(c.neg_lr) * direction;
    exp_avg = exp_avg * V(c.beta2) + V(c.one_minus_beta2) * grad;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
