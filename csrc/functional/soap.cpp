#include "torchopt_ext/functional/soap.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/tensor_lists.h"
#include "functional/matrix_parts.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/common/side_by_side.h"

namespace torchopt_ext::functional {

int64_t SoapLayout::factor_numel() const {
  int64_t total = 0;
  for (const int64_t d : factor_sizes) {
    total += d * d;
  }
  return total;
}

namespace {

// Greedy merge of adjacent dims while the product stays <= max (spec §10).
std::vector<int64_t> merged_shape(std::vector<int64_t> shape, int64_t max_precond_dim, c10::string_view data_format) {
  if (data_format == "channels_last" && shape.size() == 4) {
    // As the reference: the merge is planned on the NCHW order of the sizes,
    // the tensor itself is reshaped as stored.
    shape = {shape[0], shape[3], shape[1], shape[2]};
  }
  std::vector<int64_t> out;
  int64_t current = 1;
  for (const int64_t d : shape) {
    if (current * d > max_precond_dim) {
      if (current > 1) {
        out.push_back(current);
        current = d;
      } else {
        out.push_back(d);
        current = 1;
      }
    } else {
      current *= d;
    }
  }
  if (current > 1 || out.empty()) {
    out.push_back(current);
  }
  return out;
}

at::ScalarType factor_dtype(const at::Tensor& param) {
  return param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Views of one param's flat factor tensor: one d x d matrix per dim with a
// factor, undefined for the others.
std::vector<at::Tensor> factor_views(const at::Tensor& flat, const SoapLayout& layout) {
  std::vector<at::Tensor> views;
  int64_t offset = 0;
  for (const int64_t d : layout.factor_sizes) {
    if (d == 0) {
      views.emplace_back();
      continue;
    }
    views.push_back(flat.narrow(0, offset, d * d).view({d, d}));
    offset += d * d;
  }
  return views;
}

// P(X): X x_k Q_k for every dim (tensordot over the leading dim cycles the
// dims, so after all of them the order is the original one).
at::Tensor project(at::Tensor x, const std::vector<at::Tensor>& qs) {
  for (const auto& q : qs) {
    x = q.defined() ? at::tensordot(x, q, {0}, {0}) : x.movedim(0, -1);
  }
  return x;
}

// P^-1(X): X x_k Q_k^T.
at::Tensor project_back(at::Tensor x, const std::vector<at::Tensor>& qs) {
  for (const auto& q : qs) {
    x = q.defined() ? at::tensordot(x, q, {0}, {1}) : x.movedim(0, -1);
  }
  return x;
}

// G_(k) G_(k)^T: the Gram matrix of dim k contracted over all other dims.
// PSGD's mode Gram: for d >= 128 only the blocks on and above the diagonal
// are multiplied (a syrk by hand, ~0.56-0.63 of the GEMM), the rest mirrored;
// below that one mm, as before.
at::Tensor gram(const at::Tensor& g, int64_t k, int64_t /*d*/) {
  return common::psgd::factor_gram(g, k, /*dense=*/true);
}

// eigh / QR in float32 as the reference; float64 when float32 fails.
at::Tensor descending_eigenvectors(const at::Tensor& gg) {
  const int64_t d = gg.size(0);
  auto solve = [&](at::ScalarType dtype) {
    const at::Tensor m = gg.to(dtype) + 1e-30 * at::eye(d, gg.options().dtype(dtype));
    return std::get<1>(at::linalg_eigh(m)).flip({1});
  };
  try {
    return solve(at::kFloat);
  } catch (const c10::Error&) {
    return solve(at::kDouble);
  }
}

// Q of m = QR (reduced, square m): geqrf + orgqr. linalg_qr computes the same
// Q from the same two LAPACK calls but also forms R (a copy and a triu that
// SOAP discards): 0.73x its time at d = 1024, one thread, bitwise equal.
at::Tensor householder_q(const at::Tensor& m) {
  const auto [reflectors, tau] = at::geqrf(m);
  return at::linalg_householder_product(reflectors, tau);
}

at::Tensor qr_q(const at::Tensor& m) {
  try {
    return householder_q(m.to(at::kFloat));
  } catch (const c10::Error&) {
    return householder_q(m.to(at::kDouble));
  }
}

// m / (sqrt(v) + eps) in one buffer (the same three roundings as the
// expression, without its two temporaries).
at::Tensor adam_direction(const at::Tensor& m, const at::Tensor& v, double eps) {
  at::Tensor out = v.sqrt();
  out.add_(eps);
  return at::div_out(out, m, out);
}

double shampoo_beta_of(double shampoo_beta, double beta2) { return shampoo_beta >= 0.0 ? shampoo_beta : beta2; }

void check_common(const char* op, double beta2, double shampoo_beta, int64_t max_precond_dim,
                  c10::string_view data_format) {
  using common::check_hyperparameter;
  check_hyperparameter(op, "betas[1]", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "shampoo_beta", shampoo_beta, shampoo_beta < 1.0, "< 1 (negative: use betas[1])");
  check_hyperparameter(op, "max_precond_dim", static_cast<double>(max_precond_dim), max_precond_dim >= 1, ">= 1");
  TORCH_CHECK_VALUE(data_format == "channels_first" || data_format == "channels_last", op,
                    ": data_format must be 'channels_first' or 'channels_last', got '", data_format, "'");
}

// GGs / Qs: one flat contiguous tensor per param with the layout's size.
std::vector<SoapLayout> check_factors(const char* op, at::TensorList params, at::TensorList GGs, at::TensorList Qs,
                                      int64_t max_precond_dim, bool merge_dims, bool precondition_1d,
                                      c10::string_view data_format) {
  TORCH_CHECK_VALUE(GGs.size() == params.size() && Qs.size() == params.size(), op, ": GGs has ", GGs.size(),
                    " tensors and Qs ", Qs.size(), " but params has ", params.size());
  std::vector<SoapLayout> layouts;
  for (size_t i = 0; i < params.size(); ++i) {
    layouts.push_back(soap_layout(params[i].sizes(), max_precond_dim, merge_dims, precondition_1d, data_format));
    const int64_t numel = layouts.back().factor_numel();
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"GGs", GGs[i]}, {"Qs", Qs[i]}}) {
      TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == numel && t.is_contiguous(), op, ": ", name, "[", i,
                        "] must be a contiguous 1-D tensor of ", numel, " elements for a param of shape ",
                        params[i].sizes(), ", got shape ", t.sizes());
      TORCH_CHECK_VALUE(t.scalar_type() == factor_dtype(params[i]), op, ": ", name, "[", i, "] must be ",
                        factor_dtype(params[i]), " for a ", params[i].scalar_type(), " param, got ", t.scalar_type());
      TORCH_CHECK_VALUE(t.device() == params[i].device(), op, ": ", name, "[", i, "] is on ", t.device(),
                        " but its param on ", params[i].device());
    }
  }
  return layouts;
}

