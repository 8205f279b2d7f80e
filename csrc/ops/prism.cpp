#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/functional/prism.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "prism_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] magma_scores, "
      "Tensor(e!)[] state_steps, Tensor lr, *, float b1=0.95, float gamma=1.0, float weight_decay=0.0, "
      "int ns_iters=5, float[] ns_coeffs=[3.4445, -4.775, 2.0315], str ns_preset='', int[] matrix_dims=[], "
      "str prism_mode='original', "
      "str preconditioning='frobenius', int inv_steps=6, float inv_eps=1e-5, float inv_scale=1.001, "
      "float eps_gram=1e-6, float? gamma_l=None, float? gamma_r=None, bool nesterov=True, bool shape_nesterov=True, "
      "bool bias_correction=False, str momentum_accumulator='ema', float[] grad_clip_max_amps=[2.0, 10.0], "
      "float? raw_global_grad_clip=None, bool permissive_spike_protection=True, Tensor? raw_grad_norm=None, "
      "ScalarType? ns_dtype=None, "
      "bool maximize=False, bool use_magma=False, float magma_p=0.5, float magma_tau=2.0, "
      "bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "prism_nadamw_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] state_steps, Tensor lr, *, float beta1=0.9, float beta2=0.999, float eps=1e-8, "
      "float weight_decay=0.0, bool maximize=False, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("prism_step_", &torchopt_ext::functional::prism_step_);
  m.impl("prism_nadamw_step_", &torchopt_ext::functional::prism_nadamw_step_);
}
