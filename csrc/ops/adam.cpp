#include <torch/library.h>

#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/functional/adam.h"

namespace {

// The Magma keep/drop draw of the shared core, so tests (and users who want
// to know which tensors a step kept) can reproduce it; no tensors, so a
// catch-all kernel.
bool magma_keep_op(int64_t seed, int64_t tensor_index, double step, double p) {
  const torchopt_ext::common::MagmaOptions options{p, 2.0, seed};
  torchopt_ext::common::check_magma_options("magma_keep", options);
  return torchopt_ext::common::magma_keep(options, tensor_index, step);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, Tensor lr, *, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize, "
      "bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // adam_step_ with Magma masking; magma_scores are 0-d float32 CPU tensors.
  m.def(
      "adam_magma_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] magma_scores, Tensor(g!)[] state_steps, Tensor lr, *, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize, "
      "float magma_p=0.5, float magma_tau=2.0, bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def("magma_keep(int seed, int tensor_index, float step, float p) -> bool", &magma_keep_op);
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("adam_step_", &torchopt_ext::functional::adam_step_);
  m.impl("adam_magma_step_", &torchopt_ext::functional::adam_magma_step_);
}
