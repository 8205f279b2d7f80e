// LAMB per-element math (the Algo of kernels/cpu/elementwise_apply.h, timm's
// Lamb operation order, classic.md §7), shared by the CPU kernel and the CUDA
// launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/lamb.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::LAMBHyperparams;

struct LAMBAlgo {
  static constexpr int kNumState = 2;  // exp_avg, exp_avg_sq
  static constexpr int kNumNorms = 2;  // ||theta|| (after decoupled decay), ||r||
  using Hyper = LAMBHyperparams;
  struct TensorScalars {
    double step;
    std::array<double, kNumNorms> norms;
  };

  template <typename S>
  struct Coeffs {
    S grad_divisor;
    S beta1;
    S grad_weight;  // 1 - beta1 with grad averaging, else 1
    S beta2;
    S one_minus_beta2;
    S bias_correction1;
    S bias_correction2_sqrt;
    S eps;
    S weight_decay;
    S decay_factor;  // 1 - lr * weight_decay (decoupled)
    S trust_ratio;
    S neg_lr;
    bool clip_grads;
    bool coupled_decay;
    bool decoupled_decay;
    bool maximize;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    const bool decay = hp.weight_decay != 0.0;
    const double bias_correction1 = hp.bias_correction ? 1.0 - std::pow(hp.beta1, t.step) : 1.0;
    const double bias_correction2 = hp.bias_correction ? 1.0 - std::pow(hp.beta2, t.step) : 1.0;
    double trust_ratio = 1.0;
    if (decay || hp.always_adapt) {
      const double weight_norm = t.norms[0];
      const double update_norm = t.norms[1];
      if (weight_norm > 0.0 && update_norm > 0.0) {
        // Rounded to the math type first, as timm divides the two norm tensors.
        trust_ratio = static_cast<double>(static_cast<S>(weight_norm) / static_cast<S>(update_norm));
      }
      if (hp.trust_clip && trust_ratio > 1.0) {
        trust_ratio = 1.0;
      }
    }
    double grad_divisor = hp.grad_divisor;
#if defined(__CUDA_ARCH__)
    if (hp.device_grad_divisor != nullptr) {
      grad_divisor = *hp.device_grad_divisor;
    }
#endif
    return {static_cast<S>(grad_divisor),
            static_cast<S>(hp.beta1),
            static_cast<S>(hp.grad_averaging ? 1.0 - hp.beta1 : 1.0),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(bias_correction1),
            static_cast<S>(std::sqrt(bias_correction2)),
            static_cast<S>(hp.eps),
            static_cast<S>(hp.weight_decay),
            static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(trust_ratio),
            static_cast<S>(-hp.lr),
            grad_divisor != 1.0,
            decay && !hp.decoupled_decay,
            decay && hp.decoupled_decay,
            hp.maximize};
  }

  // The moments after this step, the decayed param and the update direction
  // r, shared by the norm pass (read-only) and the update pass.
  template <typename V, typename S>
  C10_HOST_DEVICE static void direction(const Coeffs<S>& c, V& param, V grad, V& exp_avg, V& exp_avg_sq, V& r) {
    if (c.maximize) {
      grad = vneg(grad);
    }
    if (c.clip_grads) {
      grad = grad / V(c.grad_divisor);
    }
    exp_avg = exp_avg * V(c.beta1) + V(c.grad_weight) * grad;
    exp_avg_sq = exp_avg_sq * V(c.beta2) + V(c.one_minus_beta2) * grad * grad;
    const V denom = vsqrt(exp_avg_sq) / V(c.bias_correction2_sqrt) + V(c.eps);
    r = exp_avg / V(c.bias_correction1) / denom;
    if (c.decoupled_decay) {
      param = param * V(c.decay_factor);
    } else if (c.coupled_decay) {
      r = r + V(c.weight_decay) * param;
    }
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static std::array<V, kNumNorms> norm_terms(const Coeffs<S>& c, V param, V grad,
                                                             const std::array<V, kNumState>& state) {
    V exp_avg = state[0];
    V exp_avg_sq = state[1];
    V r;
    direction(c, param, grad, exp_avg, exp_avg_sq, r);
    return {param, r};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    V r;
    direction(c, param, grad, state[0], state[1], r);
    param = param + V(c.neg_lr) * (r * V(c.trust_ratio));
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
