// Fused CPU Schedule-Free SGD / AdamW (Defazio et al. 2024; rollfast.md §4),
// in the order of the schedulefree package's foreach step, plus the y <-> x
// switch and the two element passes of the generic wrapper. The math is in
// kernels/algos/schedulefree.h, shared with the CUDA kernels.
#include "kernels/cpu/schedulefree.h"

#include "kernels/algos/schedulefree.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

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
  pair_apply("schedulefree_set_mode_", params, zs, ScheduleFreeLerpToZ{weight});
}

void schedulefree_wrapper_pre(at::TensorList params, at::TensorList zs, double beta, double decay) {
  pair_apply("schedulefree_wrapper_pre_", params, zs, ScheduleFreeWrapperPre{beta, decay});
}

void schedulefree_wrapper_post(at::TensorList params, at::TensorList zs, double c, double beta) {
  pair_apply("schedulefree_wrapper_post_", params, zs, ScheduleFreeWrapperPost{c, beta});
}

}  // namespace torchopt_ext::kernels::cpu
