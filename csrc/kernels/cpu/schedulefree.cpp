// Fused CPU Schedule-Free SGD / AdamW (Defazio et al. 2024; rollfast.md §4),
// in the order of the schedulefree package's foreach step, plus the y <-> x
// switch and the two element passes of the generic wrapper.
#include "kernels/cpu/schedulefree.h"

#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

// The y/z update both optimizers share once the step direction d is known:
// y <- lerp(y, z, c) + lr (beta1 (1 - c) - 1) d;  z <- z - lr d.
template <typename S>
struct InterpolationCoeffs {
  S ckp1;
  S y_alpha;  // lr * (beta1 * (1 - ckp1) - 1), rounded once as ATen rounds a Python alpha
  S neg_lr;
  S weight_decay;

  static InterpolationCoeffs make(double lr, double ckp1, double beta1, double weight_decay) {
    return {static_cast<S>(ckp1), static_cast<S>(lr * (beta1 * (1.0 - ckp1) - 1.0)), static_cast<S>(-lr),
            static_cast<S>(weight_decay)};
  }

  template <typename V>
  void apply(V& y, V& z, V direction) const {
    if (weight_decay != S(0)) {
      direction = direction + V(weight_decay) * y;  // decay evaluated at y, as SF does
    }
    y = vlerp(y, z, ckp1);
    y = y + V(y_alpha) * direction;
    z = z + V(neg_lr) * direction;
  }
};

struct ScheduleFreeAdamWAlgo {
  static constexpr int kNumState = 2;  // z, exp_avg_sq
  using Hyper = ScheduleFreeAdamWHyperparams;
  using TensorScalars = ScheduleFreeScalars;

  template <typename S>
  struct Coeffs {
    InterpolationCoeffs<S> interp;
    S beta2;
    S one_minus_beta2;
    S bias_correction2;
    S eps;
  };

  template <typename S>
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& ts) {
    return {InterpolationCoeffs<S>::make(ts.lr, ts.ckp1, hp.beta1, hp.weight_decay), static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2), static_cast<S>(ts.bias_correction2), static_cast<S>(hp.eps)};
  }

  template <typename V, typename S>
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
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
    InterpolationCoeffs<S> interp;
  };

  template <typename S>
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& ts) {
    return {InterpolationCoeffs<S>::make(ts.lr, ts.ckp1, hp.momentum, hp.weight_decay)};
  }

  template <typename V, typename S>
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    c.interp.apply(param, state[0], grad);
  }
};

// Element passes over (param, z) pairs without gradients. An Op supplies
// `template <typename S> struct Coeffs`, `coeffs<S>()` and
// `apply(const Coeffs<S>&, V& param, V& z)`.
template <typename Op, typename P, typename Z>
void pair_chunk(const Op& op, void* param_data, void* z_data, int64_t begin, int64_t end) {
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  using ParamIO = LaneIO<P>;
  using ZIO = LaneIO<Z>;
  static_assert(ParamIO::kWidth == ZIO::kWidth, "param and z storage must share the math type");
  const auto c = op.template coeffs<S>();
  P* param = static_cast<P*>(param_data);
  Z* z = static_cast<Z*>(z_data);
  int64_t i = begin;
  for (; i + ParamIO::kWidth <= end; i += ParamIO::kWidth) {
    Vec p[2], zv[2];
    ParamIO::load(param + i, p[0], p[1]);
    ZIO::load(z + i, zv[0], zv[1]);
    Op::apply(c, p[0], zv[0]);
    Op::apply(c, p[1], zv[1]);
    ParamIO::store(param + i, p[0], p[1]);
    if (Op::kWritesZ) {
      ZIO::store(z + i, zv[0], zv[1]);
    }
  }
  for (; i < end; ++i) {
    S p = static_cast<S>(param[i]);
    S zs = static_cast<S>(z[i]);
    Op::apply(c, p, zs);
    param[i] = static_cast<P>(p);
    if (Op::kWritesZ) {
      z[i] = static_cast<Z>(zs);
    }
  }
}

