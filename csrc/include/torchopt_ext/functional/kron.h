// PSGD Kron step over the params of a group (rollfast.md §2.3): the single
// implementation behind torchopt_ext::optim::Kron and
// torch.ops.torchopt_ext.kron_step_. Built on the shared PSGD core
// (torchopt_ext/common/psgd.h), the clipping core (common/clipping.h) and
// Magma (common/magma.h).
//
// State per param: `preconditioners[i]` holds every factor of param i back to
// back (common::psgd::factors_numel elements, layout from factor_layout);
// `lipschitz[i]` one Lipschitz EMA per factor; `momentum_buffers[i]` (only
// when b1 > 0); `magma_scores[i]` (only with use_magma). The factors are
// initialized by the op on a param's first step (its step counter is 0), so
// the front ends create them as zeros of the right size.
//
// Randomness: `rng_state` is the state of a CPU torch.Generator (uint8,
// Generator.get_state()); the op restores a generator from it, draws, and
// writes the advanced state back. Order of the draws in one call:
//   1. the update gate: one rand((), float64) (every step that is not skipped);
//   2. when the gate opens, per param in order (per slice 0..L-1 of a
//      stacked param): the noise V = randn(shape) in the math dtype, then per
//      dense factor in axis order the norm lower bound probes of its update
//      (common::psgd::probe_draws says how many);
//   3. when the gate opened: the balancing gate, one rand((), float64) < 0.01.
// A strict spike skip and a GradScaler found_inf skip draw nothing. The
// stacked batches take their draws in this per-slice order too (drawn ahead
// of the batched math), so a stacked param draws exactly what its slices
// listed as separate params would.
//
// Stacked (scanned) layers, `stacked = true`: every param is (L, ...) and
// slice p[s] is its own problem with factors laid out from p.shape[1:];
// `preconditioners[i]` is (L, factors_numel), `lipschitz[i]` (L, factors),
// `magma_scores[i]` (L,), one step counter per param. The slices are
// updated as batches of at most `stacked_chunk_size` slices (nullopt: all
// L at once): batched matmuls, triangular solves and norm bounds, with the
// per-slice noise and probes stacked. Slice s of param i counts as tensor
// index base_i + s for Magma and stochastic rounding (base_i: the slices of
// the params before it), as if the slices were listed as params.
// `stacked_slices` (a shard of a stacked DTensor, which holds whole slices):
// per param (first global slice, total slices); the op then draws and drops
// the draws of the slices other ranks hold, so the generator and the
// tensor indices are the single-process ones.
//
// Batching, `batch_equal_shapes`: problems of one shape and math dtype
// (the slices of a stacked param, in chunks of at most stacked_chunk_size;
// unstacked params of equal shape, at most stacked_chunk_size per batch)
// are updated as one batch (true) or one at a time (false); nullopt:
// common::psgd::prefer_batched (always on CUDA, on the CPU only up to
// kCpuBatchedMaxNumel elements per problem). The draws are made per problem
// in group order before any math either way, so only rounding differs.
//
// Devices: CPU and CUDA params (ATen ops; the reduced-precision store has a
// CUDA kernel). rng_state, update_probability, lr and the step counters are
// host tensors (the gate and all draws come from the host generator; the
// draws are copied to the params' device). With use_magma the scores live on
// the params' device and a CUDA step's Magma multiplier is applied there (no
// sync).
//
// Ownership path (distributed, Python's Kron with distributed_mode): a call
// holds the params one rank owns. `param_indices` (ascending; one per param:
// its index among the group's params with grads) keys Magma's draws and the
// rounding streams, and `group_shapes` describes every param of the group
// ([ndim, sizes..., 1 if its math is float64 else 0] each, in order): for the
// params this call does not hold the op makes the same generator draws as
// step 2 (noise, then the norm-bound probes of each dense factor) without
// the update, so the generator, and every param's draws, equal the
// single-process call's. Both empty: this call is the group.
// Magma's keep/drop draw and stochastic rounding use the shared counter hash
// of (seed, tensor index, step) instead (common/magma.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace torchopt_ext::functional {

// rollfast's precond_update_prob_schedule() default at step n (1-based):
// min(max(exp(-0.001 (n - 500)), 0.03), 1).
double kron_default_update_probability(double step);

// Per factor of a param of `shape`: 1 dense, 0 diagonal (common::psgd::factor_layout).
std::vector<int64_t> kron_factor_layout(at::IntArrayRef shape, int64_t max_size_triangular, double max_skew_triangular,
                                        int64_t min_ndim_triangular, std::optional<c10::string_view> memory_save_mode);

// update_probability: nullopt = the default schedule at the group's step;
// else a one-element tensor read on the host (CPU). Math dtype: float64 for
// float64 params, else float32; momentum and factors are stored in their
// tensors' dtypes (bf16 with stochastic rounding).
void kron_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                at::TensorList preconditioners, at::TensorList lipschitz, at::TensorList magma_scores,
                at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& rng_state, double b1,
                double weight_decay, const std::optional<at::Tensor>& update_probability, int64_t max_size_triangular,
                double max_skew_triangular, int64_t min_ndim_triangular,
                std::optional<c10::string_view> memory_save_mode, bool whiten_grad, bool update_preconditioner_first,
                double preconditioner_lr, std::optional<double> preconditioner_init_scale,
                c10::string_view preconditioner_mode, double beta_lipschitz, bool track_lipschitz, double damping,
                at::ArrayRef<double> grad_clip_max_amps, c10::string_view grad_clip_mode,
                std::optional<double> raw_global_grad_clip, bool permissive_spike_protection,
                int64_t newton_schulz_iters, bool maximize, bool use_magma, double magma_p, double magma_tau,
                bool stochastic_rounding, int64_t seed, bool stacked, std::optional<int64_t> stacked_chunk_size,
                at::OptionalIntArrayRef stacked_slices, std::optional<bool> batch_equal_shapes,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                at::IntArrayRef param_indices = {}, at::IntArrayRef group_shapes = {});

}  // namespace torchopt_ext::functional
