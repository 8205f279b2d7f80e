// PRISM step over the matrix params of a group (rollfast.md §3.3): momentum,
// innovation-damped shaping ("original": Newton-Schulz of the augmented
// [M, gamma D]; "bidirectional": coupled inverse fourth roots of both Grams),
// post-clip, decoupled weight decay, optional raw global-norm spike clip and
// Magma. The single implementation behind torchopt_ext::optim::PRISM and
// torch.ops.torchopt_ext.prism_step_.
//
// Orientation: rollfast's matrices are (reduction = input features, output
// features); a torch weight is (out, in) (>= 3-D params: (shape[0], rest)),
// so "original" stacks M and gamma D along dim 1 (the input features) and
// keeps the first `in` columns of the result: the damping then acts in the
// output-feature Gram, M (M^T M + gamma^2 D^T D)^{-1/2} in rollfast's terms.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>

namespace torchopt_ext::functional {

// ns_coeffs: flat (a, b, c) triples, one per NS iteration (the last repeats);
// ns_preset, when not empty, names a preset instead (common/newton_schulz.h).
// matrix_dims: per-param dimension specs (common/matrix_dims.h flat
// encoding; empty: all default). A spec'd param is a batch of (output,
// reduction) matrices, each shaped on its own ("original" augments along the
// reduction axes) and post-clipped on its own, as rollfast's vmap does.
// grad_clip_max_amps: (a_rms, a_el) or empty (no post-clip).
// raw_global_grad_clip: the spike threshold over this call's grads (nullopt:
// off), or over `raw_grad_norm` when given (the front ends pass the norm of
// every param group's PRISM grads, scaled as the grads they pass: it is
// divided by grad_scale here); a strict (non-permissive) skip leaves params, momentum, Magma scores
// and step counters untouched. ns_dtype: dtype of the shaping iterations
// (nullopt: the momentum math dtype; rollfast uses float32). Momentum math is
// float32 (float64 for float64 buffers); bfloat16 buffers are stored with
// stochastic rounding. magma_scores as in muon_step_.
void prism_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 at::TensorList magma_scores, at::TensorList state_steps, const at::Tensor& lr, double b1, double gamma,
                 double weight_decay, int64_t ns_iters, at::ArrayRef<double> ns_coeffs, c10::string_view ns_preset,
                 at::IntArrayRef matrix_dims, c10::string_view mode, c10::string_view preconditioning,
                 int64_t inv_steps, double inv_eps, double inv_scale, double eps_gram, std::optional<double> gamma_l,
                 std::optional<double> gamma_r, bool nesterov, bool shape_nesterov, bool bias_correction,
                 c10::string_view momentum_accumulator, at::ArrayRef<double> grad_clip_max_amps,
                 std::optional<double> raw_global_grad_clip, bool permissive_spike_protection,
                 const std::optional<at::Tensor>& raw_grad_norm, std::optional<at::ScalarType> ns_dtype, bool maximize,
                 bool use_magma, double magma_p, double magma_tau, bool stochastic_rounding, int64_t seed,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// PRISM's NAdamW-style fallback (rollfast §3.4 with nesterov): per tensor,
// m = lerp(m, g, 1 - b1), v = b2 v + (1 - b2) g^2 (fp32 math, fp64 for fp64
// state), m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t),
// u = m_hat / (sqrt(v / (1 - b2^t)) + eps), p <- p (1 - lr wd) - lr u.
// ATen ops (the fused AdamW kernel has no Nesterov form); AMP as adam_step_.
void prism_nadamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                        double beta2, double eps, double weight_decay, bool maximize, bool stochastic_rounding,
                        int64_t seed, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf);

// The "bidirectional" shaping of one (out, in) pair: approximately
// H_out^{-1/4} M H_in^{-1/4} with H_out = M M^T + gamma_r^2 D D^T and
// H_in = M^T M + gamma_l^2 D^T D (after joint Frobenius scaling, + eps_gram I),
// by inv_steps coupled polynomial steps. Computed in M's dtype.
at::Tensor prism_bidirectional(const at::Tensor& M, const at::Tensor& D, double gamma_l, double gamma_r,
                               int64_t inv_steps, double inv_eps, double inv_scale, double eps_gram);

}  // namespace torchopt_ext::functional
