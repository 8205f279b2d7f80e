// The element-wise apply of the matrix optimizers (Muon, PRISM, PRISM's
// NAdamW fallback, SOAP's reduced-precision params): p <- p * decay + alpha * u
// in the math type, shared by the CPU kernel (kernels/cpu/muon.cpp) and the
// CUDA kernel (kernels/cuda/matrix.cu) so both round the same way.
#pragma once

#include <c10/macros/Macros.h>

#include "kernels/algos/elementwise_math.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

template <typename S>
C10_HOST_DEVICE inline S matrix_apply_value(S param, S update, S decay, S alpha) {
  return param * decay + alpha * update;
}

// Decoupled decay with the unscaled lr, then the scaled step; Magma's
// multiplier m (1 without) scales both (decay folded into the masked update):
// decay = 1 - lr m wd, alpha = -lr m lr_scale, in double.
struct MatrixApplyFactors {
  double decay;
  double alpha;
};
C10_HOST_DEVICE inline MatrixApplyFactors matrix_apply_factors(double lr, double multiplier, double weight_decay,
                                                               double lr_scale) {
  return {1.0 - lr * multiplier * weight_decay, -lr * multiplier * lr_scale};
}

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