template <typename Op>
void pair_apply(const char* name, at::TensorList params, at::TensorList zs, const Op& op) {
  using Fn = void (*)(const Op&, void*, void*, int64_t, int64_t);
  const auto n = params.size();
  std::vector<Fn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    fns[i] = select_kernel(name, params[i].scalar_type(), zs[i].scalar_type(),
                           [](auto p, auto z) { return &pair_chunk<Op, decltype(p), decltype(z)>; });
    numels[i] = params[i].numel();
  }
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t end) {
    fns[t](op, params[t].data_ptr(), zs[t].data_ptr(), begin, end);
  });
}

struct LerpToZ {
  static constexpr bool kWritesZ = false;
  double weight;
  template <typename S>
  struct Coeffs {
    S weight;
  };
  template <typename S>
  Coeffs<S> coeffs() const {
    return {static_cast<S>(weight)};
  }
  template <typename V, typename S>
  static void apply(const Coeffs<S>& c, V& param, V& z) {
    param = vlerp(param, z, c.weight);
  }
};

struct WrapperPre {
  static constexpr bool kWritesZ = true;
  double beta;
  double decay;
  template <typename S>
  struct Coeffs {
    S to_x;  // 1 - 1/beta
    S neg_decay;
  };
  template <typename S>
  Coeffs<S> coeffs() const {
    return {static_cast<S>(1.0 - 1.0 / beta), static_cast<S>(-decay)};
  }
  template <typename V, typename S>
  static void apply(const Coeffs<S>& c, V& param, V& z) {
    const V y = param;
    param = z + V(c.neg_decay) * y;
    z = vlerp(y, z, c.to_x);
  }
};

struct WrapperPost {
  static constexpr bool kWritesZ = true;
  double c;
  double beta;
  template <typename S>
  struct Coeffs {
    S c;
    S one_minus_beta;
  };
  template <typename S>
  Coeffs<S> coeffs() const {
    return {static_cast<S>(c), static_cast<S>(1.0 - beta)};
  }
  template <typename V, typename S>
  static void apply(const Coeffs<S>& k, V& param, V& z) {
    const V z_next = param;
    const V x_next = vlerp(z, z_next, k.c);
    param = vlerp(x_next, z_next, k.one_minus_beta);
    z = z_next;
  }
};

}  // namespace

void schedulefree_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList exp_avg_sqs,
                             const std::vector<ScheduleFreeScalars>& scalars, const std::vector<double>& steps,
                             const ScheduleFreeAdamWHyperparams& hp, const ElementwiseOptions& options) {
  elementwise_step<ScheduleFreeAdamWAlgo>("schedulefree_adamw_step_", params, grads, {zs, exp_avg_sqs}, scalars, steps,
                                          hp, options);
}

void schedulefree_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList zs,
                           const std::vector<ScheduleFreeScalars>& scalars, const std::vector<double>& steps,
                           const ScheduleFreeSGDHyperparams& hp, const ElementwiseOptions& options) {
  elementwise_step<ScheduleFreeSGDAlgo>("schedulefree_sgd_step_", params, grads, {zs}, scalars, steps, hp, options);
}

void schedulefree_lerp_to_z(at::TensorList params, at::TensorList zs, double weight) {
  pair_apply("schedulefree_set_mode_", params, zs, LerpToZ{weight});
}

void schedulefree_wrapper_pre(at::TensorList params, at::TensorList zs, double beta, double decay) {
  pair_apply("schedulefree_wrapper_pre_", params, zs, WrapperPre{beta, decay});
}

void schedulefree_wrapper_post(at::TensorList params, at::TensorList zs, double c, double beta) {
  pair_apply("schedulefree_wrapper_post_", params, zs, WrapperPost{c, beta});
}

}  // namespace torchopt_ext::kernels::cpu
