#include "common/norm_sqs.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace torchopt_ext::common {

at::Tensor check_norm_sqs(const char* op, at::TensorList params, const std::optional<at::Tensor>& norm_sqs, int64_t k) {
  if (!norm_sqs.has_value() || !norm_sqs->defined()) {
    return {};
  }
  const auto& t = *norm_sqs;
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == n && t.size(1) == k, op, ": norm_sqs must have shape (", n, ", ", k,
                    ") (one row of squared norms per param), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble, op, ": norm_sqs must be float64, got ", t.scalar_type());
  const auto device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  TORCH_CHECK_VALUE(t.device() == device, op, ": norm_sqs must be on ", device, " (the params' device), got ",
                    t.device());
  return t.contiguous();
}

std::vector<at::Tensor> peek_steps(at::TensorList state_steps) {
  std::vector<at::Tensor> out;
  out.reserve(state_steps.size());
  for (const auto& s : state_steps) {
    out.push_back(s.defined() && !s.is_cuda() ? s.clone() : s);
  }
  return out;
}

at::Tensor empty_norm_sqs(at::TensorList params, int64_t k) {
  const auto device = params.empty() ? at::Device(at::kCPU) : params[0].device();
  return at::zeros({static_cast<int64_t>(params.size()), k}, at::TensorOptions().dtype(at::kDouble).device(device));
}

}  // namespace torchopt_ext::common
