// Host entry of the CUDA Adafactor kernels (kernels/cuda/adafactor.cu, built
// only with TORCHOPT_EXT_WITH_CUDA): the fused step and the three stages of
// adafactor_stage_, with the same stats layout as the CPU kernel
// (kernels/cpu/adafactor.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/tensor_lists.h"
#include "kernels/cpu/adafactor.h"
#include "kernels/cpu/elementwise_options.h"

#if defined(TORCHOPT_EXT_WITH_CUDA)
namespace torchopt_ext::kernels::cuda {

// stage 0: the whole step (stats kept in a scratch buffer); 1, 2, 3: the
// stages of cpu::adafactor_stage on `stats` (one contiguous float64 CUDA
// tensor per param). `steps` are host step values (NaN when device.steps
// holds the counters); device counters are incremented here when
// `increment_device_steps` (the first stage of a step), unless found_inf is set.
void adafactor_run(int stage, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                   at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                   const std::vector<double>& steps, at::TensorList stats, const cpu::AdafactorHyperparams& hp,
                   const cpu::ElementwiseOptions& options, const common::DeviceArgs& device,
                   bool increment_device_steps);

}  // namespace torchopt_ext::kernels::cuda
#endif
