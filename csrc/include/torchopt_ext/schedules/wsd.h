// Warmup-stable-decay (WSD) learning-rate schedule (rollfast.md §4.3): a
// warmup to the peak lr, a constant stretch, and a decay to
// final_lr_ratio * peak over the last steps. The factor math lives here once;
// the LibTorch scheduler below and the Python torchopt_ext.schedules.WSD (via
// the op torchopt_ext::wsd_lr_factor) both use it.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/schedulers/lr_scheduler.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace torchopt_ext::schedules {

// How a warmup rises (and, mirrored, a decay falls) over x in [0, 1]:
// linear x, cosine (1 - cos(pi x)) / 2, power x^p, exponential
// expm1(rate x) / expm1(rate).
enum class WSDShape { Linear, Cosine, Power, Exponential };

// "linear", "cosine", "power" or "exponential" in any case; anything else is an
// error naming `argument`.
WSDShape parse_wsd_shape(const std::string& name, const char* argument);
const char* wsd_shape_name(WSDShape shape);

struct WSDOptions {
  explicit WSDOptions(int64_t total_steps) : total_steps_(total_steps) {}
  TORCH_ARG(int64_t, total_steps);
  TORCH_ARG(double, warmup_fraction) = 0.1;
  TORCH_ARG(double, decay_fraction) = 0.1;
  // Explicit step counts override the fractions.
  TORCH_ARG(std::optional<int64_t>, warmup_steps) = std::nullopt;
  TORCH_ARG(std::optional<int64_t>, decay_steps) = std::nullopt;
  TORCH_ARG(WSDShape, warmup_shape) = WSDShape::Linear;
  TORCH_ARG(WSDShape, decay_shape) = WSDShape::Linear;
  TORCH_ARG(double, final_lr_ratio) = 0.0;
  TORCH_ARG(double, warmup_power) = 1.0;
  TORCH_ARG(double, decay_power) = 1.0;
  TORCH_ARG(double, exponential_rate) = 5.0;

 public:
  // Throws c10::ValueError naming the offending option.
  void validate() const;
  // Warmup length T_w: warmup_steps, else int(total_steps * warmup_fraction).
  int64_t resolved_warmup_steps() const;
  // Decay length T_d: decay_steps, else int(total_steps * decay_fraction).
  int64_t resolved_decay_steps() const;
};

// The lr multiplier at 0-based step count `step` (peak lr = 1):
//   step <= T_w:            shape((step + 1) / (T_w + 1))
//   step >  T - T_d:        r + (1 - r) (1 - shape(x)),  x = (step - (T - T_d)) / max(T_d - 1, 1)
//   otherwise:              1
// with r = final_lr_ratio. Past the last step (x > 1) the final ratio is held.
double wsd_lr_factor(int64_t step, const WSDOptions& options);

// LibTorch scheduler: on construction every group's lr becomes
// peak * factor(0), where peak is the group's lr at that moment; each step()
// moves to the next count, like torch.optim.lr_scheduler in Python.
class WSD : public torch::optim::LRScheduler {
 public:
  WSD(torch::optim::Optimizer& optimizer, WSDOptions options);

  const WSDOptions& options() const { return options_; }
  const std::vector<double>& peak_lrs() const { return peak_lrs_; }
  // The 0-based count whose factor the optimizer's lrs hold now.
  int64_t last_step() const { return static_cast<int64_t>(step_count_); }

 private:
  std::vector<double> get_lrs() override;

  WSDOptions options_;
  std::vector<double> peak_lrs_;
};

}  // namespace torchopt_ext::schedules
