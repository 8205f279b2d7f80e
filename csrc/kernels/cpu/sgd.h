#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct SGDHyperparams {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
};

// Fused SGD over one param group. Every tensor is contiguous; momentum_buffers
// is empty when momentum == 0; steps holds already-incremented step counts
// (step 1 initialises the momentum buffer to the gradient, as torch does).
void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const std::vector<double>& steps, const SGDHyperparams& hp, const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
