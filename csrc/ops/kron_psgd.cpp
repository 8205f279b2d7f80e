#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/functional/kron_psgd.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "kron_psgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] ql, "
      "Tensor(e!)[] qr, Tensor(f!)[] state_steps, Tensor lr, *, float precond_lr=0.1, float momentum=0.9, "
      "float weight_decay=0.0, float eps=1e-8, float clip=1.0, bool maximize=False, bool stochastic_rounding=False, "
      "int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("kron_psgd_step_", &torchopt_ext::functional::kron_psgd_step_); }

#if defined(TORCHOPT_EXT_WITH_CUDA)
// ATen ops (cuBLAS GEMMs, triangular solves) plus the CUDA reduced-precision store.
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) { m.impl("kron_psgd_step_", &torchopt_ext::functional::kron_psgd_step_); }
#endif
