// The WSD factor as an op, so the Python scheduler uses the C++ math. It takes
// no tensors, so it is registered as a catch-all kernel.
#include <torch/library.h>

#include "torchopt_ext/schedules/wsd.h"

namespace {

double wsd_lr_factor_op(int64_t step, int64_t total_steps, double warmup_fraction, double decay_fraction,
                        std::optional<int64_t> warmup_steps, std::optional<int64_t> decay_steps,
                        c10::string_view warmup_shape, c10::string_view decay_shape, double final_lr_ratio,
                        double warmup_power, double decay_power, double exponential_rate) {
  using namespace torchopt_ext::schedules;
  WSDOptions options(total_steps);
  options.warmup_fraction(warmup_fraction)
      .decay_fraction(decay_fraction)
      .warmup_steps(warmup_steps)
      .decay_steps(decay_steps)
      .warmup_shape(parse_wsd_shape(std::string(warmup_shape), "warmup_shape"))
      .decay_shape(parse_wsd_shape(std::string(decay_shape), "decay_shape"))
      .final_lr_ratio(final_lr_ratio)
      .warmup_power(warmup_power)
      .decay_power(decay_power)
      .exponential_rate(exponential_rate);
  options.validate();
  return wsd_lr_factor(step, options);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "wsd_lr_factor(int step, *, int total_steps, float warmup_fraction, float decay_fraction, int? warmup_steps, "
      "int? decay_steps, str warmup_shape, str decay_shape, float final_lr_ratio, float warmup_power, float "
      "decay_power, float exponential_rate) -> float",
      &wsd_lr_factor_op);
}