// The first call of a param: GG_k = (1 - beta_s) G_(k) G_(k)^T (lerp from
// zero, as the later EMA) and Q_k its eigenvectors by descending eigenvalue.
void init_preconditioner(const at::Tensor& g, const SoapLayout& layout, const std::vector<at::Tensor>& ggs,
                         const std::vector<at::Tensor>& qs, double beta_s) {
  for (size_t k = 0; k < ggs.size(); ++k) {
    if (!ggs[k].defined()) {
      continue;
    }
    ggs[k].zero_().lerp_(gram(g, static_cast<int64_t>(k), layout.factor_sizes[k]), 1.0 - beta_s);
    qs[k].copy_(descending_eigenvectors(ggs[k]));
  }
}

// --- Batched forms: x has a leading batch axis B, each factor is (B, d, d)
// (issue 7: the params of one call with equal layouts and steps run as one
// bmm / batched eigh / batched QR instead of one small op per tensor).

// The per-tensor project's contraction of dim k (tensordot over the leading
// dim, result dims cycled) with one Q per batch entry: (B, N, d) x (B, d, d).
at::Tensor contract_leading(const at::Tensor& x, const at::Tensor& q, bool transpose) {
  const at::Tensor moved = x.movedim(1, -1);
  const auto sizes = moved.sizes().vec();
  const int64_t d = sizes.back();
  const at::Tensor flat = moved.reshape({sizes[0], -1, d});
  return at::bmm(flat, transpose ? q.transpose(1, 2) : q).view(sizes);
}

