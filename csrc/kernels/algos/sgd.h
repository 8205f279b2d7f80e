// SGD per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/sgd.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::SGDHyperparams;

struct SGDAlgo {
  static constexpr int kNumState = 1;  // momentum_buffer (absent when momentum == 0)
  using Hyper = SGDHyperparams;
  struct TensorScalars {
    double step;
  };

  template <typename S>
  struct Coeffs {
    S neg_lr;
    S momentum;
    S one_minus_dampening;
    S weight_decay;
    bool has_momentum;
    bool first_step;  // the buffer starts as a copy of the gradient
    bool nesterov;
    bool maximize;
    bool has_weight_decay;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    return {static_cast<S>(-hp.lr),
            static_cast<S>(hp.momentum),
            static_cast<S>(1.0 - hp.dampening),
            static_cast<S>(hp.weight_decay),
            hp.momentum != 0.0,
            t.step == 1.0,
            hp.nesterov,
            hp.maximize,
            hp.weight_decay != 0.0};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& buffer = state[0];
    if (c.maximize) {
      grad = vneg(grad);
    }
    if (c.has_weight_decay) {
      grad = grad + V(c.weight_decay) * param;
    }
    if (c.has_momentum) {
      buffer = c.first_step ? grad : buffer * V(c.momentum) + V(c.one_minus_dampening) * grad;
      grad = c.nesterov ? grad + V(c.momentum) * buffer : buffer;
    }
    param = param + V(c.neg_lr) * grad;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
