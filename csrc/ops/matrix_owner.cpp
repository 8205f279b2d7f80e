#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/functional/matrix_owner.h"

// The split Muon / PRISM steps of the distributed ownership path
// (functional/matrix_owner.h). The momentum ops write their outputs into
// caller-allocated lists (list returns cannot be functionalized).
TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "muon_momentum_(Tensor(a!)[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] state_steps, "
      "Tensor(d!)[] ns_inputs, Tensor(e!) magma_sums, *, float momentum, bool nesterov, bool maximize=False, "
      "bool use_magma=False, Tensor? grad_scale=None) -> ()");
  m.def(
      "prism_momentum_(Tensor(a!)[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] state_steps, "
      "Tensor(d!)[] targets, Tensor(e!)[] innovations, Tensor(f!)[] lookahead_grads, Tensor(g!) magma_sums, *, "
      "float b1=0.95, bool nesterov=True, bool shape_nesterov=True, bool bias_correction=False, "
      "str momentum_accumulator='ema', bool maximize=False, bool use_magma=False, int seed=0, "
      "Tensor? grad_scale=None) -> ()");
  m.def(
      "prism_shape(Tensor target, Tensor innovation, Tensor? grad=None, *, float b1=0.95, float gamma=1.0, "
      "int ns_iters=5, float[] ns_coeffs=[3.4445, -4.775, 2.0315], str prism_mode='original', "
      "str preconditioning='frobenius', int inv_steps=6, float inv_eps=1e-5, float inv_scale=1.001, "
      "float eps_gram=1e-6, float? gamma_l=None, float? gamma_r=None, bool nesterov=True, bool shape_nesterov=True, "
      "str momentum_accumulator='ema', float[] grad_clip_max_amps=[2.0, 10.0], ScalarType? ns_dtype=None) -> Tensor");
  m.def(
      "matrix_apply_(Tensor(a!)[] params, Tensor[] updates, Tensor(b!)[] magma_scores, Tensor[] state_steps, "
      "Tensor lr, *, float weight_decay, int[] matrix_sizes, str adjust_lr_fn='none', Tensor? magma_sums=None, "
      "bool use_magma=False, float magma_p=0.5, float magma_tau=2.0, bool stochastic_rounding=False, int seed=0) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("muon_momentum_", &torchopt_ext::functional::muon_momentum_);
  m.impl("prism_momentum_", &torchopt_ext::functional::prism_momentum_);
  m.impl("prism_shape", &torchopt_ext::functional::prism_shape);
  m.impl("matrix_apply_", &torchopt_ext::functional::matrix_apply_);
}
