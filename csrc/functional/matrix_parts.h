// The pieces of the Muon and PRISM steps, shared by the single-process ops
// (muon_step_, prism_step_) and the split ops of the distributed ownership
// path (functional/matrix_owner.h), so the math exists once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

#include "common/tensor_lists.h"
#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/newton_schulz.h"

namespace torchopt_ext::functional::detail {

// Muon's momentum: buffer <- lerp(buffer, g, 1 - momentum) with g the grad in
// the buffer's dtype (negated with maximize); returns g and the Newton-Schulz
// input (the Nesterov look-ahead lerp(g, buffer, momentum), or the buffer).
struct MuonMomentum {
  at::Tensor grad;
  at::Tensor ns_input;
};
MuonMomentum muon_momentum(const at::Tensor& grad, at::Tensor& buffer, double momentum, bool nesterov, bool maximize);

// The bias-corrected Nesterov look-ahead of an EMA momentum m at step t
// (NAdamW's m_hat): beta m / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t).
// PRISM's shaping target and its NAdamW fallback share it.
at::Tensor nesterov_bias_corrected(const at::Tensor& m, const at::Tensor& g, double beta, double t);
// The same with t a float64 0-d tensor on m's device (CUDA step counters:
// the coefficients are computed there, no host read).
at::Tensor nesterov_bias_corrected(const at::Tensor& m, const at::Tensor& g, double beta, const at::Tensor& t);
// 1 - beta^t as a float64 0-d tensor on t's device.
at::Tensor one_minus_power(double beta, const at::Tensor& t);

// PRISM's element-wise part for one param: momentum (stored, bf16 buffers
// with stochastic rounding from `seed`, `index`, `step`), the shaping target
// M and the innovation D = g - m, both in param shape and the math dtype
// (fp32, fp64 for fp64 buffers). raw_grad is the grad before the raw clip
// (Magma's cosine input), moment the new momentum in the math dtype.
struct PrismOptions {
  double b1 = 0.95;
  bool ema = true;
  bool nesterov = true;
  bool shape_nesterov = true;
  bool bias_correction = false;
  bool maximize = false;
};
struct PrismMomentum {
  at::Tensor raw_grad;
  at::Tensor grad;
  at::Tensor moment;
  at::Tensor target;
  at::Tensor innovation;
};
// step_device (CUDA params with CUDA counters): the float32 counter, read on
// the device instead of `step`.
PrismMomentum prism_momentum(const at::Tensor& grad, at::Tensor& buffer, const PrismOptions& options, double raw_scale,
                             int64_t seed, int64_t index, double step, const at::Tensor& step_device = {});

// PRISM's whole-matrix part: shaping of (rows, cols) M and D (or a
// (batch, rows, cols) stack, each matrix shaped and clipped on its own) ("original":
// Newton-Schulz of [M, gamma D], first cols columns; "bidirectional"), the
// look-ahead after shaping (nesterov without shape_nesterov: needs `grad`,
// the (rows, cols) clipped grad), and the per-tensor post-clip. Returns the
// (rows, cols) update in M's dtype.
struct PrismShaping {
  bool bidirectional = false;
  double gamma = 1.0;
  double gamma_l = 1.0;
  double gamma_r = 1.0;
  int64_t inv_steps = 6;
  double inv_eps = 1e-5;
  double inv_scale = 1.001;
  double eps_gram = 1e-6;
  std::optional<at::ScalarType> ns_dtype;
  common::NewtonSchulzOptions ns;
  std::optional<common::PostClipOptions> post_clip;
};
// Validates the shaping options (errors name `op`) and builds them.
PrismShaping make_prism_shaping(const char* op, double gamma, int64_t ns_iters, at::ArrayRef<double> ns_coeffs,
                                c10::string_view ns_preset, c10::string_view mode, c10::string_view preconditioning,
                                int64_t inv_steps, double inv_eps, double inv_scale, double eps_gram,
                                std::optional<double> gamma_l, std::optional<double> gamma_r,
                                at::ArrayRef<double> grad_clip_max_amps, std::optional<at::ScalarType> ns_dtype);
at::Tensor prism_shape(const at::Tensor& M, const at::Tensor& D, const at::Tensor& grad, const PrismOptions& options,
                       const PrismShaping& shaping);

// p <- p * (1 - lr m wd) - lr m scale u (m: Magma's multiplier, 1 without),
// with fp32 math and optional stochastic rounding for bf16/fp16 params
// (stream from seed, index, step). `update` has the param's numel.
void apply_matrix_update(at::Tensor& param, const at::Tensor& update, double lr, double multiplier, double weight_decay,
                         double lr_scale, bool stochastic_rounding, int64_t seed, int64_t index, double step);

// --- CUDA params (the functionals' CUDA branches; docs/design.md "CUDA kernels").
// lr and step of one param: host values, or one-element tensors on its device.
struct MatrixScalars {
  double lr = 0.0;
  at::Tensor lr_device;  // defined: read on the device
  double step = 0.0;
  at::Tensor step_device;  // float32 counter, defined: read on the device
  bool on_device() const { return step_device.defined(); }
  // The step as a float64 0-d tensor on the device (step_device must be defined).
  at::Tensor step_tensor() const;
};
// The scalars of param i of a CUDA group from prepare_elementwise_group.
template <size_t N>
MatrixScalars matrix_scalars(const common::DenseGroup<N>& group, size_t i) {
  MatrixScalars s;
  s.lr = group.lr;
  s.lr_device = group.device.lr;
  s.step = group.steps[i];
  if (!group.device.steps.empty()) {
    s.step_device = group.device.steps[i];
  }
  return s;
}

// Starts the step of a CUDA group: a CUDA found_inf is read on the host (one
// sync: a skipped step must leave every tensor untouched, and the ATen parts
// of the matrix step have no device-side skip); CUDA step counters advance
// (the element-wise kernels do that themselves, these ops here). Returns false
// when the step is skipped (nothing changed).
bool begin_cuda_matrix_step(const common::DeviceArgs& device);

// grad /= the AMP scale, a host value or a CUDA tensor (GradScaler's).
void unscale_grad(at::Tensor& grad, const std::optional<double>& host_scale, const at::Tensor& device_scale);

// apply_matrix_update for a CUDA param, in one kernel (kernels/cuda/matrix.cu)
// that reads lr, step and Magma's updated score on the device. magma_score:
// from magma_score_cuda (undefined: no Magma); the keep draw is the CPU's hash.
void apply_matrix_update_cuda(at::Tensor& param, const at::Tensor& update, const MatrixScalars& scalars,
                              const at::Tensor& magma_score, const common::MagmaOptions& magma, double weight_decay,
                              double lr_scale, bool stochastic_rounding, int64_t seed, int64_t index);
// Fixed factors p <- p * decay + alpha * u on a CUDA param (PRISM's bf16
// momentum store, SOAP), with the rounding stream of (seed, index, step).
void apply_fixed_update_cuda(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                             const MatrixScalars& scalars, bool stochastic_rounding, int64_t seed, int64_t index);

// Magma's score update for a CUDA param (common::magma_multiplier /
// magma_multiplier_from_sums with keep = true): returns the updated score on
// the device for the apply kernel. A CPU score (the C++ classes create them
// there) is updated on the device and copied back, one sync.
// magma_scores: one-element float32/float64 CPU tensors for CPU params; for
// CUDA params float32 on their device (the Python classes) or on the CPU (the
// C++ classes: then one sync per score).
void check_magma_scores(const char* op, at::TensorList params, at::TensorList scores);
at::Tensor magma_score_cuda(const at::Tensor& grad, const at::Tensor& moment, const at::Tensor& score, double tau);
at::Tensor magma_score_from_sums_cuda(const at::Tensor& sums, const at::Tensor& score, double tau,
                                      const at::Device& device);

}  // namespace torchopt_ext::functional::detail