at::Tensor project_batched(at::Tensor x, const std::vector<at::Tensor>& qs) {
  for (const auto& q : qs) {
    x = q.defined() ? contract_leading(x, q, false) : x.movedim(1, -1);
  }
  return x;
}

at::Tensor project_back_batched(at::Tensor x, const std::vector<at::Tensor>& qs) {
  for (const auto& q : qs) {
    x = q.defined() ? contract_leading(x, q, true) : x.movedim(1, -1);
  }
  return x;
}

at::Tensor gram_batched(const at::Tensor& g, int64_t k, int64_t d) {
  const at::Tensor rows = g.movedim(k + 1, 1).reshape({g.size(0), d, -1});
  return at::bmm(rows, rows.transpose(1, 2));
}

at::Tensor descending_eigenvectors_batched(const at::Tensor& gg) {
  const int64_t d = gg.size(-1);
  auto solve = [&](at::ScalarType dtype) {
    const at::Tensor m = gg.to(dtype) + 1e-30 * at::eye(d, gg.options().dtype(dtype));
    return std::get<1>(at::linalg_eigh(m)).flip({-1});
  };
  try {
    return solve(at::kFloat);
  } catch (const c10::Error&) {
    return solve(at::kDouble);
  }
}

// One param's relative work in a step, in multiply-adds at GEMM speed, to
// balance units across threads: per factor of size d the rotation, the
// rotation back and the Gram (numel * d each) plus ~10 element-wise passes;
// a refresh adds the rotations of m (2 numel * d), L Q (d^3) and a QR; the
// first call a Gram and an eigh. QR / eigh run below GEMM speed: their
// weights (4 d^3, 7 d^3) are single-thread timings on this CPU at d = 256 to
// 1024 (3.3-4.5x and 5.3-9x one d x d x d GEMM).
double soap_unit_cost(const SoapLayout& layout, double step, int64_t precondition_frequency) {
  double numel = 1.0;
  for (const int64_t d : layout.shape) {
    numel *= static_cast<double>(d);
  }
  double cost = 10.0 * numel;
  const bool refresh = step > 0.0 && std::fmod(step, static_cast<double>(precondition_frequency)) == 0.0;
  for (const int64_t size : layout.factor_sizes) {
    const auto d = static_cast<double>(size);
    if (step == 0.0) {
      cost += numel * d + 7.0 * d * d * d;
    } else {
      cost += 3.0 * numel * d;
      if (refresh) {
        cost += 2.0 * numel * d + 5.0 * d * d * d;  // L Q and the QR
      }
    }
  }
  return cost;
}

// Equal layouts, math dtypes and step values: one batch (the refresh and
// first-call decisions and the bias correction are per step).
struct BatchKey {
  std::vector<int64_t> shape;
  std::vector<int64_t> factor_sizes;
  at::ScalarType math;
  double step;
  bool operator==(const BatchKey& o) const {
    return shape == o.shape && factor_sizes == o.factor_sizes && math == o.math && step == o.step;
  }
};

}  // namespace

