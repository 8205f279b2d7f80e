#include "torchopt_ext/functional/matrix_owner.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "common/tensor_lists.h"
#include "functional/matrix_parts.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/functional/muon.h"
#include "torchopt_ext/functional/prism.h"

namespace torchopt_ext::functional {

namespace detail {

MuonMomentum muon_momentum(const at::Tensor& grad, at::Tensor& buffer, double momentum, bool nesterov, bool maximize) {
  // In the buffer's dtype (fp32 buffers give fp32 math for bf16 params).
  at::Tensor g = grad.to(buffer.scalar_type());
  if (maximize) {
    g = g.neg();
  }
  buffer.lerp_(g, 1.0 - momentum);
  at::Tensor input = nesterov ? g.lerp(buffer, momentum) : buffer;
  return {g, input};
}

PrismMomentum prism_momentum(const at::Tensor& grad, at::Tensor& buffer, const PrismOptions& options, double raw_scale,
                             int64_t seed, int64_t index, double step) {
  const double b1 = options.b1;
  // Momentum math in float32 (float64 for float64 state), whatever the storage.
  const auto math = buffer.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor g = grad.to(math);
  if (options.maximize) {
    g = g.neg();
  }
  const at::Tensor raw_g = g;  // Magma's cosine uses the grad before any clipping
  if (raw_scale != 1.0) {
    g = g * raw_scale;
  }
  const at::Tensor m_prev = buffer.to(math);
  const at::Tensor m = options.ema ? at::lerp(m_prev, g, 1.0 - b1) : g + b1 * m_prev;
  // Store the new momentum (bf16: stochastic rounding, as rollfast).
  if (buffer.scalar_type() == at::kBFloat16) {
    const uint64_t stream = kernels::cpu::rounding_stream(seed ^ 0x5052534D, index, step);
    kernels::cpu::muon_apply_update_reduced(buffer, m.contiguous(), 0.0, 1.0, true, stream);
  } else {
    buffer.copy_(m);
  }
  at::Tensor target;
  if (options.nesterov && options.shape_nesterov) {
    if (options.bias_correction && options.ema) {
      target = nesterov_bias_corrected(m, g, b1, step);
    } else {
      // Nesterov look-ahead: ema beta m + (1 - beta) g, heavy-ball beta m + g.
      target = options.ema ? at::lerp(g, m, b1) : m * b1 + g;
    }
  } else if (!options.nesterov && options.bias_correction && options.ema) {
    target = m / (1.0 - std::pow(b1, step));
  } else {
    target = m;
  }
  return {raw_g, g, m, target, g - m};
}

at::Tensor nesterov_bias_corrected(const at::Tensor& m, const at::Tensor& g, double beta, double t) {
  return m * (beta / (1.0 - std::pow(beta, t + 1.0))) + g * ((1.0 - beta) / (1.0 - std::pow(beta, t)));
}

at::Tensor prism_shape(const at::Tensor& M, const at::Tensor& D, const at::Tensor& grad, const PrismOptions& options,
                       const PrismShaping& shaping) {
  const auto math = M.scalar_type();
  const int64_t cols = M.size(-1);
  const bool batched = M.dim() == 3;
  at::Tensor update;
  if (shaping.bidirectional) {
    const auto dtype = shaping.ns_dtype.value_or(math);
    auto shape = [&](const at::Tensor& m2, const at::Tensor& d2) {
      return prism_bidirectional(m2.to(dtype), d2.to(dtype), shaping.gamma_l, shaping.gamma_r, shaping.inv_steps,
                                 shaping.inv_eps, shaping.inv_scale, shaping.eps_gram);
    };
    if (batched) {
      std::vector<at::Tensor> outs;
      for (int64_t b = 0; b < M.size(0); ++b) {
        outs.push_back(shape(M.select(0, b), D.select(0, b)));
      }
      update = outs.empty() ? at::empty_like(M, M.options().dtype(dtype)) : at::stack(outs);
    } else {
      update = shape(M, D);
    }
  } else {
    // [M, gamma D] along the input features (reduction axes); the first `cols` columns.
    update = common::newton_schulz(at::cat({M, D * shaping.gamma}, -1), shaping.ns).narrow(-1, 0, cols);
  }
  update = update.to(math);
  if (options.nesterov && !options.shape_nesterov) {
    TORCH_CHECK_VALUE(grad.defined(), "prism_shape: the look-ahead after shaping needs the grad");
    update = options.ema ? at::lerp(grad, update, options.b1) : update * options.b1 + grad;
  }
  if (shaping.post_clip) {
    if (batched) {  // per matrix: a spec'd param's matrices are clipped independently
      for (int64_t b = 0; b < update.size(0); ++b) {
        at::Tensor slice = update.select(0, b);
        common::clip_update_per_tensor_rms_(slice, *shaping.post_clip);
      }
    } else {
      common::clip_update_per_tensor_rms_(update, *shaping.post_clip);
    }
  }
  return update;
}

void apply_matrix_update(at::Tensor& param, const at::Tensor& update, double lr, double multiplier, double weight_decay,
                         double lr_scale, bool stochastic_rounding, int64_t seed, int64_t index, double step) {
  // Decoupled decay with the unscaled lr, then the scaled step; Magma's
  // multiplier scales both (decay folded into the masked update).
  const double decay = 1.0 - lr * multiplier * weight_decay;
  const double alpha = -lr * multiplier * lr_scale;
  if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
    const uint64_t stream = kernels::cpu::rounding_stream(seed, index, step);
    kernels::cpu::muon_apply_update_reduced(param, update.reshape(param.sizes()).contiguous(), decay, alpha,
                                            stochastic_rounding, stream);
  } else {
    param.mul_(decay);
    param.add_(update.reshape(param.sizes()).to(param.scalar_type()), alpha);
  }
}

}  // namespace detail

