#include "torchopt_ext/functional/matrix_owner.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "common/tensor_lists.h"
#include "functional/matrix_parts.h"
#include "kernels/algos/matrix_apply.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cuda/matrix.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/functional/muon.h"
#include "torchopt_ext/functional/prism.h"

#if defined(TORCHOPT_EXT_WITH_CUDA)
#define TORCHOPT_EXT_CUDA_NOTE " or tensors on one CUDA device"
#else
#define TORCHOPT_EXT_CUDA_NOTE " only (built without CUDA kernels)"
#endif

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
                             int64_t seed, int64_t index, double step, const at::Tensor& step_device) {
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
  constexpr int64_t kMomentumSalt = 0x5052534D;
  if (buffer.scalar_type() == at::kBFloat16 && buffer.is_cuda()) {
    apply_fixed_update_cuda(buffer, m, 0.0, 1.0, MatrixScalars{0.0, {}, step, step_device}, true, seed ^ kMomentumSalt,
                            index);
  } else if (buffer.scalar_type() == at::kBFloat16) {
    const uint64_t stream = kernels::cpu::rounding_stream(seed ^ kMomentumSalt, index, step);
    kernels::cpu::muon_apply_update_reduced(buffer, m.contiguous(), 0.0, 1.0, true, stream);
  } else {
    buffer.copy_(m);
  }
  // CUDA counters: the bias corrections from the device step (no host read).
  const bool device_step = step_device.defined();
  at::Tensor target;
  if (options.nesterov && options.shape_nesterov) {
    if (options.bias_correction && options.ema) {
      target = device_step ? nesterov_bias_corrected(m, g, b1, step_device.to(at::kDouble).reshape({}))
                           : nesterov_bias_corrected(m, g, b1, step);
    } else {
      // Nesterov look-ahead: ema beta m + (1 - beta) g, heavy-ball beta m + g.
      target = options.ema ? at::lerp(g, m, b1) : m * b1 + g;
    }
  } else if (!options.nesterov && options.bias_correction && options.ema) {
    target =
        device_step ? m / one_minus_power(b1, step_device.to(at::kDouble).reshape({})) : m / (1.0 - std::pow(b1, step));
  } else {
    target = m;
  }
  return {raw_g, g, m, target, g - m};
}

at::Tensor nesterov_bias_corrected(const at::Tensor& m, const at::Tensor& g, double beta, double t) {
  return m * (beta / (1.0 - std::pow(beta, t + 1.0))) + g * ((1.0 - beta) / (1.0 - std::pow(beta, t)));
}

at::Tensor one_minus_power(double beta, const at::Tensor& t) { return at::pow(beta, t).neg_().add_(1.0); }

at::Tensor nesterov_bias_corrected(const at::Tensor& m, const at::Tensor& g, double beta, const at::Tensor& t) {
  // The host formula's coefficients in float64 on the device; the 0-d
  // coefficients do not promote m / g (they are rounded to m's dtype as the
  // host doubles are).
  const at::Tensor c_m = at::full_like(t, beta) / one_minus_power(beta, t + 1.0);
  const at::Tensor c_g = at::full_like(t, 1.0 - beta) / one_minus_power(beta, t);
  return m * c_m + g * c_g;
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
  const auto [decay, alpha] = kernels::matrix_apply_factors(lr, multiplier, weight_decay, lr_scale);
  if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
    const uint64_t stream = kernels::cpu::rounding_stream(seed, index, step);
    kernels::cpu::muon_apply_update_reduced(param, update.reshape(param.sizes()).contiguous(), decay, alpha,
                                            stochastic_rounding, stream);
  } else {
    param.mul_(decay);
    param.add_(update.reshape(param.sizes()).to(param.scalar_type()), alpha);
  }
}

at::Tensor MatrixScalars::step_tensor() const { return step_device.to(at::kDouble).reshape({}); }

bool begin_cuda_matrix_step(const common::DeviceArgs& device) {
  if (device.found_inf.defined() && device.found_inf.item<double>() != 0.0) {
    return false;
  }
  if (!device.steps.empty()) {
    at::_foreach_add_(device.steps, 1.0);
  }
  return true;
}

void unscale_grad(at::Tensor& grad, const std::optional<double>& host_scale, const at::Tensor& device_scale) {
  if (host_scale) {
    grad.div_(*host_scale);
  } else if (device_scale.defined()) {
    grad.div_(device_scale);
  }
}

