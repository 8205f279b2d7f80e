// The standalone raw global-norm clip (spike guard) as an op, so
// torchopt_ext.clip uses the core's math (common::raw_global_clip_on_device_).
#include <torch/library.h>

#include "torchopt_ext/common/clipping.h"

namespace {

at::Tensor raw_global_grad_clip_op(at::TensorList grads, double max_norm,
                                   const std::optional<at::Tensor>& sum_of_squares) {
  return torchopt_ext::common::raw_global_clip_on_device_(grads, max_norm, sum_of_squares);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def("raw_global_grad_clip_(Tensor(a!)[] grads, float max_norm, Tensor? sum_of_squares=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CompositeExplicitAutograd, m) {
  m.impl("raw_global_grad_clip_", &raw_global_grad_clip_op);
}
