#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/functional/kron.h"

namespace {

// The factor layout as an op (no tensors: a catch-all kernel), so the Python
// front end sizes the preconditioner state with the C++ rule.
std::vector<int64_t> kron_factor_layout_op(std::vector<int64_t> shape, int64_t max_size_triangular,
                                           double max_skew_triangular, int64_t min_ndim_triangular,
                                           std::optional<c10::string_view> memory_save_mode) {
  return torchopt_ext::functional::kron_factor_layout(shape, max_size_triangular, max_skew_triangular,
                                                      min_ndim_triangular, memory_save_mode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "kron_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] preconditioners, Tensor(e!)[] lipschitz, Tensor(f!)[] magma_scores, Tensor(g!)[] state_steps, "
      "Tensor lr, *, Tensor(h!) rng_state, float b1=0.9, float weight_decay=0.0, "
      "Tensor? update_probability=None, int max_size_triangular=8192, float max_skew_triangular=1.0, "
      "int min_ndim_triangular=2, str? memory_save_mode=None, bool whiten_grad=True, "
      "bool update_preconditioner_first=True, float preconditioner_lr=0.1, float? preconditioner_init_scale=None, "
      "str preconditioner_mode='Q0.5EQ1.5', float beta_lipschitz=0.9, bool track_lipschitz=True, "
      "float damping=1e-9, float[] grad_clip_max_amps=[2.0, 10.0], str grad_clip_mode='per_tensor_rms', "
      "float? raw_global_grad_clip=None, bool permissive_spike_protection=True, int newton_schulz_iters=5, "
      "bool maximize=False, bool use_magma=False, float magma_p=0.5, float magma_tau=2.0, "
      "bool stochastic_rounding=False, int seed=0, bool stacked=False, int? stacked_chunk_size=None, "
      "int[]? stacked_slices=None, bool? batch_equal_shapes=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "int[] param_indices=[], "
      "int[] group_shapes=[]) -> ()");
  m.def(
      "kron_factor_layout(int[] shape, *, int max_size_triangular=8192, float max_skew_triangular=1.0, "
      "int min_ndim_triangular=2, str? memory_save_mode=None) -> int[]",
      &kron_factor_layout_op);
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("kron_step_", &torchopt_ext::functional::kron_step_); }

#if defined(TORCHOPT_EXT_WITH_CUDA)
// ATen ops (cuBLAS GEMMs, cuSOLVER-free triangular solves) plus the CUDA
// reduced-precision store; the generator stays on the host (functional/kron.h).
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) { m.impl("kron_step_", &torchopt_ext::functional::kron_step_); }
#endif
