// Host entry of the CUDA apply kernel of the matrix optimizers (Muon, PRISM
// and its NAdamW fallback, SOAP's reduced-precision params, the ownership
// path's matrix_apply_): p <- p * decay + alpha * u with the per-element math
// of kernels/algos/matrix_apply.h. Built only with TORCHOPT_EXT_WITH_CUDA.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(TORCHOPT_EXT_WITH_CUDA)
namespace torchopt_ext::kernels::cuda {

// Each scalar is a host value or a one-element tensor on the param's device
// that the kernel reads (no host sync, CUDA-graph capturable).
struct MatrixApplyScalars {
  double lr = 0.0;
  at::Tensor lr_device;  // float32 / float64; defined: used instead of `lr`
  double step = 0.0;
  at::Tensor step_device;  // float32 counter (already advanced); defined: used instead of `step`
  // decay = 1 - lr m wd, alpha = -lr m lr_scale (algos::matrix_apply_factors)
  // with m = keep(magma_seed, index, step, magma_p) * *magma_score when
  // magma_score (float32, already updated this step) is defined, else 1.
  double weight_decay = 0.0;
  double lr_scale = 1.0;
  at::Tensor magma_score;
  double magma_p = 1.0;
  int64_t magma_seed = 0;
  // Fixed factors instead (PRISM's momentum store, SOAP): decay and alpha as given.
  bool fixed = false;
  double decay = 1.0;
  double alpha = 0.0;
  // bf16 params: stochastic rounding from rounding_stream(rounding_seed, index, step).
  bool stochastic_rounding = false;
  int64_t rounding_seed = 0;
  int64_t index = 0;
};

// param: contiguous CUDA tensor (any float dtype); update: contiguous, same
// numel, in the math dtype (float64 for float64 params, else float32) on the
// param's device. Runs on the current stream.
void matrix_apply_update(const at::Tensor& param, const at::Tensor& update, const MatrixApplyScalars& scalars);

}  // namespace torchopt_ext::kernels::cuda
#endif
