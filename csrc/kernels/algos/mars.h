// MARS per-element math (the Algo of
// kernels/cpu/elementwise_apply.h, the official implementation's formulas,
// classic.md §13), shared by the CPU kernel and the CUDA launcher so both run
// the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/mars.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::MARSHyperparams;

struct MARSAlgo {
  static constexpr int kNumState = 4;  // exp_avg, exp_avg_sq, max_exp_avg_sq, last_grad
  static constexpr int kNumNorms = 1;  // ||c||
  using Hyper = MARSHyperparams;
  struct TensorScalars {
    double step;
    std::array<double, kNumNorms> norms;  // ||c||, filled in by the norm pass
  };

  template <typename S>
  struct Coeffs {
    S correction;  // gamma * beta1 / (1 - beta1)
    S beta1;
    S one_minus_beta1;
    S beta2;
    S one_minus_beta2;
    S bias_correction1;
    S bias_correction2_sqrt;
    S eps;
    S weight_decay;
    S neg_lr;
    S norm;
    bool clip;  // ||c|| > 1
    bool lion;
    bool amsgrad;
    bool maximize;
    bool momentum_only;
    bool is_approx;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    return {static_cast<S>(hp.gamma * hp.beta1 / (1.0 - hp.beta1)),
            static_cast<S>(hp.beta1),
            static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(1.0 - std::pow(hp.beta1, t.step)),
            static_cast<S>(std::sqrt(1.0 - std::pow(hp.beta2, t.step))),
            static_cast<S>(hp.eps),
            static_cast<S>(hp.weight_decay),
            static_cast<S>(-hp.lr),
            static_cast<S>(t.norms[0]),
            t.norms[0] > 1.0,
            hp.lion,
            hp.amsgrad,
            hp.maximize,
            hp.momentum_only,
            hp.is_approx};
  }

  // The variance-reduced gradient before clipping.
  template <typename V, typename S>
  C10_HOST_DEVICE static V corrected_grad(const Coeffs<S>& c, const V& grad, const V& last_grad) {
    return grad + V(c.correction) * (grad - last_grad);
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static std::array<V, kNumNorms> norm_terms(const Coeffs<S>& c, V /*param*/, V grad,
                                                             const std::array<V, kNumState>& state) {
    return {corrected_grad(c, c.maximize ? vneg(grad) : grad, state[3])};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& [exp_avg, exp_avg_sq, max_exp_avg_sq, last_grad] = state;
    if (c.maximize) {
      grad = vneg(grad);
    }
    V corrected = corrected_grad(c, grad, last_grad);
    if (c.clip) {
      corrected = corrected / V(c.norm);
    }
    exp_avg = exp_avg * V(c.beta1) + V(c.one_minus_beta1) * corrected;
    if (c.is_approx) {
      last_grad = grad;
    }
    if (c.momentum_only) {
      return;
    }
    V direction;
    if (c.lion) {
      direction = vsign(exp_avg);
    } else {
      exp_avg_sq = exp_avg_sq * V(c.beta2) + V(c.one_minus_beta2) * corrected * corrected;
      V second_moment = exp_avg_sq;
      if (c.amsgrad) {
        max_exp_avg_sq = vmaximum(max_exp_avg_sq, exp_avg_sq);
        second_moment = max_exp_avg_sq;
      }
      const V denom = (vsqrt(second_moment) / V(c.bias_correction2_sqrt) + V(c.eps)) * V(c.bias_correction1);
      direction = exp_avg / denom;
    }
    param = param + V(c.neg_lr) * (V(c.weight_decay) * param + direction);
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
