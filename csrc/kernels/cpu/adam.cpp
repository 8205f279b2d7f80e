// Fused CPU Adam/AdamW (classic.md §3), written in torch.optim's
// single-tensor operation order so results match it to rounding.
#include "kernels/cpu/adam.h"

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>

#include "kernels/cpu/multi_tensor_apply.h"
#include "kernels/cpu/opmath_block.h"
#include "kernels/cpu/vec_math.h"

namespace torchopt_ext::kernels::cpu {
namespace {

// Everything one tensor's update needs, with scalars rounded to the math type
// exactly as torch rounds Python-float arguments of its tensor ops.
template <typename S>
struct AdamCoeffs {
  S beta1_weight;  // 1 - beta1, the lerp weight
  S beta2;
  S one_minus_beta2;
  S weight_decay;
  S decay_factor;  // 1 - lr * weight_decay (decoupled)
  S bias_correction2_sqrt;
  S eps;
  S neg_step_size;  // -lr / (1 - beta1^t)
  bool decoupled;
  bool amsgrad;
  bool maximize;
  bool has_weight_decay;
};

template <typename V, typename S>
inline void adam_element(const AdamCoeffs<S>& c, V& param, V grad, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq) {
  if (c.maximize) {
    grad = vneg(grad);
  }
  if (c.has_weight_decay) {
    if (c.decoupled) {
      param = param * V(c.decay_factor);
    } else {
      grad = grad + V(c.weight_decay) * param;
    }
  }
  exp_avg = vlerp(exp_avg, grad, c.beta1_weight);
  exp_avg_sq = exp_avg_sq * V(c.beta2) + V(c.one_minus_beta2) * grad * grad;
  V second_moment = exp_avg_sq;
  if (c.amsgrad) {
    max_exp_avg_sq = vmaximum(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const V denom = vsqrt(second_moment) / V(c.bias_correction2_sqrt) + V(c.eps);
  param = param + V(c.neg_step_size) * exp_avg / denom;
}

struct AdamTask {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  double step;
  uint64_t rounding_stream;
};

template <typename P, typename St>
void adam_chunk(const AdamTask& task, const AdamHyperparams& hp, int64_t begin, int64_t end) {
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  const double bias_correction1 = 1.0 - std::pow(hp.beta1, task.step);
  const double bias_correction2 = 1.0 - std::pow(hp.beta2, task.step);
  const AdamCoeffs<S> c{static_cast<S>(1.0 - hp.beta1),
                        static_cast<S>(hp.beta2),
                        static_cast<S>(1.0 - hp.beta2),
                        static_cast<S>(hp.weight_decay),
                        static_cast<S>(1.0 - hp.lr * hp.weight_decay),
                        static_cast<S>(std::sqrt(bias_correction2)),
                        static_cast<S>(hp.eps),
                        static_cast<S>(-(hp.lr / bias_correction1)),
                        hp.decoupled_weight_decay,
                        hp.amsgrad,
                        hp.maximize,
                        hp.weight_decay != 0.0};
  const S grad_scale = static_cast<S>(hp.grad_scale.value_or(1.0));

  alignas(64) S param_buf[kBlockNumel];
  alignas(64) S grad_buf[kBlockNumel];
  alignas(64) S exp_avg_buf[kBlockNumel];
  alignas(64) S exp_avg_sq_buf[kBlockNumel];
  alignas(64) S max_buf[kBlockNumel];
  for (int64_t b = begin; b < end; b += kBlockNumel) {
    const int64_t n = std::min(kBlockNumel, end - b);
    OpmathBlock<P> param(static_cast<P*>(task.param) + b, param_buf, n);
    OpmathBlock<P> grad(static_cast<P*>(task.grad) + b, grad_buf, n);
    OpmathBlock<St> exp_avg(static_cast<St*>(task.exp_avg) + b, exp_avg_buf, n);
    OpmathBlock<St> exp_avg_sq(static_cast<St*>(task.exp_avg_sq) + b, exp_avg_sq_buf, n);
    std::optional<OpmathBlock<St>> max_sq;
    if (hp.amsgrad) {
      max_sq.emplace(static_cast<St*>(task.max_exp_avg_sq) + b, max_buf, n);
    }
    S* p = param.data();
    S* g = grad.data();
    S* m = exp_avg.data();
    S* v = exp_avg_sq.data();
    S* vmax = hp.amsgrad ? max_sq->data() : nullptr;
    if (hp.grad_scale) {
      unscale_grad_block(grad, grad_scale, n);
    }
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec pv = Vec::loadu(p + i);
      Vec mv = Vec::loadu(m + i);
      Vec vv = Vec::loadu(v + i);
      Vec xv = vmax ? Vec::loadu(vmax + i) : Vec(S(0));
      adam_element(c, pv, Vec::loadu(g + i), mv, vv, xv);
      pv.store(p + i);
      mv.store(m + i);
      vv.store(v + i);
      if (vmax) {
        xv.store(vmax + i);
      }
    }
    for (; i < n; ++i) {
      S unused = S(0);
      adam_element(c, p[i], g[i], m[i], v[i], vmax ? vmax[i] : unused);
    }
    if (hp.stochastic_rounding) {
      param.store_stochastic(task.rounding_stream, b);
    } else {
      param.store();
    }
    exp_avg.store();
    exp_avg_sq.store();
    if (max_sq) {
      max_sq->store();
    }
  }
}

using AdamChunkFn = void (*)(const AdamTask&, const AdamHyperparams&, int64_t, int64_t);

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const AdamHyperparams& hp) {
  const auto n = params.size();
  std::vector<AdamTask> tasks(n);
  std::vector<AdamChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    tasks[i] = {params[i].data_ptr(),
                grads[i].data_ptr(),
                exp_avgs[i].data_ptr(),
                exp_avg_sqs[i].data_ptr(),
                hp.amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                steps[i],
                rounding_stream(hp.seed, static_cast<int64_t>(i), steps[i])};
    fns[i] = select_kernel("adam_step_", params[i].scalar_type(), exp_avgs[i].scalar_type(),
                           [](auto p, auto s) { return &adam_chunk<decltype(p), decltype(s)>; });
    numels[i] = params[i].numel();
  }
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t end) { fns[t](tasks[t], hp, begin, end); });
}

}  // namespace torchopt_ext::kernels::cpu