SoapLayout soap_layout(at::IntArrayRef param_shape, int64_t max_precond_dim, bool merge_dims, bool precondition_1d,
                       c10::string_view data_format) {
  SoapLayout layout;
  const std::vector<int64_t> shape = param_shape.vec();
  if (shape.size() == 1) {
    // A vector is preconditioned only on request (and if small enough).
    layout.shape = shape;
    layout.factor_sizes = {precondition_1d && shape[0] <= max_precond_dim ? shape[0] : 0};
    return layout;
  }
  layout.shape = merge_dims ? merged_shape(shape, max_precond_dim, data_format) : shape;
  for (const int64_t d : layout.shape) {
    layout.factor_sizes.push_back(d <= max_precond_dim ? d : 0);
  }
  return layout;
}

void soap_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList GGs, at::TensorList Qs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                double beta2, double shampoo_beta, double eps, double weight_decay, int64_t precondition_frequency,
                int64_t max_precond_dim, bool merge_dims, bool precondition_1d, bool normalize_grads,
                c10::string_view data_format, bool correct_bias, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                std::optional<bool> batch_equal_shapes) {
  constexpr const char* op = "soap_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "betas[0]", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  check_common(op, beta2, shampoo_beta, max_precond_dim, data_format);
  check_hyperparameter(op, "eps", eps, eps >= 0.0, ">= 0");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "precondition_frequency", static_cast<double>(precondition_frequency),
                       precondition_frequency >= 1, ">= 1");
  common::check_params_and_grads(op, params, grads);
  // SOAP branches on the step on the host (the preconditioner's first call,
  // refresh steps) and its eigh / QR read LAPACK's status there anyway, so on
  // CUDA it takes host counters and a host lr (the Python class creates them
  // on the CPU). Checked before anything is incremented.
  if (!params.empty() && params[0].is_cuda()) {
    TORCH_CHECK_VALUE(!lr.is_cuda() && (state_steps.empty() || !state_steps[0].is_cuda()), op,
                      ": on CUDA, lr and state_steps must be CPU tensors (the step decides the preconditioner's "
                      "refreshes on the host)");
  }
  const auto layouts = check_factors(op, params, GGs, Qs, max_precond_dim, merge_dims, precondition_1d, data_format);
  auto group =
      common::prepare_elementwise_group<2>(op, params, grads, {{{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}},
                                           state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  const double beta_s = shampoo_beta_of(shampoo_beta, beta2);
  const size_t n = group->params.size();
  for (auto& grad : group->grads) {
    detail::unscale_grad(grad, group->amp.grad_scale, group->device.grad_scale);
  }
  // The update of param i: bias-corrected step size, normalization, decay.
  auto apply_update = [&](size_t i, at::Tensor update, double t) {
    at::Tensor& param = group->params[i];
    // eps on the uncorrected sqrt(v); the bias corrections fold into the step size.
    double step_size = group->lr;
    if (correct_bias) {
      step_size *= std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t));
    }
    if (normalize_grads) {
      update = update / (update.square().mean().sqrt() + 1e-30);
    }
    update = update.reshape(param.sizes());
    if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
      // (p - s U)(1 - lr wd) in one rounding of the fp32 result.
      const double decay = weight_decay > 0.0 ? 1.0 - group->lr * weight_decay : 1.0;
      if (param.is_cuda()) {
        detail::apply_fixed_update_cuda(param, update, decay, -step_size * decay, detail::MatrixScalars{0.0, {}, t, {}},
                                        stochastic_rounding, seed, static_cast<int64_t>(i));
      } else {
        const uint64_t stream = kernels::cpu::rounding_stream(seed, static_cast<int64_t>(i), t);
        kernels::cpu::muon_apply_update_reduced(param, update, decay, -step_size * decay, stochastic_rounding, stream);
      }
    } else {
      param.add_(update, -step_size);
      if (weight_decay > 0.0) {
        param.add_(param, -group->lr * weight_decay);  // decoupled, on the updated param
      }
    }
  };
  // One param on its own.
  auto step_one = [&](size_t i) {
    at::Tensor& param = group->params[i];
    at::Tensor& grad = group->grads[i];
    const auto& layout = layouts[i];
    const auto math = factor_dtype(param);
    const auto ggs = factor_views(GGs[i], layout);
    auto qs = factor_views(Qs[i], layout);
    at::Tensor& exp_avg_state = group->state[0][i];
    at::Tensor& exp_avg_sq_state = group->state[1][i];
    // fp32 math for reduced-precision storage (`to` is a no-op otherwise, so
    // the in-place updates land in the state directly).
    const at::Tensor g = grad.to(math).reshape(layout.shape);
    if (group->steps[i] == 0.0) {
      // The step was -1: this call only builds the preconditioner (no update).
      init_preconditioner(g, layout, ggs, qs, beta_s);
      return;
    }
    at::Tensor m = exp_avg_state.to(math).reshape(layout.shape);
    at::Tensor v = exp_avg_sq_state.to(math).reshape(layout.shape);

    const at::Tensor g_rot = project(g, qs);
    const double t = group->steps[i];
    m.mul_(beta1).add_(g_rot, 1.0 - beta1);
    v.mul_(beta2).add_(g_rot.square(), 1.0 - beta2);
    apply_update(i, project_back(adam_direction(m, v, eps), qs), t);

    // Preconditioner: EMA of the Grams of the raw gradient; on refresh steps
    // one QR power iteration per factor, v permuted to the new eigenvalue
    // order and m re-rotated (unrotated with the old Q first). Between
    // refreshes Q is unchanged, so m needs no round trip.
    for (size_t k = 0; k < ggs.size(); ++k) {
      if (ggs[k].defined()) {
        ggs[k].lerp_(gram(g, static_cast<int64_t>(k), layout.factor_sizes[k]), 1.0 - beta_s);
      }
    }
    const bool refresh = std::fmod(t, static_cast<double>(precondition_frequency)) == 0.0;
    if (refresh && layout.factor_numel() > 0) {
      const at::Tensor m_unrotated = project_back(m, qs);
      for (size_t k = 0; k < ggs.size(); ++k) {
        if (!ggs[k].defined()) {
          continue;
        }
        const at::Tensor l32 = ggs[k].to(at::kFloat);
        const at::Tensor q32 = qs[k].to(at::kFloat);
        // One matmul serves both: diag(Q^T L Q) = column sums of Q * (L Q), and
        // L (Q P) = (L Q) P for the permutation P. Formed as its transpose
        // Q^T L (L is symmetric): the rows of Q^T L picked by the order are
        // L Q P in LAPACK's column-major layout, so the QR reads them without
        // a transposing copy.
        const at::Tensor q_t = q32.t().contiguous();  // blocked transpose: the product below reads rows
        const at::Tensor lq_t = at::mm(q_t, l32);
        const at::Tensor estimate = (q_t * lq_t).sum(1);
        const at::Tensor order = at::argsort(estimate, /*dim=*/0, /*descending=*/true);
        v = v.index_select(static_cast<int64_t>(k), order);
        qs[k].copy_(qr_q(lq_t.index_select(0, order).t()));
      }
      m = project(m_unrotated, qs);
    }
    // Write back what is not already in the state (new tensors, or math-dtype
    // copies of reduced-precision state).
    if (!m.is_same(exp_avg_state) && m.data_ptr() != exp_avg_state.data_ptr()) {
      exp_avg_state.copy_(m.reshape(exp_avg_state.sizes()));
    }
    if (!v.is_same(exp_avg_sq_state) && v.data_ptr() != exp_avg_sq_state.data_ptr()) {
      exp_avg_sq_state.copy_(v.reshape(exp_avg_sq_state.sizes()));
    }
  };

  // Params with equal layouts and steps at once: the same math with a leading
  // batch axis (bmm, batched eigh / QR). eigh / QR may pick other signs than
  // the per-tensor calls; SOAP is invariant to a column's sign (it rotates
  // and rotates back with the same Q, and v depends on squares only).
  auto step_batch = [&](const std::vector<size_t>& members) {
    const auto& layout = layouts[members[0]];
    const auto math = factor_dtype(group->params[members[0]]);
    const double t = group->steps[members[0]];
    const auto count = static_cast<int64_t>(members.size());
    const size_t dims = layout.factor_sizes.size();
    std::vector<at::Tensor> g_list;
    std::vector<std::vector<at::Tensor>> gg_views(dims);
    std::vector<std::vector<at::Tensor>> q_views(dims);
    for (const size_t i : members) {
      g_list.push_back(group->grads[i].to(math).reshape(layout.shape));
      const auto ggs = factor_views(GGs[i], layout);
      const auto qs = factor_views(Qs[i], layout);
      for (size_t k = 0; k < dims; ++k) {
        gg_views[k].push_back(ggs[k]);
        q_views[k].push_back(qs[k]);
      }
    }
    const at::Tensor g = at::stack(g_list);
    std::vector<at::Tensor> ggs(dims);
    std::vector<at::Tensor> qs(dims);
    for (size_t k = 0; k < dims; ++k) {
      if (layout.factor_sizes[k] > 0) {
        ggs[k] = at::stack(gg_views[k]);
        qs[k] = at::stack(q_views[k]);
      }
    }
    // Copies the stacked factors back into each param's flat GG / Q.
    auto write_factors = [&](bool gg_too) {
      for (size_t k = 0; k < dims; ++k) {
        for (int64_t b = 0; ggs[k].defined() && b < count; ++b) {
          if (gg_too) {
            gg_views[k][b].copy_(ggs[k][b]);
          }
          q_views[k][b].copy_(qs[k][b]);
        }
      }
    };
    if (t == 0.0) {
      for (size_t k = 0; k < dims; ++k) {
        if (ggs[k].defined()) {
          const auto d = layout.factor_sizes[k];
          ggs[k] = at::zeros_like(ggs[k]).lerp_(gram_batched(g, static_cast<int64_t>(k), d), 1.0 - beta_s);
          qs[k] = descending_eigenvectors_batched(ggs[k]).to(qs[k].scalar_type());
        }
      }
      write_factors(true);
      return;
    }
    std::vector<at::Tensor> m_list;
    std::vector<at::Tensor> v_list;
    for (const size_t i : members) {
      m_list.push_back(group->state[0][i].to(math).reshape(layout.shape));
      v_list.push_back(group->state[1][i].to(math).reshape(layout.shape));
    }
    at::Tensor m = at::stack(m_list);
    at::Tensor v = at::stack(v_list);
    const at::Tensor g_rot = project_batched(g, qs);
    m.mul_(beta1).add_(g_rot, 1.0 - beta1);
    v.mul_(beta2).add_(g_rot.square(), 1.0 - beta2);
    const at::Tensor update = project_back_batched(adam_direction(m, v, eps), qs);
    for (int64_t b = 0; b < count; ++b) {
      apply_update(members[b], update[b], t);
    }
    for (size_t k = 0; k < dims; ++k) {
      if (ggs[k].defined()) {
        ggs[k].lerp_(gram_batched(g, static_cast<int64_t>(k), layout.factor_sizes[k]), 1.0 - beta_s);
      }
    }
    const bool refresh = std::fmod(t, static_cast<double>(precondition_frequency)) == 0.0;
    if (refresh) {
      const at::Tensor m_unrotated = project_back_batched(m, qs);
      for (size_t k = 0; k < dims; ++k) {
        if (!ggs[k].defined()) {
          continue;
        }
        const at::Tensor l32 = ggs[k].to(at::kFloat);
        const at::Tensor q32 = qs[k].to(at::kFloat);
        // As the per-tensor path: (L Q)^T = Q^T L, whose picked rows are L Q P column-major.
        const at::Tensor q_t = q32.transpose(1, 2).contiguous();
        const at::Tensor lq_t = at::bmm(q_t, l32);
        const at::Tensor estimate = (q_t * lq_t).sum(2);                                 // (B, d)
        const at::Tensor order = at::argsort(estimate, /*dim=*/1, /*descending=*/true);  // per entry
        // v's dim k (axis k + 1 here) permuted per entry: the order broadcast over the other axes.
        std::vector<int64_t> index_shape(static_cast<size_t>(v.dim()), 1);
        index_shape[0] = count;
        index_shape[k + 1] = layout.factor_sizes[k];
        v = at::take_along_dim(v, order.view(index_shape), static_cast<int64_t>(k) + 1);
        const at::Tensor columns = at::take_along_dim(lq_t, order.unsqueeze(2), 1).transpose(1, 2);
        qs[k] = qr_q(columns).to(qs[k].scalar_type());
      }
      m = project_batched(m_unrotated, qs);
    }
    write_factors(true);
    for (int64_t b = 0; b < count; ++b) {
      const size_t i = members[b];
      group->state[0][i].copy_(m[b].reshape(group->state[0][i].sizes()));
      group->state[1][i].copy_(v[b].reshape(group->state[1][i].sizes()));
    }
  };

  // Batches: equal layout, math dtype and step (in first-seen order).
  std::vector<BatchKey> keys;
  std::vector<std::vector<size_t>> batches;
  for (size_t i = 0; i < n; ++i) {
    BatchKey key{layouts[i].shape, layouts[i].factor_sizes, factor_dtype(group->params[i]), group->steps[i]};
    const auto it = std::find(keys.begin(), keys.end(), key);
    if (it == keys.end()) {
      keys.push_back(std::move(key));
      batches.push_back({i});
    } else {
      batches[static_cast<size_t>(it - keys.begin())].push_back(i);
    }
  }
  // Work units: a batch, or one param on the per-tensor path. A unit writes
  // only its members' param and state, and its draws (stochastic rounding)
  // are keyed by param index and step, so units may run in any order.
  struct Unit {
    std::vector<size_t> members;
    bool batched;
  };
  std::vector<Unit> units;
  for (const auto& batch : batches) {
    // A batch pays off only with matrix factors and two or more members; the
    // rest keep the per-tensor path (bitwise as before batching). Vectors
    // (precondition_1d) stay per tensor: their rank-deficient Grams leave the
    // eigenbasis of the null space to rounding noise, which the batched
    // products would reorder (equally valid, but not the per-tensor result).
    const auto& layout = layouts[batch[0]];
    // Unset: Kron's rule (common::psgd::prefer_batched): always on CUDA; on the
    // CPU, where a batched eigh / bmm of large matrices is slower than a loop
    // (12 x 512^2: 0.87x), only for small params.
    const bool batched =
        batch_equal_shapes.value_or(common::psgd::prefer_batched(params[batch[0]].device(), params[batch[0]].numel()));
    if (batched && batch.size() > 1 && layout.factor_numel() > 0 && layout.shape.size() >= 2) {
      units.push_back({batch, true});
    } else {
      for (const size_t i : batch) {
        units.push_back({{i}, false});
      }
    }
  }
  std::vector<double> costs;
  for (const auto& unit : units) {
    const size_t i = unit.members[0];
    costs.push_back(static_cast<double>(unit.members.size()) *
                    soap_unit_cost(layouts[i], group->steps[i], precondition_frequency));
  }
  // On a multi-threaded CPU the units run side by side, one thread each
  // (CUDA and one thread: in order, as before).
  common::run_side_by_side(costs, !group->params[0].is_cuda(), [&](size_t u) {
    if (units[u].batched) {
      step_batch(units[u].members);
    } else {
      step_one(units[u].members[0]);
    }
  });
  group->finish();
}

}  // namespace torchopt_ext::functional
