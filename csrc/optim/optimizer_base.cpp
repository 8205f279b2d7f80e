#include "torchopt_ext/optim/optimizer_base.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace torchopt_ext::optim::detail {

void check_state_dtype(const char* name, const std::optional<at::ScalarType>& dtype) {
  if (!dtype) {
    return;
  }
  const auto t = *dtype;
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, name,
                    ": state_dtype must be float32, float64, bfloat16 or float16, got ", t);
}

at::Tensor zeros_state(const at::Tensor& param, const std::optional<at::ScalarType>& dtype) {
  return at::zeros_like(param, param.options().dtype(dtype.value_or(param.scalar_type())), at::MemoryFormat::Preserve);
}

bool same_state_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() == b.defined() && (!a.defined() || at::equal(a, b));
}

at::Tensor new_step_counter() { return at::zeros({}, at::TensorOptions().dtype(at::kFloat)); }

at::Device scalar_device(const at::Tensor& param) { return param.is_cuda() ? param.device() : at::Device(at::kCPU); }

at::Tensor new_step_counter(const at::Tensor& param) {
  return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(scalar_device(param)));
}

at::Tensor placed_step(const at::Tensor& step, const at::Tensor& param) {
  const auto device = scalar_device(param);
  if (!step.defined() || step.device() == device) {
    return step;
  }
  return step.to(device, at::kFloat).reshape({});
}

at::Tensor placed_scalar(const at::Tensor& value, const at::Tensor& param) {
  const auto device = scalar_device(param);
  if (!value.defined() || value.device() == device) {
    return value;
  }
  return value.to(device);
}

at::Tensor placed_magma_score(const at::Tensor& score, const at::Tensor& param) {
  if (!score.defined()) {
    return at::full({}, 0.5, at::TensorOptions().dtype(at::kFloat).device(scalar_device(param)));
  }
  return placed_scalar(score, param);
}

}  // namespace torchopt_ext::optim::detail