#if defined(TORCHOPT_EXT_WITH_CUDA)
namespace {
// The update in the math dtype, as the CPU path converts it (a no-op for an
// fp32 update of an fp32 param).
at::Tensor math_update(const at::Tensor& param, const at::Tensor& update) {
  return update.to(param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

kernels::cuda::MatrixApplyScalars kernel_scalars(const MatrixScalars& s, bool stochastic_rounding, int64_t seed,
                                                 int64_t index) {
  kernels::cuda::MatrixApplyScalars k;
  k.lr = s.lr;
  k.lr_device = s.lr_device;
  k.step = s.step;
  k.step_device = s.step_device;
  k.stochastic_rounding = stochastic_rounding;
  k.rounding_seed = seed;
  k.index = index;
  return k;
}
}  // namespace
#endif

void apply_matrix_update_cuda(at::Tensor& param, const at::Tensor& update, const MatrixScalars& scalars,
                              const at::Tensor& magma_score, const common::MagmaOptions& magma, double weight_decay,
                              double lr_scale, bool stochastic_rounding, int64_t seed, int64_t index) {
#if defined(TORCHOPT_EXT_WITH_CUDA)
  auto k = kernel_scalars(scalars, stochastic_rounding, seed, index);
  k.weight_decay = weight_decay;
  k.lr_scale = lr_scale;
  k.magma_score = magma_score;
  k.magma_p = magma.p;
  k.magma_seed = magma.seed;
  kernels::cuda::matrix_apply_update(param, math_update(param, update), k);
#else
  TORCH_CHECK(false, "apply_matrix_update_cuda: this build of torchopt_ext has no CUDA kernels");
#endif
}

void apply_fixed_update_cuda(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                             const MatrixScalars& scalars, bool stochastic_rounding, int64_t seed, int64_t index) {
#if defined(TORCHOPT_EXT_WITH_CUDA)
  auto k = kernel_scalars(scalars, stochastic_rounding, seed, index);
  k.fixed = true;
  k.decay = decay;
  k.alpha = alpha;
  kernels::cuda::matrix_apply_update(param, math_update(param, update), k);
#else
  TORCH_CHECK(false, "apply_fixed_update_cuda: this build of torchopt_ext has no CUDA kernels");
#endif
}

namespace {
// Runs `update(score_on_device)`; a CPU score is updated on `device` and copied back (one sync).
template <typename F>
at::Tensor on_device_score(const at::Tensor& score, const at::Device& device, F update) {
  if (score.device() == device) {
    at::Tensor s = score;
    return update(s);
  }
  at::Tensor s = score.to(device);
  at::Tensor out = update(s);
  at::Tensor(score).copy_(s);
  return out;
}
}  // namespace

at::Tensor magma_score_cuda(const at::Tensor& grad, const at::Tensor& moment, const at::Tensor& score, double tau) {
  return on_device_score(score, grad.device(), [&](at::Tensor& s) {
    // keep = true: the draw is made in the apply kernel from the device step.
    return common::magma_multiplier(grad, moment, s, /*keep=*/true, tau);
  });
}

at::Tensor magma_score_from_sums_cuda(const at::Tensor& sums, const at::Tensor& score, double tau,
                                      const at::Device& device) {
  return on_device_score(score, device, [&](at::Tensor& s) {
    return common::magma_multiplier_from_sums(sums.to(device), s, /*keep=*/true, tau);
  });
}

void check_magma_scores(const char* op, at::TensorList params, at::TensorList scores) {
  if (params.empty() || !params[0].is_cuda()) {
    common::check_scalar_list(op, "magma_scores", params, scores);
    return;
  }
  TORCH_CHECK_VALUE(scores.size() == params.size(), op, ": magma_scores must have one tensor per param (",
                    params.size(), "), got ", scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    const auto& s = scores[i];
    TORCH_CHECK_VALUE(s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat &&
                          (s.is_cpu() || s.device() == params[i].device()),
                      op, ": magma_scores[", i, "] must be a one-element float32 tensor on the CPU or on ",
                      params[i].device());
  }
}

}  // namespace detail

namespace {

// Step counters: one-element float32/float64 CPU tensors, or (CUDA tensors)
// float32 counters on their device. Returns whether they are on the device.
bool check_step_list(const char* op, at::TensorList tensors, at::TensorList state_steps) {
  if (tensors.empty() || !tensors[0].is_cuda() || state_steps.empty() || !state_steps[0].is_cuda()) {
    common::check_scalar_list(op, "state_steps", tensors, state_steps);
    return false;
  }
  TORCH_CHECK_VALUE(state_steps.size() == tensors.size(), op, ": state_steps must have one tensor per param (",
                    tensors.size(), "), got ", state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& s = state_steps[i];
    TORCH_CHECK_VALUE(
        s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == tensors[0].device(), op,
        ": state_steps[", i, "] must be a one-element float32 tensor on ", tensors[0].device(),
        " (CUDA step counters are all on the params' device)");
  }
  return true;
}

// Dense tensors on the CPU, or all on one CUDA device (builds with CUDA kernels).
void check_device(const char* op, const char* name, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided, op, ": ", name, "[", i,
                      "] must be a defined dense tensor");
#if defined(TORCHOPT_EXT_WITH_CUDA)
    const bool ok = t.is_cpu() || (t.is_cuda() && t.device() == tensors[0].device());
#else
    const bool ok = t.is_cpu();
#endif
    TORCH_CHECK_VALUE(ok, op, ": ", name, "[", i, "] is on ", t.device(), ", ", name, "[0] on ", tensors[0].device(),
                      "; this build takes CPU tensors", TORCHOPT_EXT_CUDA_NOTE);
  }
}

