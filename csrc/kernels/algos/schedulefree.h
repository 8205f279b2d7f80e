// Schedule-Free SGD / AdamW per-element math (the Algos of
// kernels/cpu/elementwise_apply.h) and the (param, z) passes of the train/eval
// switch and the generic wrapper, shared by the CPU kernels and the CUDA
// launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>
#include <cstdint>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/schedulefree.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::ScheduleFreeAdamWHyperparams;
using cpu::ScheduleFreeScalars;
using cpu::ScheduleFreeSGDHyperparams;
using cpu::ScheduleFreeWeighting;

// The y/z update both optimizers share once the step direction d is known:
// y <- lerp(y, z, c) + lr (beta1 (1 - c) - 1) d;  z <- z - lr d.
template <typename S>
struct ScheduleFreeInterpolation {
  S ckp1;
  S y_alpha;  // lr * (beta1 * (1 - ckp1) - 1), rounded once as ATen rounds a Python alpha
  S neg_lr;
  S weight_decay;

  C10_HOST_DEVICE static ScheduleFreeInterpolation make(double lr, double ckp1, double beta1, double weight_decay) {
    return {static_cast<S>(ckp1), static_cast<S>(lr * (beta1 * (1.0 - ckp1) - 1.0)), static_cast<S>(-lr),
            static_cast<S>(weight_decay)};
  }

  template <typename V>
  C10_HOST_DEVICE void apply(V& y, V& z, V direction) const {
    if (weight_decay != S(0)) {
      direction = direction + V(weight_decay) * y;  // decay evaluated at y, as SF does
    }
    y = vlerp(y, z, ckp1);
    y = y + V(y_alpha) * direction;
    z = z + V(neg_lr) * direction;
  }
};

// Per-tensor scalars of a step from the tensor's counters, in the
// schedulefree package's order of operations (Python floats are doubles):
// `step` is the already-incremented count, `lr_max` / `weight_sum` the stored
// values, which are replaced by the new ones. Host and device (the CUDA
// kernels run it when the counters live on the GPU).
C10_HOST_DEVICE inline ScheduleFreeScalars schedulefree_advance(const ScheduleFreeWeighting& w, double step, double lr,
                                                                double& weight_sum, double& lr_max) {
  const double k = step - 1.0;
  const double sched = k < static_cast<double>(w.warmup_steps) ? (k + 1.0) / static_cast<double>(w.warmup_steps) : 1.0;
  const double scheduled_lr = lr * sched;
  lr_max = scheduled_lr < lr_max ? lr_max : scheduled_lr;  // std::max(scheduled_lr, lr_max)
  const double weight = ::pow(k + 1.0, w.r) * ::pow(lr_max, w.weight_lr_power);
  weight_sum = weight_sum + weight;
  ScheduleFreeScalars out;
  out.lr = scheduled_lr;
  out.ckp1 = weight_sum != 0.0 ? weight / weight_sum : 0.0;
  out.bias_correction2 = 1.0 - ::pow(w.beta2, k + 1.0);
  return out;
}

struct ScheduleFreeAdamWAlgo {
  static constexpr int kNumState = 2;  // z, exp_avg_sq
  using Hyper = ScheduleFreeAdamWHyperparams;
  using TensorScalars = ScheduleFreeScalars;

  template <typename S>
  struct Coeffs {
    ScheduleFreeInterpolation<S> interp;
    S beta2;
    S one_minus_beta2;
    S bias_correction2;
    S eps;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& ts) {
    return {ScheduleFreeInterpolation<S>::make(ts.lr, ts.ckp1, hp.beta1, hp.weight_decay), static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2), static_cast<S>(ts.bias_correction2), static_cast<S>(hp.eps)};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& z = state[0];
    auto& exp_avg_sq = state[1];
    exp_avg_sq = exp_avg_sq * V(c.beta2);
    exp_avg_sq = exp_avg_sq + V(c.one_minus_beta2) * grad * grad;
    const V denom = vsqrt(exp_avg_sq / V(c.bias_correction2)) + V(c.eps);
    c.interp.apply(param, z, grad / denom);
  }
};

struct ScheduleFreeSGDAlgo {
  static constexpr int kNumState = 1;  // z
  using Hyper = ScheduleFreeSGDHyperparams;
  using TensorScalars = ScheduleFreeScalars;

  template <typename S>
  struct Coeffs {
    ScheduleFreeInterpolation<S> interp;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& ts) {
    return {ScheduleFreeInterpolation<S>::make(ts.lr, ts.ckp1, hp.momentum, hp.weight_decay)};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    c.interp.apply(param, state[0], grad);
  }
};

// Element passes over (param, z) pairs without gradients. Each supplies
// `Coeffs<S>`, `coeffs<S>()` and `apply(const Coeffs<S>&, V& param, V& z)`;
// kWritesZ says whether z is stored back.

// param <- lerp(param, z, weight): y -> x (eval) with 1 - 1/beta, x -> y with 1 - beta.
struct ScheduleFreeLerpToZ {
  static constexpr bool kWritesZ = false;
  double weight;
  template <typename S>
  struct Coeffs {
    S weight;
  };
  template <typename S>
  C10_HOST_DEVICE Coeffs<S> coeffs() const {
    return {static_cast<S>(weight)};
  }
  template <typename V, typename S>
  C10_HOST_DEVICE static void apply(const Coeffs<S>& c, V& param, V& z) {
    param = vlerp(param, z, c.weight);
  }
};

// Wrapper, before the base step: param (y) <- z - decay * y; z <- x.
struct ScheduleFreeWrapperPre {
  static constexpr bool kWritesZ = true;
  double beta;
  double decay;
  template <typename S>
  struct Coeffs {
    S to_x;  // 1 - 1/beta
    S neg_decay;
  };
  template <typename S>
  C10_HOST_DEVICE Coeffs<S> coeffs() const {
    return {static_cast<S>(1.0 - 1.0 / beta), static_cast<S>(-decay)};
  }
  template <typename V, typename S>
  C10_HOST_DEVICE static void apply(const Coeffs<S>& c, V& param, V& z) {
    const V y = param;
    param = z + V(c.neg_decay) * y;
    z = vlerp(y, z, c.to_x);
  }
};

// Wrapper, after the base step: param holds z_{k+1}, z holds x_k.
struct ScheduleFreeWrapperPost {
  static constexpr bool kWritesZ = true;
  double c;
  double beta;
  template <typename S>
  struct Coeffs {
    S c;
    S one_minus_beta;
  };
  template <typename S>
  C10_HOST_DEVICE Coeffs<S> coeffs() const {
    return {static_cast<S>(c), static_cast<S>(1.0 - beta)};
  }
  template <typename V, typename S>
  C10_HOST_DEVICE static void apply(const Coeffs<S>& k, V& param, V& z) {
    const V z_next = param;
    const V x_next = vlerp(z, z_next, k.c);
    param = vlerp(x_next, z_next, k.one_minus_beta);
    z = z_next;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
