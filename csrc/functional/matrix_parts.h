// The pieces of the Muon and PRISM steps, shared by the single-process ops
// (muon_step_, prism_step_) and the split ops of the distributed ownership
// path (functional/matrix_owner.h), so the math exists once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

#include "torchopt_ext/common/clipping.h"
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
PrismMomentum prism_momentum(const at::Tensor& grad, at::Tensor& buffer, const PrismOptions& options, double raw_scale,
                             int64_t seed, int64_t index, double step);

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

}  // namespace torchopt_ext::functional::detail
