// Adafactor math shared by the CPU kernel (kernels/cpu/adafactor.cpp) and the
// CUDA kernels (kernels/cuda/adafactor.cu): the per-tensor step size and clip,
// the per-element inverse root, factored scale and param update. V is a math
// scalar (float/double, host or device) or an at::vec::Vectorized lane.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

#include "kernels/algos/elementwise_math.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

// The hyperparameters that set alpha_t, as plain values (no std::optional),
// so device code can take them by value.
struct AdafactorStepSize {
  double lr;
  double eps2;
  bool relative_step;
  bool warmup_init;
  bool scale_parameter;
};

// What the update pass needs per tensor, in the math type S.
template <typename S>
struct AdafactorApplyCoeffs {
  S decay_factor;  // 1 - lr * weight_decay (torch's lr, not alpha)
  S beta1;         // first moment of the scaled update (beta1 set)
  S one_minus_beta1;
  S update_scale;     // alpha / max(1, RMS(U) / d)
  bool weight_decay;  // decay_factor applies
  bool maximize;
};

struct AdafactorMath {
  // alpha_t from the whole tensor's ||theta|| (already rounded to the math
  // type, as torch's param.norm(2).item()) and numel.
  C10_HOST_DEVICE static double alpha(const AdafactorStepSize& hp, double step, double theta_norm, double numel) {
    const double rms = theta_norm / ::sqrt(numel);
    double rho = hp.lr;
    if (hp.relative_step) {
      const double inv_sqrt_step = 1.0 / ::sqrt(step);
      rho = hp.lr < inv_sqrt_step ? hp.lr : inv_sqrt_step;
      if (hp.warmup_init) {
        const double warm = 1e-6 * step;
        rho = rho < warm ? rho : warm;
      }
    }
    if (!hp.scale_parameter) {
      return rho;
    }
    return (hp.eps2 < rms ? rms : hp.eps2) * rho;
  }

  // The update clip: alpha / max(1, RMS(U) / d), with ||U|| rounded to the
  // math type (torch's update.norm(2).item()).
  C10_HOST_DEVICE static double update_scale(double alpha, double update_norm, double numel, double d) {
    const double ratio = update_norm / (::sqrt(numel) * d);
    return alpha / (ratio > 1.0 ? ratio : 1.0);
  }

  // 1 / sqrt(x), exactly (a division, no approximate rsqrt).
  template <typename V>
  C10_HOST_DEVICE static V rsqrt(const V& x) {
    if constexpr (std::is_floating_point_v<V>) {
      return V(1) / vsqrt(x);
    } else {
      return x.rsqrt();
    }
  }

  // torch: rsqrt(max(v, eps1^2)).
  template <typename V, typename S>
  C10_HOST_DEVICE static V inverse_root(const V& v, S eps1_sq) {
    return rsqrt(vmaximum(v, V(eps1_sq)));
  }

  // rsqrt(max(r c / m, eps1^2)) = min(rsqrt(r / m) rsqrt(c), 1 / eps1) when
  // the clamped row mean m is finite and positive: `row` and `col` are the
  // two rsqrt factors, `cap` = 1 / eps1.
  template <typename V, typename S>
  C10_HOST_DEVICE static V factored_scale(const V& row, const V& col, S cap) {
    return vminimum(row * col, V(cap));
  }

  // The exact per-element form (NaN/Inf grads, eps1 = 0): r c / m, clamped.
  template <typename V, typename S>
  C10_HOST_DEVICE static V factored_scale_exact(const V& row_var, const V& col_var, const V& mean, S eps1_sq) {
    return inverse_root(row_var * col_var / mean, eps1_sq);
  }

  // theta <- theta (1 - lr wd); then theta -= update_scale U, or with beta1
  // m <- beta1 m + (1 - beta1) update_scale U and theta -= m.
  template <typename V, typename S>
  C10_HOST_DEVICE static void apply(const AdafactorApplyCoeffs<S>& c, V& p, V u, V* m) {
    if (c.maximize) {
      u = vneg(u);
    }
    if (c.weight_decay) {
      p = p * V(c.decay_factor);
    }
    if (m != nullptr) {
      *m = *m * V(c.beta1) + V(c.one_minus_beta1) * (V(c.update_scale) * u);
      p = p - *m;
    } else if constexpr (std::is_floating_point_v<V>) {
      p = p + (-c.update_scale) * u;
    } else {
      p = fmadd(u, V(-c.update_scale), p);  // at::vec::fmadd by ADL: torch's add_(u, alpha=...) on vector lanes
    }
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