namespace {

void check_grads_and_buffers(const char* op, at::TensorList grads, at::TensorList buffers, at::TensorList state_steps) {
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK_VALUE(grads[i].defined() && grads[i].layout() == at::kStrided && grads[i].is_cpu(), op, ": grads[", i,
                      "] must be a dense CPU tensor");
  }
  common::check_state_list(op, "momentum_buffers", grads, buffers);
  common::check_scalar_list(op, "state_steps", grads, state_steps);
}

double read_grad_scale(const char* op, const std::optional<at::Tensor>& grad_scale) {
  const auto amp = common::read_amp(op, grad_scale, std::nullopt);
  return amp.grad_scale.value_or(1.0);
}

// One output per grad, its shape, the buffer's dtype (math: its math dtype).
void check_outputs(const char* op, const char* name, at::TensorList grads, at::TensorList outputs,
                   at::TensorList buffers, bool math) {
  TORCH_CHECK_VALUE(outputs.size() == grads.size(), op, ": ", name, " must have one tensor per grad (", grads.size(),
                    "), got ", outputs.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto buffer_type = buffers[i].scalar_type();
    const auto dtype = !math ? buffer_type : (buffer_type == at::kDouble ? at::kDouble : at::kFloat);
    TORCH_CHECK_VALUE(outputs[i].sizes() == grads[i].sizes() && outputs[i].scalar_type() == dtype, op, ": ", name, "[",
                      i, "] must have shape ", grads[i].sizes(), " and dtype ", dtype, ", got ", outputs[i].sizes(),
                      " and ", outputs[i].scalar_type());
  }
}

void check_sums(const char* op, at::TensorList grads, const at::Tensor& sums, bool use_magma) {
  if (use_magma) {
    TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == static_cast<int64_t>(grads.size()) && sums.size(1) == 3 &&
                          sums.scalar_type() == at::kDouble,
                      op, ": use_magma needs float64 magma_sums of shape (", grads.size(), ", 3), got ", sums.sizes(),
                      " ", sums.scalar_type());
  }
}

}  // namespace

