// The Muon and PRISM steps split at the whole-matrix operation, for the
// distributed ownership scheme (docs/design.md, "Distributed"): the
// element-wise parts run on each rank's local shards (`*_momentum_`), one
// owner rank per matrix runs the matrix function on the whole matrix
// (`newton_schulz` for Muon, `prism_shape` for PRISM), and `matrix_apply_`
// applies the returned update to the local shards. Composed on one process,
// the pieces give muon_step_ / prism_step_ (the same helpers run both); only
// Magma's cosine is taken from sums (`magma_sums`, float64, all-reduced over
// the shards by the caller) instead of whole tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>

namespace torchopt_ext::functional {

// Outputs are written into caller-allocated tensors (an op returning a
// tensor list cannot be functionalized by torch.compile).
//
// Increments the step counters, divides grads by grad_scale (written back),
// updates the momentum buffers and writes the Newton-Schulz inputs into
// ns_inputs (each grad's shape, the buffer's dtype) and, with use_magma,
// Magma's per-tensor sums [<g, m>, |g|^2, |m|^2] into magma_sums ((n, 3)
// float64; unused without).
void muon_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList state_steps,
                    at::TensorList ns_inputs, const at::Tensor& magma_sums, double momentum, bool nesterov,
                    bool maximize, bool use_magma, const std::optional<at::Tensor>& grad_scale);

// PRISM's element-wise part (no raw global clip): increments the steps,
// updates the momentum buffers, writes the targets M and innovations D (each
// grad's shape, math dtype: float32, float64 for float64 buffers), the grads
// for the look-ahead after shaping (lookahead_grads: one per param with
// nesterov and not shape_nesterov, else empty) and Magma's sums.
void prism_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList state_steps,
                     at::TensorList targets, at::TensorList innovations, at::TensorList lookahead_grads,
                     const at::Tensor& magma_sums, double b1, bool nesterov, bool shape_nesterov, bool bias_correction,
                     c10::string_view momentum_accumulator, bool maximize, bool use_magma, int64_t seed,
                     const std::optional<at::Tensor>& grad_scale);

// PRISM's whole-matrix part on (rows, cols) inputs: shaping, look-ahead after
// shaping (grad: required with nesterov and not shape_nesterov) and the
// post-clip; options as prism_step_. Returns the (rows, cols) update.
at::Tensor prism_shape(const at::Tensor& target, const at::Tensor& innovation, const std::optional<at::Tensor>& grad,
                       double b1, double gamma, int64_t ns_iters, at::ArrayRef<double> ns_coeffs, c10::string_view mode,
                       c10::string_view preconditioning, int64_t inv_steps, double inv_eps, double inv_scale,
                       double eps_gram, std::optional<double> gamma_l, std::optional<double> gamma_r, bool nesterov,
                       bool shape_nesterov, c10::string_view momentum_accumulator,
                       at::ArrayRef<double> grad_clip_max_amps, std::optional<at::ScalarType> ns_dtype);

// p <- p (1 - lr m weight_decay) - lr m s u per param, u = updates[i] (the
// local rows of the whole-matrix update, any dtype, the param's numel);
// s = Muon's lr scale of the whole (rows, cols) matrix from matrix_sizes
// (flat pairs) for adjust_lr_fn "original" / "match_rms_adamw", 1 for "none"
// (PRISM); m = Magma's multiplier from magma_sums (with use_magma) or 1.
// Reads the step counters (the momentum op incremented them).
void matrix_apply_(at::TensorList params, at::TensorList updates, at::TensorList magma_scores,
                   at::TensorList state_steps, const at::Tensor& lr, double weight_decay, at::IntArrayRef matrix_sizes,
                   c10::string_view adjust_lr_fn, const std::optional<at::Tensor>& magma_sums, bool use_magma,
                   double magma_p, double magma_tau, bool stochastic_rounding, int64_t seed);

}  // namespace torchopt_ext::functional