bool check_grads_and_buffers(const char* op, at::TensorList grads, at::TensorList buffers, at::TensorList state_steps) {
  check_device(op, "grads", grads);
  common::check_state_list(op, "momentum_buffers", grads, buffers);
  return check_step_list(op, grads, state_steps);
}

// The AMP scale: a host value, or (a CUDA grad_scale with CUDA grads) a device tensor the grads are divided by.
struct GradScale {
  std::optional<double> host;
  at::Tensor device;
};
GradScale read_grad_scale(const char* op, const std::optional<at::Tensor>& grad_scale, at::TensorList grads) {
  if (grad_scale && grad_scale->defined() && grad_scale->is_cuda() && !grads.empty() && grads[0].is_cuda()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->device() == grads[0].device(), op,
                      ": a CUDA grad_scale must have one element on the grads' device");
    return {std::nullopt, *grad_scale};
  }
  return {common::read_amp(op, grad_scale, std::nullopt).grad_scale, {}};
}

// Advances the counters: host ones here, device ones with one foreach add.
std::vector<double> advance_steps(at::TensorList state_steps, bool on_device) {
  if (on_device) {
    at::_foreach_add_(state_steps, 1.0);
    return std::vector<double>(state_steps.size(), std::nan(""));
  }
  return common::increment_steps(state_steps);
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
  const bool device_steps = check_grads_and_buffers(op, grads, momentum_buffers, state_steps);
  check_outputs(op, "ns_inputs", grads, ns_inputs, momentum_buffers, false);
  check_sums(op, grads, magma_sums, use_magma);
  const auto scale = read_grad_scale(op, grad_scale, grads);
  advance_steps(state_steps, device_steps);
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor grad = grads[i];
    detail::unscale_grad(grad, scale.host, scale.device);
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
  const bool device_steps = check_grads_and_buffers(op, grads, momentum_buffers, state_steps);
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
  const auto scale = read_grad_scale(op, grad_scale, grads);
  const auto steps = advance_steps(state_steps, device_steps);
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor grad = grads[i];
    detail::unscale_grad(grad, scale.host, scale.device);
    at::Tensor buffer = momentum_buffers[i];
    auto parts = detail::prism_momentum(grad, buffer, options, 1.0, seed, static_cast<int64_t>(i), steps[i],
                                        device_steps ? state_steps[i] : at::Tensor());
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
  check_device(op, "params", params);
  const bool device_steps = check_step_list(op, params, state_steps);
  const bool on_cuda = !params.empty() && params[0].is_cuda();
  const common::MagmaOptions magma{magma_p, magma_tau, seed};
  common::check_magma_options(op, magma);
  if (use_magma) {
    detail::check_magma_scores(op, params, magma_scores);
    TORCH_CHECK_VALUE(magma_sums && magma_sums->dim() == 2 && magma_sums->size(0) == static_cast<int64_t>(n) &&
                          magma_sums->size(1) == 3,
                      op, ": use_magma needs magma_sums of shape (", n, ", 3)");
  } else {
    TORCH_CHECK_VALUE(magma_scores.empty(), op, ": magma_scores must be empty without use_magma");
  }
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].is_floating_point(), op, ": params[", i, "] must be a floating tensor");
    TORCH_CHECK_VALUE(updates[i].numel() == params[i].numel(), op, ": updates[", i, "] has ", updates[i].numel(),
                      " elements but params[", i, "] has ", params[i].numel());
  }
  // A CUDA lr is read by the kernel (no host sync).
  const bool device_lr = on_cuda && lr.is_cuda();
  if (device_lr) {
    TORCH_CHECK_VALUE(lr.numel() == 1 && (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble) &&
                          lr.device() == params[0].device(),
                      op, ": a CUDA lr must be a one-element float32 or float64 tensor on the params' device");
  }
  const double lr_value = device_lr ? std::nan("") : common::read_lr(op, lr);
  common::DenseWorkspace workspace;
  auto dense = workspace.dense(params, /*write_back=*/true);
  if (on_cuda) {
    for (size_t i = 0; i < n; ++i) {
      detail::MatrixScalars scalars{lr_value, device_lr ? lr : at::Tensor(), 0.0, {}};
      if (device_steps) {
        scalars.step_device = state_steps[i];
      } else {
        scalars.step = state_steps[i].item<double>();  // a CPU counter: no sync
      }
      const auto index = static_cast<int64_t>(i);
      const at::Tensor score = use_magma ? detail::magma_score_from_sums_cuda((*magma_sums)[index], magma_scores[i],
                                                                              magma_tau, params[i].device())
                                         : at::Tensor();
      const double scale = scaled ? muon_lr_scale(adjust_lr_fn, matrix_sizes[2 * i], matrix_sizes[2 * i + 1]) : 1.0;
      detail::apply_matrix_update_cuda(dense[i], updates[i], scalars, score, magma, weight_decay, scale,
                                       stochastic_rounding, seed, index);
    }
    workspace.finish();
    return;
  }
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
