// Muon step over the matrix params of a group (classic.md §11): momentum,
// Newton-Schulz orthogonalization, shape-dependent lr scale, decoupled weight decay. The single implementation
// behind torchopt_ext::optim::Muon and torch.ops.torchopt_ext.muon_step_.
// Params with more than two dims are treated as (shape[0], rest) matrices
// unless matrix_dims gives them a spec (common/matrix_dims.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>

namespace torchopt_ext::functional {

// ns_coefficients: (a, b, c) triples, one per iteration (the last repeats);
// ns_preset, when not empty, replaces them by a named preset ("standard",
// "dion", "polar_express": common/newton_schulz.h). matrix_dims: per-param
// dimension specs in the flat encoding of common/matrix_dims.h (empty: all
// default); a spec'd param is a batch of (output, reduction) matrices, each
// orthogonalized on its own, and its lr scale uses one matrix's shape.
// adjust_lr_fn: "original" (sqrt(max(1, rows/cols))) or "match_rms_adamw"
// (0.2 sqrt(max(rows, cols))). ns_dtype: dtype of the iteration (nullopt: the
// param's). With use_magma, magma_scores holds one 0-d float32 score per param
// (0.5 at first) and each param's update, weight decay included, is scaled by
// Magma's z * s (common/magma.h; draws seeded by `seed`); otherwise it is
// empty. AMP arguments as in adam_step_.
void muon_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                at::TensorList magma_scores, at::TensorList state_steps, const at::Tensor& lr, double weight_decay,
                double momentum, bool nesterov, at::ArrayRef<double> ns_coefficients, int64_t ns_steps, double eps,
                c10::string_view adjust_lr_fn, c10::string_view ns_normalization, c10::string_view ns_preset,
                at::IntArrayRef matrix_dims, std::optional<at::ScalarType> ns_dtype, bool maximize, bool use_magma,
                double magma_p, double magma_tau, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// The lr multiplier of a (rows, cols) matrix for adjust_lr_fn.
double muon_lr_scale(c10::string_view adjust_lr_fn, int64_t rows, int64_t cols);

}  // namespace torchopt_ext::functional
