// Per-call options of the fused element-wise kernels that are not part of any
// algorithm's math.
#pragma once

#include <cstdint>
#include <optional>

namespace torchopt_ext::kernels::cpu {

struct ElementwiseOptions {
  bool stochastic_rounding = false;
  int64_t seed = 0;
  std::optional<double> grad_scale;  // grads are divided by it and written back
};

}  // namespace torchopt_ext::kernels::cpu
