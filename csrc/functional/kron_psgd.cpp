#include "torchopt_ext/functional/kron_psgd.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "common/tensor_lists.h"
#include "functional/psgd_device.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/side_by_side.h"

namespace torchopt_ext::functional {

namespace {

// The crate's substitutions set an unknown to 0 where the pivot is
// |d| <= 1e-12 instead of dividing. The same result from LAPACK's solves:
// swap such a pivot's row (left solve) or column (right solve) for the
// identity's and zero the matching right-hand-side row / column.
constexpr double kPivotFloor = 1e-12;

// X = Q^{-T} G for upper-triangular Q (Q^T is lower-triangular).
at::Tensor solve_left_transposed(const at::Tensor& q, const at::Tensor& g) {
  const at::Tensor bad = q.diagonal().abs() <= kPivotFloor;  // (m,)
  const at::Tensor lower = at::where(bad.unsqueeze(1), at::eye(q.size(0), q.options()), q.t());
  const at::Tensor rhs = at::where(bad.unsqueeze(1), at::zeros({}, g.options()), g);
  return at::linalg_solve_triangular(lower, rhs, /*upper=*/false, /*left=*/true);
}

// Y = X Q^{-1} for upper-triangular Q.
at::Tensor solve_right(const at::Tensor& q, const at::Tensor& x) {
  const at::Tensor bad = q.diagonal().abs() <= kPivotFloor;  // (n,)
  const at::Tensor upper = at::where(bad.unsqueeze(0), at::eye(q.size(0), q.options()), q);
  const at::Tensor rhs = at::where(bad.unsqueeze(0), at::zeros({}, x.options()), x);
  return at::linalg_solve_triangular(upper, rhs, /*upper=*/true, /*left=*/false);
}

// Q <- Q - precond_lr / (|D|_F + eps) * Q triu(D): the crate normalises by
// the Frobenius norm of the whole D (summed in double, as the crate does)
// and keeps the upper triangle, diagonal included, of the step.
void lie_step_(at::Tensor& q, const at::Tensor& d, double precond_lr, double eps) {
  const at::Tensor norm = d.to(at::kDouble).square().sum().sqrt().to(q.scalar_type());
  const at::Tensor scale = precond_lr / (norm + eps);
  q.sub_(at::mm(q, at::triu(d)) * scale);
}

}  // namespace

at::Tensor kron_psgd_precondition_(const at::Tensor& g, at::Tensor& ql, at::Tensor& qr, double precond_lr, double eps,
                                   double clip) {
  // A = Q_L g Q_R^T and B = Q_L^{-T} g Q_R^{-1}, both from the old factors.
  const at::Tensor a = at::mm(at::mm(ql, g), qr.t());
  const at::Tensor b = solve_right(qr, solve_left_transposed(ql, g));
  // A A^T - B B^T as sym((A - B)(A + B)^T) (equal in exact arithmetic): at
  // Q = I, A == B and D is exactly 0, as in the crate. The direct difference
  // of two GEMMs leaves ulp noise whenever the two products take different
  // BLAS paths, and the normalised step would blow that up to a
  // precond_lr-sized move. Also free of the cancellation near A == B.
  const at::Tensor diff = a - b;
  const at::Tensor sum = a + b;
  const at::Tensor e_left = at::mm(diff, sum.t());
  const at::Tensor e_right = at::mm(diff.t(), sum);
  const at::Tensor d_left = (e_left + e_left.t()) * 0.5;
  const at::Tensor d_right = (e_right + e_right.t()) * 0.5;
  lie_step_(ql, d_left, precond_lr, eps);
  lie_step_(qr, d_right, precond_lr, eps);
  // (Q_L^T Q_L) g (Q_R Q_R^T): the crate's right factor is Q_R Q_R^T (not the
  // Q_R^T Q_R its docs write), kept so trajectories carry over.
  const at::Tensor pg = at::mm(at::mm(ql.t(), at::mm(at::mm(ql, g), qr)), qr.t());
  // Max-abs clip; NaNs are skipped by the max as in the crate (they reach the
  // update through pg itself).
  const at::Tensor mags = pg.abs();
  const at::Tensor max_abs = at::where(at::isnan(mags), at::zeros({}, mags.options()), mags).max();
  const at::Tensor scale = at::where(max_abs > clip, clip / max_abs, at::ones({}, max_abs.options()));
  return pg * scale;
}

void kron_psgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList ql,
                     at::TensorList qr, at::TensorList state_steps, const at::Tensor& lr, double precond_lr,
                     double momentum, double weight_decay, double eps, double clip, bool maximize,
                     bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "kron_psgd_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "precond_lr", precond_lr, std::isfinite(precond_lr) && precond_lr >= 0.0, ">= 0");
  check_hyperparameter(op, "momentum", momentum, momentum >= 0.0 && momentum < 1.0, "in [0, 1)");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "eps", eps, std::isfinite(eps) && eps > 0.0, "> 0");
  check_hyperparameter(op, "clip", clip, clip > 0.0, "> 0");
  // The factor lists hold the 2-D params' factors only, in param order.
  size_t matrices = 0;
  for (const auto& p : params) {
    matrices += p.dim() == 2 ? 1 : 0;
  }
  TORCH_CHECK_VALUE(ql.size() == matrices && qr.size() == matrices, op,
                    ": ql and qr must hold one factor per 2-D param (", matrices, "), got ", ql.size(), " and ",
                    qr.size());
  {
    size_t k = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].dim() != 2) {
        continue;
      }
      const auto math = params[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const int64_t m = params[i].size(0);
      const int64_t n = params[i].size(1);
      TORCH_CHECK_VALUE(ql[k].dim() == 2 && ql[k].size(0) == m && ql[k].size(1) == m, op, ": ql[", k,
                        "] must have shape (", m, ", ", m, ") for params[", i, "], got ", ql[k].sizes());
      TORCH_CHECK_VALUE(qr[k].dim() == 2 && qr[k].size(0) == n && qr[k].size(1) == n, op, ": qr[", k,
                        "] must have shape (", n, ", ", n, ") for params[", i, "], got ", qr[k].sizes());
      TORCH_CHECK_VALUE(ql[k].scalar_type() == math && qr[k].scalar_type() == math, op, ": ql[", k, "] and qr[", k,
                        "] must be ", math, " for a ", params[i].scalar_type(), " param");
      TORCH_CHECK_VALUE(ql[k].device() == params[i].device() && qr[k].device() == params[i].device(), op, ": ql[", k,
                        "] and qr[", k, "] must be on the param's device");
      ++k;
    }
  }
  // On CUDA every step is ATen ops plus the reduced-precision store: no host
  // read (the clip and the Lie step's norm stay 0-d device tensors).
  psgd_device::check_host_scalars(op, params, lr, state_steps);
  auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"momentum_buffers", momentum_buffers}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  psgd_device::unscale_grads_(*group);
  // Per param: its factors' index in ql / qr (-1: not a matrix) and its cost
  // (GEMM work numel (m + n)); on a multi-threaded CPU the params run side by side.
  const size_t n = group->params.size();
  std::vector<int64_t> factor_index(n, -1);
  std::vector<double> costs(n);
  for (size_t i = 0, next = 0; i < n; ++i) {
    const at::Tensor& param = group->params[i];
    const auto numel = static_cast<double>(param.numel());
    costs[i] = param.dim() == 2 ? numel * static_cast<double>(param.size(0) + param.size(1)) : numel;
    if (param.dim() == 2) {
      factor_index[i] = static_cast<int64_t>(next++);
    }
  }
  common::run_side_by_side(costs, !group->on_cuda, [&](size_t i) {
    at::Tensor& param = group->params[i];
    at::Tensor& buffer = group->state[0][i];
    const auto math = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(buffer.scalar_type() == math, op, ": momentum_buffers[", i, "] must be ", math, " for a ",
                      param.scalar_type(), " param");
    at::Tensor g = group->grads[i].to(math);
    if (maximize) {
      g = g.neg();
    }
    const at::Tensor p = param.to(math);
    at::Tensor direction;
    if (factor_index[i] >= 0) {
      at::Tensor left = ql[factor_index[i]];
      at::Tensor right = qr[factor_index[i]];
      direction = kron_psgd_precondition_(g, left, right, precond_lr, eps, clip);
    } else {
      direction = g;  // the crate's SGD-with-momentum fallback
    }
    // v <- mu v + (direction + wd p); p <- p - lr v.
    if (weight_decay != 0.0) {
      direction = direction + p * weight_decay;
    }
    buffer.mul_(momentum).add_(direction);
    const uint64_t stream = kernels::cpu::rounding_stream(seed, static_cast<int64_t>(i), group->steps[i]);
    psgd_device::apply_update(param, buffer, 1.0, -group->lr, stochastic_rounding, stream);
  });
  group->finish();
}

}  // namespace torchopt_ext::functional
