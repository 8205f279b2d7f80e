// SOAP (classic.md §10): Adam in the eigenbasis of Shampoo's Gram factors,
// refreshed by one QR power iteration every precondition_frequency steps. The
// single implementation behind torchopt_ext::optim::SOAP and
// torch.ops.torchopt_ext.soap_step_.
//
// State layout: exp_avg (rotated basis) and exp_avg_sq have the param's shape.
// The Gram factors GG_k and eigenbases Q_k of one param live in one flat,
// contiguous 1-D tensor each (GGs[i], Qs[i]): the d_k x d_k blocks of the
// preconditioned (merged) dims, in dim order; a dim without a factor (larger
// than max_precond_dim, or a 1-D param without precondition_1d) takes no
// space, so a param without factors has empty GG/Q tensors. Their dtype is
// float64 for float64 params and float32 otherwise.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace torchopt_ext::functional {

// The (merged) dims a param is preconditioned over and, per dim, its factor
// size (0: no factor). data_format: "channels_first" or "channels_last".
struct SoapLayout {
  std::vector<int64_t> shape;         // the shape the param is viewed as
  std::vector<int64_t> factor_sizes;  // one per entry of `shape`
  int64_t factor_numel() const;       // elements of the flat GG / Q tensors
};
SoapLayout soap_layout(at::IntArrayRef param_shape, int64_t max_precond_dim, bool merge_dims, bool precondition_1d,
                       c10::string_view data_format);

// A param whose state_steps entry is -1 (as the optimizers create it) has no preconditioner yet: this call builds it
// (GG_k = (1 - beta_s) G_(k) G_(k)^T, beta_s = shampoo_beta >= 0 ? shampoo_beta : beta2; Q_k its eigenvectors by
// descending eigenvalue), sets the step to 0 and does not touch the param. Deciding this from the step tensor inside
// the op keeps step() free of state-dependent Python branches (torch.compile guards cannot tell a just-initialized
// state from an older one). Every later call: Adam in the eigenbasis, the update, decoupled decay after it, the GG EMA,
// and every precondition_frequency steps the QR refresh of Q (with exp_avg_sq permuted and exp_avg re-rotated).
// stochastic_rounding / seed: bf16 / fp16 params as in adam_step_.
// batch_equal_shapes: params of the call with equal (merged) layouts, math
// dtypes and steps run as one batch (bmm, batched eigh / QR); equal to the
// per-tensor path to rounding (eigenvector signs may differ, which SOAP's
// rotate / rotate-back cancels). false: one param at a time; nullopt: batched
// on CUDA, and on the CPU for params of at most common::psgd::kCpuBatchedMaxNumel
// elements (larger CPU batches measured slower than the loop).
void soap_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList GGs, at::TensorList Qs, at::TensorList state_steps, const at::Tensor& lr, double beta1,
                double beta2, double shampoo_beta, double eps, double weight_decay, int64_t precondition_frequency,
                int64_t max_precond_dim, bool merge_dims, bool precondition_1d, bool normalize_grads,
                c10::string_view data_format, bool correct_bias, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                std::optional<bool> batch_equal_shapes = std::nullopt);

}  // namespace torchopt_ext::functional
