// Fused CPU SGD with momentum, dampening and Nesterov (classic.md §2), in
// torch.optim's single-tensor operation order.
#include "kernels/cpu/sgd.h"

#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "kernels/cpu/multi_tensor_apply.h"
#include "kernels/cpu/opmath_block.h"
#include "kernels/cpu/vec_math.h"

namespace torchopt_ext::kernels::cpu {
namespace {

template <typename S>
struct SGDCoeffs {
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

template <typename V, typename S>
inline void sgd_element(const SGDCoeffs<S>& c, V& param, V grad, V& buffer) {
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

struct SGDTask {
  void* param;
  void* grad;
  void* buffer;
  double step;
  uint64_t rounding_stream;
};

template <typename P, typename St>
void sgd_chunk(const SGDTask& task, const SGDHyperparams& hp, int64_t begin, int64_t end) {
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  const bool has_momentum = hp.momentum != 0.0;
  const SGDCoeffs<S> c{static_cast<S>(-hp.lr),
                       static_cast<S>(hp.momentum),
                       static_cast<S>(1.0 - hp.dampening),
                       static_cast<S>(hp.weight_decay),
                       has_momentum,
                       task.step == 1.0,
                       hp.nesterov,
                       hp.maximize,
                       hp.weight_decay != 0.0};
  const S grad_scale = static_cast<S>(hp.grad_scale.value_or(1.0));

  alignas(64) S param_buf[kBlockNumel];
  alignas(64) S grad_buf[kBlockNumel];
  alignas(64) S buffer_buf[kBlockNumel];
  for (int64_t b = begin; b < end; b += kBlockNumel) {
    const int64_t n = std::min(kBlockNumel, end - b);
    OpmathBlock<P> param(static_cast<P*>(task.param) + b, param_buf, n);
    OpmathBlock<P> grad(static_cast<P*>(task.grad) + b, grad_buf, n);
    std::optional<OpmathBlock<St>> buffer;
    if (has_momentum) {
      buffer.emplace(static_cast<St*>(task.buffer) + b, buffer_buf, n);
    }
    S* p = param.data();
    S* g = grad.data();
    S* m = has_momentum ? buffer->data() : nullptr;
    if (hp.grad_scale) {
      unscale_grad_block(grad, grad_scale, n);
    }
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec pv = Vec::loadu(p + i);
      Vec mv = m ? Vec::loadu(m + i) : Vec(S(0));
      sgd_element(c, pv, Vec::loadu(g + i), mv);
      pv.store(p + i);
      if (m) {
        mv.store(m + i);
      }
    }
    for (; i < n; ++i) {
      S unused = S(0);
      sgd_element(c, p[i], g[i], m ? m[i] : unused);
    }
    if (hp.stochastic_rounding) {
      param.store_stochastic(task.rounding_stream, b);
    } else {
      param.store();
    }
    if (buffer) {
      buffer->store();
    }
  }
}

using SGDChunkFn = void (*)(const SGDTask&, const SGDHyperparams&, int64_t, int64_t);

}  // namespace

void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const std::vector<double>& steps, const SGDHyperparams& hp) {
  const auto n = params.size();
  const bool has_momentum = hp.momentum != 0.0;
  std::vector<SGDTask> tasks(n);
  std::vector<SGDChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    tasks[i] = {params[i].data_ptr(), grads[i].data_ptr(), has_momentum ? momentum_buffers[i].data_ptr() : nullptr,
                steps[i], rounding_stream(hp.seed, static_cast<int64_t>(i), steps[i])};
    const auto state_type = has_momentum ? momentum_buffers[i].scalar_type() : params[i].scalar_type();
    fns[i] = select_kernel("sgd_step_", params[i].scalar_type(), state_type,
                           [](auto p, auto s) { return &sgd_chunk<decltype(p), decltype(s)>; });
    numels[i] = params[i].numel();
  }
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t end) { fns[t](tasks[t], hp, begin, end); });
}

}  // namespace torchopt_ext::kernels::cpu