void muon_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList state_steps,
                    at::TensorList ns_inputs, const at::Tensor& magma_sums, double momentum, bool nesterov,
                    bool maximize, bool use_magma, const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "muon_momentum_";
  common::check_hyperparameter(op, "momentum", momentum, momentum >= 0.0 && momentum < 1.0, "in [0, 1)");
  check_grads_and_buffers(op, grads, momentum_buffers, state_steps);
  check_outputs(op, "ns_inputs", grads, ns_inputs, momentum_buffers, false);
  check_sums(op, grads, magma_sums, use_magma);
  const double scale = read_grad_scale(op, grad_scale);
  common::increment_steps(state_steps);
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor grad = grads[i];
    if (grad_scale) {
      grad.div_(scale);
    }
    at::Tensor buffer = momentum_buffers[i];
    auto parts = detail::muon_momentum(grad, buffer, momentum, nesterov, maximize);
    ns_inputs[i].copy_(parts.ns_input);
    if (use_magma) {
      magma_sums[static_cast<int64_t>(i)].copy_(common::magma_sums(parts.grad, buffer));
    }
  }
}

void prism_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList state_steps,
                     at::TensorList targets, at::TensorList innovations, at::TensorList lookahead_grads,
                     const at::Tensor& magma_sums, double b1, bool nesterov, bool shape_nesterov, bool bias_correction,
                     c10::string_view momentum_accumulator, bool maximize, bool use_magma, int64_t seed,
                     const std::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "prism_momentum_";
  common::check_hyperparameter(op, "b1", b1, b1 >= 0.0 && b1 < 1.0, "in [0, 1)");
  TORCH_CHECK_VALUE(momentum_accumulator == "ema" || momentum_accumulator == "heavy_ball", op,
                    ": momentum_accumulator must be 'ema' or 'heavy_ball', got '", momentum_accumulator, "'");
  check_grads_and_buffers(op, grads, momentum_buffers, state_steps);
  check_outputs(op, "targets", grads, targets, momentum_buffers, true);
  check_outputs(op, "innovations", grads, innovations, momentum_buffers, true);
  const bool lookahead = nesterov && !shape_nesterov;
  if (lookahead) {
    check_outputs(op, "lookahead_grads", grads, lookahead_grads, momentum_buffers, true);
  } else {
    TORCH_CHECK_VALUE(lookahead_grads.empty(), op,
                      ": lookahead_grads must be empty unless nesterov and not shape_nesterov");
  }
  check_sums(op, grads, magma_sums, use_magma);
  const detail::PrismOptions options{b1,      momentum_accumulator == "ema", nesterov, shape_nesterov, bias_correction,
                                     maximize};
  const double scale = read_grad_scale(op, grad_scale);
  const auto steps = common::increment_steps(state_steps);
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor grad = grads[i];
    if (grad_scale) {
      grad.div_(scale);
    }
    at::Tensor buffer = momentum_buffers[i];
    auto parts = detail::prism_momentum(grad, buffer, options, 1.0, seed, static_cast<int64_t>(i), steps[i]);
    targets[i].copy_(parts.target);
    innovations[i].copy_(parts.innovation);
    if (lookahead) {
      lookahead_grads[i].copy_(parts.grad);
    }
    if (use_magma) {
      magma_sums[static_cast<int64_t>(i)].copy_(common::magma_sums(parts.raw_grad, parts.moment));
    }
  }
}

at::Tensor prism_shape(const at::Tensor& target, const at::Tensor& innovation, const std::optional<at::Tensor>& grad,
                       double b1, double gamma, int64_t ns_iters, at::ArrayRef<double> ns_coeffs, c10::string_view mode,
                       c10::string_view preconditioning, int64_t inv_steps, double inv_eps, double inv_scale,
                       double eps_gram, std::optional<double> gamma_l, std::optional<double> gamma_r, bool nesterov,
                       bool shape_nesterov, c10::string_view momentum_accumulator,
                       at::ArrayRef<double> grad_clip_max_amps, std::optional<at::ScalarType> ns_dtype) {
  constexpr const char* op = "prism_shape";
  TORCH_CHECK_VALUE(target.dim() == 2 && innovation.sizes() == target.sizes(), op,
                    ": target and innovation must be (rows, cols) matrices of one shape, got ", target.sizes(), " and ",
                    innovation.sizes());
  TORCH_CHECK_VALUE(momentum_accumulator == "ema" || momentum_accumulator == "heavy_ball", op,
                    ": momentum_accumulator must be 'ema' or 'heavy_ball', got '", momentum_accumulator, "'");
  const detail::PrismOptions options{b1, momentum_accumulator == "ema", nesterov, shape_nesterov, false, false};
  const auto shaping =
      detail::make_prism_shaping(op, gamma, ns_iters, ns_coeffs, "", mode, preconditioning, inv_steps, inv_eps,
                                 inv_scale, eps_gram, gamma_l, gamma_r, grad_clip_max_amps, ns_dtype);
  at::Tensor g;
  if (grad) {
    TORCH_CHECK_VALUE(grad->sizes() == target.sizes(), op, ": grad has shape ", grad->sizes(), " but target has ",
                      target.sizes());
    g = *grad;
  }
  // Contiguous: the narrowed NS result is a strided view.
  return detail::prism_shape(target, innovation, g, options, shaping).contiguous();
}

