#include "kernels/cpu/muon.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>

#include "kernels/algos/matrix_apply.h"
#include "kernels/cpu/multi_tensor_apply.h"
#include "kernels/cpu/stochastic_rounding.h"

namespace torchopt_ext::kernels::cpu {

void muon_apply_update_reduced(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                               bool stochastic_rounding, uint64_t rounding_stream) {
  TORCH_CHECK(param.is_contiguous() && param.numel() == update.numel(),
              "muon_apply_update_reduced: param must be contiguous and match the update's numel");
  const at::Tensor update32 = update.to(at::kFloat).contiguous();
  const float* u = update32.const_data_ptr<float>();
  const auto decay32 = static_cast<float>(decay);
  const auto alpha32 = static_cast<float>(alpha);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(param.scalar_type(), "muon_apply_update_reduced", [&] {
    auto* p = param.mutable_data_ptr<scalar_t>();
    for_each_chunk({param.numel()}, [&](int64_t, int64_t begin, int64_t end) {
      constexpr int64_t kBlock = 512;
      std::array<float, kBlock> values;
      for (int64_t b = begin; b < end; b += kBlock) {
        const int64_t n = std::min(kBlock, end - b);
        for (int64_t i = 0; i < n; ++i) {
          values[i] = matrix_apply_value(static_cast<float>(p[b + i]), u[b + i], decay32, alpha32);
        }
        if (stochastic_rounding) {
          store_stochastic(p + b, values.data(), n, rounding_stream, b);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            p[b + i] = static_cast<scalar_t>(values[i]);
          }
        }
      }
    });
  });
}

}  // namespace torchopt_ext::kernels::cpu
