#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/functional/white_kron.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "white_kron_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] mus, Tensor(d!)[] ql, Tensor(e!)[] qr, "
      "Tensor(f!)[] lip_l, Tensor(g!)[] lip_r, Tensor(h!)[] state_steps, Tensor lr, *, str update_style='skew', "
      "float b1=0.95, float weight_decay=0.1, str lr_style='adam', bool normalize_grads=False, "
      "int max_size_dense=16384, float preconditioner_lr=0.7, int block_size=256, float noise_scale=1e-9, "
      "int balance_every=100, bool maximize=False, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int[] param_indices=[], int[] dense_tiles=[]) -> ()");
  // The fresh state of one param (Python's lazily created state uses it).
  m.def(
      "white_kron_init_state(Tensor param, int max_size_dense, int block_size, float preconditioner_init_scale, "
      "ScalarType dtype) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("white_kron_step_", &torchopt_ext::functional::white_kron_step_); }

#if defined(TORCHOPT_EXT_WITH_CUDA)
// ATen ops (batched cuBLAS GEMMs over the tile stack) plus the CUDA
// reduced-precision store; draws on the host generator (functional/white_kron.h).
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) { m.impl("white_kron_step_", &torchopt_ext::functional::white_kron_step_); }
#endif

TORCH_LIBRARY_IMPL(torchopt_ext, CompositeExplicitAutograd, m) {
  m.impl("white_kron_init_state", &torchopt_ext::functional::white_kron_init_state);
}