void matrix_apply_(at::TensorList params, at::TensorList updates, at::TensorList magma_scores,
                   at::TensorList state_steps, const at::Tensor& lr, double weight_decay, at::IntArrayRef matrix_sizes,
                   c10::string_view adjust_lr_fn, const std::optional<at::Tensor>& magma_sums, bool use_magma,
                   double magma_p, double magma_tau, bool stochastic_rounding, int64_t seed) {
  constexpr const char* op = "matrix_apply_";
  common::check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  const bool scaled = adjust_lr_fn != "none";
  if (scaled) {
    muon_lr_scale(adjust_lr_fn, 1, 1);  // validates the name
  }
  const size_t n = params.size();
  TORCH_CHECK_VALUE(updates.size() == n, op, ": updates must have one tensor per param (", n, "), got ",
                    updates.size());
  TORCH_CHECK_VALUE(matrix_sizes.size() == 2 * n, op, ": matrix_sizes must hold (rows, cols) per param (", 2 * n,
                    " values), got ", matrix_sizes.size());
  common::check_scalar_list(op, "state_steps", params, state_steps);
  const common::MagmaOptions magma{magma_p, magma_tau, seed};
  common::check_magma_options(op, magma);
  if (use_magma) {
    common::check_scalar_list(op, "magma_scores", params, magma_scores);
    TORCH_CHECK_VALUE(magma_sums && magma_sums->dim() == 2 && magma_sums->size(0) == static_cast<int64_t>(n) &&
                          magma_sums->size(1) == 3,
                      op, ": use_magma needs magma_sums of shape (", n, ", 3)");
  } else {
    TORCH_CHECK_VALUE(magma_scores.empty(), op, ": magma_scores must be empty without use_magma");
  }
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].defined() && params[i].is_cpu() && params[i].is_floating_point(), op, ": params[", i,
                      "] must be a floating CPU tensor");
    TORCH_CHECK_VALUE(updates[i].numel() == params[i].numel(), op, ": updates[", i, "] has ", updates[i].numel(),
                      " elements but params[", i, "] has ", params[i].numel());
  }
  const double lr_value = common::read_lr(op, lr);
  common::DenseWorkspace workspace;
  auto dense = workspace.dense(params, /*write_back=*/true);
  for (size_t i = 0; i < n; ++i) {
    const double step = state_steps[i].item<double>();
    double multiplier = 1.0;
    if (use_magma) {
      at::Tensor score = magma_scores[i];
      const bool keep = common::magma_keep(magma, static_cast<int64_t>(i), step);
      // Host read of a CPU scalar: no device sync (the functional is CPU-only).
      multiplier = common::magma_multiplier_from_sums((*magma_sums)[static_cast<int64_t>(i)], score, keep, magma_tau)
                       .item<double>();
    }
    const double scale = scaled ? muon_lr_scale(adjust_lr_fn, matrix_sizes[2 * i], matrix_sizes[2 * i + 1]) : 1.0;
    detail::apply_matrix_update(dense[i], updates[i], lr_value, multiplier, weight_decay, scale, stochastic_rounding,
                                seed, static_cast<int64_t>(i), step);
  }
  workspace.finish();
}

}  // namespace torchopt_ext::functional
